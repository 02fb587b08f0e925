//! The control socket: how `ipop status` reaches the running daemon.
//!
//! A client connects, writes one request line and reads the answer until the daemon closes the
//! connection. The socket is created with mode 0600, so only its owner (root) may ask.

use anyhow::{Context, bail};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

/// How long a client waits for the daemon to answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest request line accepted.
const MAX_REQUEST: u64 = 1024;

/// A request from a control client, with the channel for its answer.
pub struct Request {
    pub command: String,
    pub reply: oneshot::Sender<String>,
}

/// The bound control socket; removes its file when dropped.
pub struct ControlSocket {
    path: PathBuf,
}

impl ControlSocket {
    /// Binds the socket and serves requests, handing each to `requests`.
    pub async fn bind(path: &Path, requests: mpsc::Sender<Request>) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create directory {}", dir.display()))?;
        }
        if path.exists() {
            if UnixStream::connect(path).await.is_ok() {
                bail!(
                    "another ipop daemon is running: its control socket {} answers",
                    path.display()
                );
            }
            std::fs::remove_file(path).with_context(|| {
                format!("cannot remove stale control socket {}", path.display())
            })?;
        }
        let listener = UnixListener::bind(path)
            .with_context(|| format!("cannot create control socket {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot restrict control socket {}", path.display()))?;
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        tokio::spawn(serve(stream, requests.clone()));
                    }
                    Err(e) => {
                        tracing::warn!("control socket: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        Ok(ControlSocket {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn serve(stream: UnixStream, requests: mpsc::Sender<Request>) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST));
    if tokio::time::timeout(ANSWER_TIMEOUT, reader.read_line(&mut line))
        .await
        .is_err()
    {
        return;
    }
    let (reply, answer) = oneshot::channel();
    let request = Request {
        command: line.trim().to_owned(),
        reply,
    };
    if requests.send(request).await.is_err() {
        return;
    }
    if let Ok(text) = answer.await {
        let _ = write.write_all(text.as_bytes()).await;
    }
}

/// Sends one request to the daemon behind `path` and returns its answer.
pub async fn ask(path: &Path, command: &str) -> anyhow::Result<String> {
    let mut stream = match UnixStream::connect(path).await {
        Ok(s) => s,
        Err(e) => {
            use std::io::ErrorKind::{ConnectionRefused, NotFound};
            if matches!(e.kind(), NotFound | ConnectionRefused) {
                bail!(
                    "ipop is not running: no daemon answers on {} (start it with `ipop up`)",
                    path.display()
                );
            }
            return Err(e)
                .with_context(|| format!("cannot reach the daemon at {}", path.display()));
        }
    };
    let exchange = async {
        stream.write_all(format!("{command}\n").as_bytes()).await?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    tokio::time::timeout(ANSWER_TIMEOUT, exchange)
        .await
        .with_context(|| format!("the daemon at {} did not answer within 5 s", path.display()))?
        .with_context(|| format!("talking to the daemon at {}", path.display()))
}
