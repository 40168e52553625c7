//! The listeners' sockets: the options they share, and the check of a
//! listener another process passed.

use std::net::SocketAddr;

/// A listening socket with SO_REUSEPORT, so that during an upgrade the new
/// process listens on the same address before the old one stops
/// accepting: no moment without a listener. Also asks the kernel to
/// migrate connections queued on a closing listener to the others
/// (net.ipv4.tcp_migrate_req, Linux 5.14+), best effort.
pub fn bind_reuseport(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    if let Err(e) = std::fs::write("/proc/sys/net/ipv4/tcp_migrate_req", "1") {
        tracing::debug!(error = %e, "cannot enable tcp_migrate_req");
    }
    Ok(sock.into())
}

/// The metrics listener at `--metrics-addr`, if given (SO_REUSEPORT: during
/// an upgrade both processes listen).
pub fn bind_metrics(addr: Option<SocketAddr>) -> anyhow::Result<Option<tokio::net::TcpListener>> {
    let Some(addr) = addr else { return Ok(None) };
    bind_reuseport(addr)
        .and_then(|l| {
            l.set_nonblocking(true)?;
            tokio::net::TcpListener::from_std(l)
        })
        .map(Some)
        .map_err(|e| anyhow::anyhow!("cannot listen on --metrics-addr {addr}: {e}"))
}

/// What a passed socket was instead of a listener on the expected address.
#[derive(Debug)]
pub struct NotListener {
    /// SO_ACCEPTCONN.
    pub listening: bool,
    pub bound: Option<SocketAddr>,
}

/// `fd` as a listener, if it is one (SO_ACCEPTCONN) bound to `addr`.
pub fn listener_on(
    fd: std::os::fd::OwnedFd,
    addr: SocketAddr,
) -> Result<std::net::TcpListener, NotListener> {
    let listening =
        nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::AcceptConn).unwrap_or(false);
    let sock = socket2::Socket::from(fd);
    let bound = sock.local_addr().ok().and_then(|a| a.as_socket());
    if !listening || bound != Some(addr) {
        return Err(NotListener { listening, bound });
    }
    Ok(sock.into())
}
