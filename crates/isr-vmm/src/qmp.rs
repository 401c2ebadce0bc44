//! A small QMP (QEMU Machine Protocol) client.
//!
//! Two layers:
//! - [`Framer`] and [`parse_message`]: I/O-free. QMP is a stream of JSON objects, one per line (QEMU ends
//!   each with `\r\n`). Bytes go in with [`Framer::push`], messages come out of [`Framer::next_message`].
//!   Partial lines are kept until their end arrives; a line that is not a QMP message yields an error and the
//!   stream carries on with the next line; an over-long line is dropped.
//! - [`QmpClient`]: async, over any `AsyncRead + AsyncWrite` (a Unix socket in practice). It negotiates
//!   capabilities, runs commands ([`QmpClient::execute`]) and waits for events ([`QmpClient::wait_event`]).
//!   Events that arrive while a command waits for its reply are queued for later `wait_event` calls.

use std::collections::VecDeque;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Map, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;

/// Longest accepted line (a `query-*` reply can be large, but not this large).
pub const MAX_LINE: usize = 16 * 1024 * 1024;
/// Most events kept while nobody waits for them; older ones are dropped first.
const MAX_QUEUED_EVENTS: usize = 1024;

/// A timestamp as QEMU sends it with each event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timestamp {
    pub seconds: i64,
    pub microseconds: i64,
}

/// An asynchronous QMP event.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    pub name: String,
    /// The `data` member, `Value::Null` when absent.
    pub data: Value,
    pub timestamp: Option<Timestamp>,
}

/// One message from the server.
#[derive(Debug, Clone, PartialEq)]
pub enum QmpMessage {
    /// `{"QMP": {"version": ..., "capabilities": [...]}}`, sent once on connect.
    Greeting { version: Value, capabilities: Vec<String> },
    /// `{"return": VALUE, "id": ID}`: a command succeeded.
    Return { id: Option<Value>, value: Value },
    /// `{"error": {"class": C, "desc": D}, "id": ID}`: a command failed.
    Error { id: Option<Value>, class: String, desc: String },
    /// `{"event": NAME, "data": ..., "timestamp": ...}`.
    Event(QmpEvent),
}

/// Errors of the QMP layer.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("QMP protocol error: {0}")]
    Protocol(String),
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command { command: String, class: String, desc: String },
    #[error("QMP connection closed by QEMU")]
    Closed,
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
}

/// Parses one line (without its line terminator) into a QMP message.
pub fn parse_message(line: &[u8]) -> Result<QmpMessage, QmpError> {
    let value: Value = serde_json::from_slice(line).map_err(|e| {
        QmpError::Protocol(format!(
            "not JSON ({e}): {}",
            String::from_utf8_lossy(&line[..line.len().min(200)])
        ))
    })?;
    let Value::Object(mut obj) = value else {
        return Err(QmpError::Protocol(format!("not a JSON object: {value}")));
    };
    if let Some(greeting) = obj.remove("QMP") {
        let version = greeting.get("version").cloned().unwrap_or(Value::Null);
        let capabilities = greeting
            .get("capabilities")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|c| c.as_str().map(str::to_owned)).collect())
            .unwrap_or_default();
        return Ok(QmpMessage::Greeting { version, capabilities });
    }
    let id = obj.remove("id");
    if let Some(value) = obj.remove("return") {
        return Ok(QmpMessage::Return { id, value });
    }
    if let Some(err) = obj.remove("error") {
        let field = |name: &str| err.get(name).and_then(Value::as_str).unwrap_or("").to_owned();
        if !err.is_object() {
            return Err(QmpError::Protocol(format!("malformed error member: {err}")));
        }
        return Ok(QmpMessage::Error { id, class: field("class"), desc: field("desc") });
    }
    if let Some(name) = obj.remove("event") {
        let Value::String(name) = name else {
            return Err(QmpError::Protocol(format!("event name is not a string: {name}")));
        };
        let data = obj.remove("data").unwrap_or(Value::Null);
        let timestamp = obj.remove("timestamp").and_then(|t| {
            Some(Timestamp {
                seconds: t.get("seconds")?.as_i64()?,
                microseconds: t.get("microseconds")?.as_i64()?,
            })
        });
        return Ok(QmpMessage::Event(QmpEvent { name, data, timestamp }));
    }
    Err(QmpError::Protocol(format!("unknown message: {}", Value::Object(obj))))
}

