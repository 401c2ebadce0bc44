//! The control socket of a running parcel (`control.sock` in its directory, 0600 in a 0700 home): how
//! another `isr` process asks the process that runs the parcel (`isr resume`, `isr disk`) to do what only it
//! can, because it owns the open images. Today one request: a sync of the running parcel.
//!
//! The protocol is one JSON line each way: a [`ControlRequest`], then a [`ControlReply`]. A request line
//! longer than [`MAX_LINE`] is refused unread.

use crate::error::ClientError;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// The longest request or reply line accepted.
pub const MAX_LINE: usize = 64 << 10;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlRequest {
    /// Commit a crash-consistent version of the running parcel (its disk as of a flush; no memory image).
    Sync { message: String },
}

/// What a sync of a running parcel did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncDone {
    /// The version made, or `None` when nothing changed since the base.
    pub version: Option<u64>,
    /// Chunks and bytes sent for it (by the sync itself; the background upload sent the rest earlier).
    pub chunks: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlReply {
    Synced(SyncDone),
    /// The request failed: the message and the exit code the asking command should end with.
    Failed {
        message: String,
        exit_code: i32,
    },
}

impl ControlReply {
    pub fn from_error(e: &ClientError) -> ControlReply {
        ControlReply::Failed { message: e.to_string(), exit_code: e.exit_code() }
    }
}

/// Listen on `path` (a stale socket file from a dead run is replaced; the caller holds the run lock).
pub fn listen(path: &Path) -> Result<UnixListener, ClientError> {
    let _ = std::fs::remove_file(path);
    let l =
        UnixListener::bind(path).map_err(|e| ClientError::io(format!("binding {}", path.display()), e))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| ClientError::io(format!("restricting {}", path.display()), e))?;
    Ok(l)
}

/// One line of at most [`MAX_LINE`] bytes, parsed.
async fn read_line<T: for<'de> Deserialize<'de>>(
    r: &mut BufReader<impl tokio::io::AsyncRead + Unpin>,
    what: &str,
) -> Result<T, ClientError> {
    let mut line = Vec::new();
    let mut limited = (&mut *r).take(MAX_LINE as u64 + 1);
    limited
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| ClientError::io(format!("reading the {what}"), e))?;
    if line.len() > MAX_LINE {
        return Err(ClientError::Other(format!("the {what} is longer than {MAX_LINE} bytes")));
    }
    serde_json::from_slice(&line).map_err(|e| ClientError::Other(format!("malformed {what}: {e}")))
}

async fn write_line<T: Serialize>(
    w: &mut (impl tokio::io::AsyncWrite + Unpin),
    v: &T,
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(v).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await?;
    w.flush().await
}

/// A connection accepted on the control socket, its request read.
#[derive(Debug)]
pub struct Incoming {
    stream: BufReader<UnixStream>,
    pub request: ControlRequest,
}

impl Incoming {
    /// Read the request of a new connection (a peer that sends nothing for 10 s is dropped).
    pub async fn read(stream: UnixStream) -> Result<Incoming, ClientError> {
        let mut stream = BufReader::new(stream);
        let request =
            tokio::time::timeout(Duration::from_secs(10), read_line(&mut stream, "control request"))
                .await
                .map_err(|_| ClientError::Other("no control request within 10 s".into()))??;
        Ok(Incoming { stream, request })
    }

    /// Answer it (a peer that went away meanwhile is not an error of the running parcel).
    pub async fn reply(mut self, reply: &ControlReply) {
        if let Err(e) = write_line(self.stream.get_mut(), reply).await {
            tracing::debug!(error = %e, "control reply not delivered");
        }
    }
}

/// Ask the process running a parcel, over its control socket at `path`.
pub async fn request(path: &Path, req: &ControlRequest) -> Result<ControlReply, ClientError> {
    let stream = UnixStream::connect(path).await.map_err(|e| {
        ClientError::io(format!("connecting to the running parcel's control socket {}", path.display()), e)
    })?;
    let mut stream = BufReader::new(stream);
    write_line(stream.get_mut(), req).await.map_err(|e| ClientError::io("sending the control request", e))?;
    read_line(&mut stream, "control reply").await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_request_and_its_reply_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let l = listen(&path).unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let inc = Incoming::read(s).await.unwrap();
            assert_eq!(inc.request, ControlRequest::Sync { message: "noon".into() });
            inc.reply(&ControlReply::Synced(SyncDone { version: Some(7), chunks: 2, bytes: 9 })).await;
        });
        let r = request(&path, &ControlRequest::Sync { message: "noon".into() }).await.unwrap();
        assert_eq!(r, ControlReply::Synced(SyncDone { version: Some(7), chunks: 2, bytes: 9 }));
        server.await.unwrap();
    }

    #[tokio::test]
    async fn an_overlong_or_malformed_request_is_refused() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let writer = tokio::spawn(async move {
            let _ = b.write_all(&vec![b'x'; MAX_LINE + 10]).await;
        });
        let e = Incoming::read(a).await.expect_err("refused");
        assert!(e.to_string().contains("longer than"), "{e}");
        writer.await.unwrap();
        let (a, mut b) = UnixStream::pair().unwrap();
        b.write_all(b"{\"reboot\":{}}\n").await.unwrap();
        let e = Incoming::read(a).await.expect_err("refused");
        assert!(e.to_string().contains("malformed control request"), "{e}");
    }
}
