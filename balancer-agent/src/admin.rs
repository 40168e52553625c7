//! The admin API's transport: one JSON request and one JSON response per
//! connection on a root-only Unix socket (the schema is `api.rs`). The CLI (`status`, `services`, `endpoints`) is its
//! client. The agent and the router process each serve one (the agent asks
//! the router's for its per-endpoint streams); each answers its own
//! requests.

use std::{
    future::Future,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
};

use serde::Deserialize;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};

use crate::api::{Request, Response};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot listen on admin socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot reach {path}: {source} (is `balancer-agent run` (or `router`, for its socket) running, and are you root?)"
    )]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("admin socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("admin socket {path}: bad response: {source}")]
    Decode {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("agent: {0}")]
    Remote(String),
}

/// An answer, and a descriptor to pass with it.
pub type Answered = Result<(serde_json::Value, Option<std::os::fd::OwnedFd>), String>;

/// Bind the socket with mode 0600 (set through the umask, so there is no
/// window in which another user could connect). A socket another process
/// still answers on is refused, unless `take_over` (a router that starts
/// beside the one it replaces: the old one keeps serving its open
/// connections, the new one the path).
pub fn bind(path: &Path, take_over: bool) -> Result<UnixListener, AdminError> {
    use nix::sys::stat::{Mode, umask};
    let bind_err = |source| AdminError::Bind {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).map_err(bind_err)?;
    }
    // A stale socket from a previous run: only remove it if nobody answers.
    if path.exists() {
        if !take_over && std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(bind_err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another process is listening there",
            )));
        }
        std::fs::remove_file(path).map_err(bind_err)?;
    }
    let old = umask(Mode::from_bits_truncate(0o177));
    let listener = UnixListener::bind(path);
    umask(old);
    listener.map_err(bind_err)
}

/// What answers requests on a socket.
pub type Answer =
    Arc<dyn Fn(Request) -> Pin<Box<dyn Future<Output = Answered> + Send>> + Send + Sync>;

pub async fn serve(listener: UnixListener, answer: Answer) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let answer = answer.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, answer).await {
                tracing::debug!(error = %e, "admin connection failed");
            }
        });
    }
}

async fn handle(stream: UnixStream, answer: Answer) -> std::io::Result<()> {
    let mut line = String::new();
    let mut reader = BufReader::new(stream).take(64 * 1024);
    reader.read_line(&mut line).await?;
    let stream = reader.into_inner().into_inner();
    let mut fd = None;
    let response = match serde_json::from_str::<Request>(&line) {
        Err(e) => Response {
            ok: false,
            error: Some(format!("bad request: {e}")),
            data: serde_json::Value::Null,
        },
        Ok(req) => {
            let result = answer(req).await;
            match result {
                Ok((data, passed)) => {
                    fd = passed;
                    Response {
                        ok: true,
                        error: None,
                        data,
                    }
                }
                Err(e) => Response {
                    ok: false,
                    error: Some(e),
                    data: serde_json::Value::Null,
                },
            }
        }
    };
    let mut body = serde_json::to_vec(&response).unwrap_or_default();
    body.push(b'\n');
    // The answer (with its descriptor) on the socket in blocking mode: it
    // is one small write.
    let stream = stream.into_std()?;
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(std::time::Duration::from_secs(5)))?;
    tokio::task::spawn_blocking(move || {
        use std::os::fd::AsFd;
        crate::fdpass::send(stream.as_fd(), &body, fd.as_ref().map(AsFd::as_fd))?;
        stream.shutdown(std::net::Shutdown::Write)
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Send one request and decode the answer with the descriptor passed with
/// it, blocking (at most `timeout` per read or write).
pub fn request_fd<T: for<'de> Deserialize<'de>>(
    path: &Path,
    req: &Request,
    timeout: std::time::Duration,
) -> Result<(T, Option<std::os::fd::OwnedFd>), AdminError> {
    use std::io::Write as _;
    use std::os::fd::AsFd;
    let io = |source| AdminError::Io {
        path: path.to_owned(),
        source,
    };
    let mut stream =
        std::os::unix::net::UnixStream::connect(path).map_err(|source| AdminError::Connect {
            path: path.to_owned(),
            source,
        })?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    stream.write_all(&encode(req)).map_err(io)?;
    let (buf, fd) = crate::fdpass::recv_all(stream.as_fd()).map_err(io)?;
    Ok((decode(path, &buf)?, fd))
}

/// The request line for `req`: its JSON and a newline.
fn encode(req: &Request) -> Vec<u8> {
    let mut body = serde_json::to_vec(req).unwrap_or_default();
    body.push(b'\n');
    body
}

/// An answer envelope from `path`: its data, or the error it carries.
fn decode<T: for<'de> Deserialize<'de>>(path: &Path, buf: &[u8]) -> Result<T, AdminError> {
    let decode_err = |source| AdminError::Decode {
        path: path.to_owned(),
        source,
    };
    let resp: Response = serde_json::from_slice(buf).map_err(decode_err)?;
    if !resp.ok {
        return Err(AdminError::Remote(resp.error.unwrap_or_default()));
    }
    serde_json::from_value(resp.data).map_err(decode_err)
}

use tokio::io::AsyncReadExt as _;

/// Send one request to the agent and decode the answer.
pub async fn request<T: for<'de> Deserialize<'de>>(
    path: &Path,
    req: &Request,
) -> Result<T, AdminError> {
    let io = |source| AdminError::Io {
        path: path.to_owned(),
        source,
    };
    let mut stream = UnixStream::connect(path)
        .await
        .map_err(|source| AdminError::Connect {
            path: path.to_owned(),
            source,
        })?;
    stream.write_all(&encode(req)).await.map_err(io)?;
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).await.map_err(io)?;
    decode(path, &buf)
}