/// Splits a byte stream into lines and parses them. I/O-free.
#[derive(Debug, Default)]
pub struct Framer {
    buf: Vec<u8>,
    /// Set while skipping the rest of an over-long line.
    discarding: bool,
}

impl Framer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received but not yet returned as a message (an incomplete line).
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// The next complete message, if any. Blank lines are skipped; a line that does not parse is returned as
    /// an error and consumed, so the caller may keep calling.
    pub fn next_message(&mut self) -> Option<Result<QmpMessage, QmpError>> {
        loop {
            let Some(nl) = self.buf.iter().position(|&b| b == b'\n') else {
                if self.buf.len() > MAX_LINE {
                    self.buf.clear();
                    if !self.discarding {
                        self.discarding = true;
                        return Some(Err(QmpError::Protocol(format!("line longer than {MAX_LINE} bytes"))));
                    }
                }
                return None;
            };
            let mut line: Vec<u8> = self.buf.drain(..=nl).collect();
            if std::mem::take(&mut self.discarding) {
                continue; // tail of an over-long line
            }
            line.pop(); // '\n'
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            if line.len() > MAX_LINE {
                return Some(Err(QmpError::Protocol(format!("line longer than {MAX_LINE} bytes"))));
            }
            return Some(parse_message(&line));
        }
    }
}

/// Serialises a command as one QMP line.
pub fn encode_command(command: &str, arguments: Option<&Value>, id: u64) -> Vec<u8> {
    let mut obj = Map::new();
    obj.insert("execute".into(), Value::String(command.into()));
    if let Some(args) = arguments {
        obj.insert("arguments".into(), args.clone());
    }
    obj.insert("id".into(), json!(id));
    let mut line = serde_json::to_vec(&Value::Object(obj)).unwrap_or_default();
    line.push(b'\n');
    line
}

/// An async QMP client over a byte stream.
pub struct QmpClient<S = UnixStream> {
    stream: S,
    framer: Framer,
    events: VecDeque<QmpEvent>,
    next_id: u64,
    version: Value,
    rbuf: Box<[u8]>,
}

impl<S> std::fmt::Debug for QmpClient<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpClient")
            .field("version", &self.version)
            .field("queued_events", &self.events.len())
            .field("next_id", &self.next_id)
            .finish_non_exhaustive()
    }
}

