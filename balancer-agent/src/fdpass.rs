//! Passing a descriptor over a Unix socket (SCM_RIGHTS): the router hands
//! a duplicate of its listening socket to the agent, which hands it to the
//! next router if this one dies (see `router::process`). The second place
//! of the agent that touches a raw kernel structure.
#![expect(
    unsafe_code,
    reason = "a descriptor received in SCM_RIGHTS is a raw fd the kernel \
              installed for us; taking ownership of it has no safe wrapper"
)]

use std::{
    io::{IoSlice, IoSliceMut},
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

/// Send all of `body` on the connected Unix socket `sock`, with `fd`
/// attached to its first byte.
pub fn send(sock: BorrowedFd<'_>, body: &[u8], fd: Option<BorrowedFd<'_>>) -> std::io::Result<()> {
    let mut sent = 0;
    while sent < body.len() {
        let iov = [IoSlice::new(&body[sent..])];
        let fds: [RawFd; 1] = [fd.map_or(-1, |f| f.as_raw_fd())];
        let cmsg = [ControlMessage::ScmRights(&fds)];
        let with_fd: &[ControlMessage<'_>] = if sent == 0 && fd.is_some() {
            &cmsg
        } else {
            &[]
        };
        sent += sendmsg::<()>(sock.as_raw_fd(), &iov, with_fd, MsgFlags::empty(), None)
            .map_err(std::io::Error::from)?;
    }
    Ok(())
}

/// Read until the peer closes: the bytes, and the first descriptor that
/// came with them (any others are closed).
pub fn recv_all(sock: BorrowedFd<'_>) -> std::io::Result<(Vec<u8>, Option<OwnedFd>)> {
    let mut out = Vec::new();
    let mut got: Option<OwnedFd> = None;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let mut space = nix::cmsg_space!([RawFd; 4]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(std::io::Error::from)?;
        let n = msg.bytes;
        for c in msg.cmsgs().map_err(std::io::Error::from)? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                for raw in fds {
                    // SAFETY: the kernel installed `raw` in our table for
                    // this message; nothing else owns it.
                    let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                    if got.is_none() {
                        got = Some(owned);
                    }
                }
            }
        }
        if n == 0 {
            return Ok((out, got));
        }
        out.extend_from_slice(&buf[..n]);
    }
}
