//! The QEMU guest agent, spoken over the VM's virtio-serial channel (`VmConfig::agent_channel`): JSON
//! commands, one answer each. A guest without an agent simply never answers; every call is bounded by a
//! timeout and the VM works the same without it.

use crate::VmmError;
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt as _, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// A connection to the guest agent.
#[derive(Debug)]
pub struct GuestAgent {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
    timeout: Duration,
}

/// How often `guest-sync` is sent again while no agent answers.
const SYNC_RETRY: Duration = Duration::from_secs(2);

/// Longest line accepted from the guest (it is untrusted).
const MAX_REPLY: usize = 64 << 10;

impl GuestAgent {
    /// Connect to the host end of the channel and synchronise with the agent (`guest-sync`): `None` when no
    /// agent answers within `timeout`.
    pub async fn connect(socket: &Path, timeout: Duration) -> Result<Option<GuestAgent>, VmmError> {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|e| VmmError::Io { what: format!("connecting to {}", socket.display()), source: e })?;
        let (r, w) = stream.into_split();
        let mut agent = GuestAgent { reader: BufReader::new(r), writer: w, timeout };
        // guest-sync is answered with its id: anything older still in the channel is skipped up to it. It is
        // sent again every few seconds: an agent that starts later (a booting guest) misses earlier ones.
        let deadline = tokio::time::Instant::now() + timeout;
        let mut ids = Vec::new();
        while tokio::time::Instant::now() < deadline {
            let id = sync_id();
            ids.push(id);
            agent.send(&json!({"execute": "guest-sync", "arguments": {"id": id}})).await?;
            let round = (tokio::time::Instant::now() + SYNC_RETRY).min(deadline);
            loop {
                let Ok(reply) = tokio::time::timeout_at(round, agent.read_reply()).await else { break };
                match reply? {
                    Some(v) if v.get("return").and_then(Value::as_u64).is_some_and(|r| ids.contains(&r)) => {
                        return Ok(Some(agent))
                    }
                    Some(_) => continue,
                    None => return Ok(None),
                }
            }
        }
        Ok(None)
    }

    async fn send(&mut self, cmd: &Value) -> Result<(), VmmError> {
        let mut line = serde_json::to_vec(cmd).map_err(|e| VmmError::Agent(e.to_string()))?;
        line.push(b'\n');
        self.writer
            .write_all(&line)
            .await
            .map_err(|e| VmmError::Io { what: "writing to the guest agent".into(), source: e })
    }

    /// The next JSON object from the agent; `None` at end of stream.
    async fn read_reply(&mut self) -> Result<Option<Value>, VmmError> {
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = (&mut self.reader)
                .take(MAX_REPLY as u64)
                .read_until(b'\n', &mut line)
                .await
                .map_err(|e| VmmError::Io { what: "reading from the guest agent".into(), source: e })?;
            if n == 0 {
                return Ok(None);
            }
            if n >= MAX_REPLY {
                return Err(VmmError::Agent("guest agent sent an over-long line".into()));
            }
            // The agent may send a 0xff delimiter byte before a reply (guest-sync-delimited).
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_matches(|c: char| c.is_whitespace() || c == '\u{fffd}');
            if text.is_empty() {
                continue;
            }
            return serde_json::from_str(text)
                .map(Some)
                .map_err(|e| VmmError::Agent(format!("guest agent sent malformed JSON: {e}")));
        }
    }

    /// Run one command and return its `return` value.
    pub async fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, VmmError> {
        let mut cmd = json!({"execute": command});
        if let Some(a) = arguments {
            cmd["arguments"] = a;
        }
        self.send(&cmd).await?;
        let reply = tokio::time::timeout(self.timeout, self.read_reply())
            .await
            .map_err(|_| VmmError::Agent(format!("guest agent did not answer {command}")))??
            .ok_or_else(|| VmmError::Agent("guest agent closed the channel".into()))?;
        if let Some(err) = reply.get("error") {
            return Err(VmmError::Agent(format!("guest agent refused {command}: {err}")));
        }
        Ok(reply.get("return").cloned().unwrap_or(Value::Null))
    }

    /// Set the guest's clock to the host's (after a resume the guest's clock is where it was suspended).
    pub async fn set_time_to_host(&mut self) -> Result<(), VmmError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|e| VmmError::Agent(e.to_string()))?;
        self.execute("guest-set-time", Some(json!({"time": now.as_nanos() as u64}))).await.map(|_| ())
    }

    /// The guest's clock, in nanoseconds since the Unix epoch.
    pub async fn time(&mut self) -> Result<u64, VmmError> {
        self.execute("guest-get-time", None)
            .await?
            .as_u64()
            .ok_or_else(|| VmmError::Agent("guest-get-time answered no number".into()))
    }

    /// Ask the guest to write back and drop its page cache, so that a memory image saved next carries no copy
    /// of file data the disk already holds.
    pub async fn drop_page_cache(&mut self) -> Result<(), VmmError> {
        let started = self
            .execute(
                "guest-exec",
                Some(json!({"path": "/bin/sh", "arg": ["-c", "sync; echo 3 > /proc/sys/vm/drop_caches"]})),
            )
            .await?;
        // A real qemu-ga runs it in the background: wait (bounded) until it exited.
        if let Some(pid) = started.get("pid").and_then(Value::as_u64) {
            for _ in 0..50 {
                let st = self.execute("guest-exec-status", Some(json!({"pid": pid}))).await;
                match st {
                    Ok(v) if v.get("exited").and_then(Value::as_bool) == Some(false) => {
                        tokio::time::sleep(Duration::from_millis(100)).await
                    }
                    _ => break,
                }
            }
        }
        Ok(())
    }
}

/// A guest-sync id unlikely to repeat: the time and the process id, within JSON's exact integer range.
fn sync_id() -> u64 {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    ((nanos as u64) ^ (u64::from(std::process::id()) << 32)).wrapping_add(n) & ((1 << 53) - 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// A fake agent on a socket pair: answers guest-sync with the id, and get-time with a number.
    #[tokio::test]
    async fn sync_skips_stale_replies_and_commands_answer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qga.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let fake = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut r = BufReader::new(r);
            let mut line = String::new();
            r.read_line(&mut line).await.unwrap();
            let req: Value = serde_json::from_str(&line).unwrap();
            let id = req["arguments"]["id"].as_u64().unwrap();
            // A stale answer first, then a delimiter byte and the real one.
            w.write_all(b"{\"return\": 7}\n\xff{\"return\": ").await.unwrap();
            w.write_all(format!("{id}}}\n").as_bytes()).await.unwrap();
            line.clear();
            r.read_line(&mut line).await.unwrap();
            assert!(line.contains("guest-get-time"));
            w.write_all(b"{\"return\": 1234}\n").await.unwrap();
            let mut rest = Vec::new();
            let _ = r.read_to_end(&mut rest).await;
        });
        let mut agent = GuestAgent::connect(&path, Duration::from_secs(30)).await.unwrap().expect("an agent");
        assert_eq!(agent.time().await.unwrap(), 1234);
        drop(agent);
        fake.await.unwrap();
    }

    #[tokio::test]
    async fn a_silent_guest_is_no_agent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qga.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let _keep = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(60)).await;
            drop(s);
        });
        let silent = GuestAgent::connect(&path, Duration::from_millis(300)).await.unwrap();
        assert!(silent.is_none(), "a guest that never answers has no agent");
    }
}