impl QmpClient<UnixStream> {
    /// Connects to a QMP Unix socket, reads the greeting and leaves negotiation mode.
    pub async fn connect(path: &Path) -> Result<Self, QmpError> {
        let stream = UnixStream::connect(path).await?;
        Self::handshake(stream).await
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> QmpClient<S> {
    /// Reads the greeting from an established stream and sends `qmp_capabilities`.
    pub async fn handshake(stream: S) -> Result<Self, QmpError> {
        let mut client = QmpClient {
            stream,
            framer: Framer::new(),
            events: VecDeque::new(),
            next_id: 1,
            version: Value::Null,
            rbuf: vec![0u8; 64 * 1024].into_boxed_slice(),
        };
        match client.next_message().await? {
            QmpMessage::Greeting { version, .. } => client.version = version,
            other => return Err(QmpError::Protocol(format!("expected the QMP greeting, got {other:?}"))),
        }
        client.execute("qmp_capabilities", None).await?;
        Ok(client)
    }

    /// The `version` object of the greeting (`{"qemu": {"major": ..}, "package": ..}`).
    pub fn version(&self) -> &Value {
        &self.version
    }

    /// QEMU's major version from the greeting, when present.
    pub fn qemu_major(&self) -> Option<u64> {
        self.version.get("qemu")?.get("major")?.as_u64()
    }

    /// Reads the next message. Cancel-safe: bytes already read stay in the framer.
    pub async fn next_message(&mut self) -> Result<QmpMessage, QmpError> {
        loop {
            if let Some(msg) = self.framer.next_message() {
                match msg {
                    Ok(m) => return Ok(m),
                    Err(e) => {
                        tracing::warn!("ignoring bad QMP line: {e}");
                        continue;
                    }
                }
            }
            let n = self.stream.read(&mut self.rbuf).await?;
            if n == 0 {
                return Err(QmpError::Closed);
            }
            self.framer.push(&self.rbuf[..n]);
        }
    }

    /// Runs a command and returns its `return` value. Events that arrive meanwhile are queued.
    pub async fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let line = encode_command(command, arguments.as_ref(), id);
        tracing::trace!("QMP -> {}", String::from_utf8_lossy(&line).trim_end());
        self.stream.write_all(&line).await?;
        self.stream.flush().await?;
        loop {
            let msg = self.next_message().await?;
            tracing::trace!("QMP <- {msg:?}");
            match msg {
                QmpMessage::Event(ev) => self.queue_event(ev),
                QmpMessage::Return { id: rid, value } if id_matches(rid.as_ref(), id) => return Ok(value),
                QmpMessage::Error { id: rid, class, desc } if id_matches(rid.as_ref(), id) => {
                    return Err(QmpError::Command { command: command.to_owned(), class, desc })
                }
                other => tracing::debug!("ignoring unexpected QMP message {other:?}"),
            }
        }
    }

    /// Waits for the event `name`, first among those already queued. Other events are dropped.
    pub async fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<QmpEvent, QmpError> {
        if let Some(pos) = self.events.iter().position(|e| e.name == name) {
            let ev = self.events.remove(pos);
            self.events.drain(..pos);
            if let Some(ev) = ev {
                return Ok(ev);
            }
        }
        self.events.clear();
        let wait = async {
            loop {
                if let QmpMessage::Event(ev) = self.next_message().await? {
                    if ev.name == name {
                        return Ok(ev);
                    }
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .unwrap_or_else(|_| Err(QmpError::Timeout(timeout, format!("QMP event {name}"))))
    }

    /// The next event, queued or read. Cancel-safe.
    pub async fn next_event(&mut self) -> Result<QmpEvent, QmpError> {
        if let Some(ev) = self.events.pop_front() {
            return Ok(ev);
        }
        loop {
            if let QmpMessage::Event(ev) = self.next_message().await? {
                return Ok(ev);
            }
        }
    }

    /// Takes the events queued so far.
    pub fn take_events(&mut self) -> Vec<QmpEvent> {
        self.events.drain(..).collect()
    }

    fn queue_event(&mut self, ev: QmpEvent) {
        if self.events.len() >= MAX_QUEUED_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(ev);
    }
}

fn id_matches(rid: Option<&Value>, id: u64) -> bool {
    // A reply without an id answers the command in flight (QEMU echoes ids, but be lenient).
    rid.is_none_or(|v| v.as_u64() == Some(id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tokio::io::{AsyncBufReadExt, BufReader};

    const GREETING: &[u8] = br#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2"}, "capabilities": ["oob"]}}"#;

    fn all(framer: &mut Framer) -> Vec<Result<QmpMessage, QmpError>> {
        std::iter::from_fn(|| framer.next_message()).collect()
    }

    #[test]
    fn parses_greeting() {
        let QmpMessage::Greeting { version, capabilities } = parse_message(GREETING).unwrap() else {
            panic!("not a greeting")
        };
        assert_eq!(version["qemu"]["major"], 10);
        assert_eq!(capabilities, vec!["oob".to_string()]);
    }

    #[test]
    fn parses_return_error_event() {
        assert_eq!(
            parse_message(br#"{"return": {}, "id": 7}"#).unwrap(),
            QmpMessage::Return { id: Some(json!(7)), value: json!({}) }
        );
        assert_eq!(
            parse_message(br#"{"return": {"status": "completed"}}"#).unwrap(),
            QmpMessage::Return { id: None, value: json!({"status": "completed"}) }
        );
        assert_eq!(
            parse_message(br#"{"id": "x", "error": {"class": "GenericError", "desc": "no such file"}}"#)
                .unwrap(),
            QmpMessage::Error {
                id: Some(json!("x")),
                class: "GenericError".into(),
                desc: "no such file".into()
            }
        );
        let ev =
            parse_message(br#"{"timestamp": {"seconds": 1700000000, "microseconds": 12}, "event": "STOP"}"#)
                .unwrap();
        assert_eq!(
            ev,
            QmpMessage::Event(QmpEvent {
                name: "STOP".into(),
                data: Value::Null,
                timestamp: Some(Timestamp { seconds: 1_700_000_000, microseconds: 12 })
            })
        );
        let ev =
            parse_message(br#"{"event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-shutdown"}}"#)
                .unwrap();
        let QmpMessage::Event(ev) = ev else { panic!() };
        assert_eq!(ev.data["reason"], "guest-shutdown");
        assert_eq!(ev.timestamp, None);
    }

    #[test]
    fn rejects_garbage() {
        for bad in
            [&b"hello"[..], b"[1,2]", b"42", b"{\"foo\": 1}", b"{\"event\": 3}", b"{\"error\": 1}", b"{"]
        {
            assert!(
                matches!(parse_message(bad), Err(QmpError::Protocol(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn frames_split_lines_and_crlf() {
        let stream = b"{\"return\": {}, \"id\": 1}\r\n{\"event\": \"RESUME\"}\r\n\r\n{\"return\": 5}\n";
        // every split point gives the same three messages
        for split in 0..stream.len() {
            let mut f = Framer::new();
            f.push(&stream[..split]);
            let mut got = all(&mut f);
            f.push(&stream[split..]);
            got.extend(all(&mut f));
            let got: Vec<QmpMessage> = got.into_iter().map(Result::unwrap).collect();
            assert_eq!(got.len(), 3, "split at {split}");
            assert!(matches!(got[0], QmpMessage::Return { .. }));
            assert!(matches!(&got[1], QmpMessage::Event(e) if e.name == "RESUME"));
            assert_eq!(got[2], QmpMessage::Return { id: None, value: json!(5) });
            assert_eq!(f.pending(), 0);
        }
        // byte by byte
        let mut f = Framer::new();
        let mut n = 0;
        for b in stream {
            f.push(&[*b]);
            n += all(&mut f).len();
        }
        assert_eq!(n, 3);
    }

    #[test]
    fn partial_line_waits() {
        let mut f = Framer::new();
        f.push(br#"{"return": {"#);
        assert!(f.next_message().is_none());
        assert_eq!(f.pending(), 12);
        f.push(b"}}\n");
        assert!(matches!(f.next_message(), Some(Ok(QmpMessage::Return { .. }))));
    }

    #[test]
    fn garbage_line_then_recovers() {
        let mut f = Framer::new();
        f.push(b"\x00\xff garbage\n{\"return\": 1}\n");
        let got = all(&mut f);
        assert!(matches!(got[0], Err(QmpError::Protocol(_))));
        assert_eq!(got[1].as_ref().unwrap(), &QmpMessage::Return { id: None, value: json!(1) });
    }

    #[test]
    fn overlong_line_is_dropped() {
        let mut f = Framer::new();
        let chunk = vec![b'x'; 1024 * 1024];
        let mut errors = 0;
        for _ in 0..(MAX_LINE / chunk.len() + 2) {
            f.push(&chunk);
            errors += all(&mut f).len();
        }
        assert_eq!(errors, 1);
        assert!(f.pending() <= MAX_LINE);
        f.push(b"tail of the long line\n{\"return\": 2}\n");
        let got = all(&mut f);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].as_ref().unwrap(), &QmpMessage::Return { id: None, value: json!(2) });
    }

    #[test]
    fn encodes_commands() {
        let line = encode_command("migrate", Some(&json!({"uri": "file:/x"})), 3);
        assert_eq!(line.last(), Some(&b'\n'));
        let v: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v, json!({"execute": "migrate", "arguments": {"uri": "file:/x"}, "id": 3}));
        let v: Value = serde_json::from_slice(&encode_command("stop", None, 4)).unwrap();
        assert_eq!(v, json!({"execute": "stop", "id": 4}));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 0..20)) {
            let mut f = Framer::new();
            for c in &chunks {
                f.push(c);
                while f.next_message().is_some() {}
            }
            let _ = parse_message(&chunks.concat());
        }

        #[test]
        fn json_like_lines_never_panic(s in r#"[{}\[\]":,a-z0-9 \n]{0,200}"#) {
            let mut f = Framer::new();
            f.push(s.as_bytes());
            while f.next_message().is_some() {}
        }
    }

    /// A scripted fake QEMU on the other end of a duplex pipe.
    async fn fake_qemu(server: tokio::io::DuplexStream) {
        let (r, mut w) = tokio::io::split(server);
        let mut lines = BufReader::new(r).lines();
        w.write_all(GREETING).await.unwrap();
        w.write_all(b"\r\n").await.unwrap();
        while let Some(line) = lines.next_line().await.unwrap() {
            let cmd: Value = serde_json::from_str(&line).unwrap();
            let id = cmd["id"].clone();
            let reply = match cmd["execute"].as_str().unwrap() {
                "qmp_capabilities" => json!({"return": {}, "id": id}),
                "stop" => {
                    // an event before the reply, split oddly across writes
                    let ev =
                        b"{\"timestamp\": {\"seconds\": 1, \"microseconds\": 2}, \"event\": \"STOP\"}\r\n";
                    w.write_all(&ev[..10]).await.unwrap();
                    w.flush().await.unwrap();
                    tokio::task::yield_now().await;
                    w.write_all(&ev[10..]).await.unwrap();
                    json!({"return": {}, "id": id})
                }
                "query-status" => json!({"return": {"status": "paused", "running": false}, "id": id}),
                "quit" => {
                    let r = json!({"return": {}, "id": id});
                    w.write_all(format!("{r}\r\n").as_bytes()).await.unwrap();
                    let ev =
                        json!({"event": "SHUTDOWN", "data": {"guest": false, "reason": "host-qmp-quit"}});
                    w.write_all(format!("{ev}\r\n").as_bytes()).await.unwrap();
                    return;
                }
                other => {
                    json!({"error": {"class": "CommandNotFound", "desc": format!("The command {other} has not been found")}, "id": id})
                }
            };
            w.write_all(format!("{reply}\r\n").as_bytes()).await.unwrap();
        }
    }

    #[tokio::test]
    async fn client_against_fake_server() {
        let (client, server) = tokio::io::duplex(64);
        let server = tokio::spawn(fake_qemu(server));
        let mut qmp = QmpClient::handshake(client).await.unwrap();
        assert_eq!(qmp.qemu_major(), Some(10));
        assert_eq!(qmp.execute("stop", None).await.unwrap(), json!({}));
        let status = qmp.execute("query-status", None).await.unwrap();
        assert_eq!(status["status"], "paused");
        let err = qmp.execute("bogus", Some(json!({"a": 1}))).await.unwrap_err();
        match err {
            QmpError::Command { command, class, desc } => {
                assert_eq!(command, "bogus");
                assert_eq!(class, "CommandNotFound");
                assert!(desc.contains("bogus"));
            }
            other => panic!("{other:?}"),
        }
        // the STOP event was queued while `stop` waited for its reply
        let ev = qmp.wait_event("STOP", Duration::from_secs(1)).await.unwrap();
        assert_eq!(ev.timestamp, Some(Timestamp { seconds: 1, microseconds: 2 }));
        qmp.execute("quit", None).await.unwrap();
        let ev = qmp.wait_event("SHUTDOWN", Duration::from_secs(1)).await.unwrap();
        assert_eq!(ev.data["reason"], "host-qmp-quit");
        server.await.unwrap();
        assert!(matches!(qmp.next_message().await, Err(QmpError::Closed)));
        assert!(matches!(
            qmp.wait_event("NEVER", Duration::from_millis(50)).await,
            Err(QmpError::Closed | QmpError::Timeout(..))
        ));
    }

    #[tokio::test]
    async fn wait_event_times_out() {
        let (client, server) = tokio::io::duplex(64);
        let _server = tokio::spawn(fake_qemu(server));
        let mut qmp = QmpClient::handshake(client).await.unwrap();
        let err = qmp.wait_event("RESET", Duration::from_millis(50)).await.unwrap_err();
        assert!(matches!(err, QmpError::Timeout(..)), "{err}");
    }
}
