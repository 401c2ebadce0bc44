//! Protocol-level tests with a hand-rolled client (built on `isr_nbd::proto`)
//! talking to the server over an in-memory duplex pipe or a Unix socket.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use isr_nbd::proto::{self, cflags, errno, info, opt, rep, reply, tflags, Command, ReplyHeader, Request};
use isr_nbd::{handle_connection, BlockDevice, MemDevice, NbdError, ServeOptions};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::task::JoinHandle;

type ServerTask = JoinHandle<Result<(), NbdError>>;

struct Client<S> {
    s: S,
    buf: Vec<u8>,
    structured: bool,
    read_lens: HashMap<u64, usize>,
}

#[derive(Debug, PartialEq)]
enum Rep {
    Simple { error: u32, handle: u64, data: Vec<u8> },
    Chunk { flags: u16, ty: u16, handle: u64, payload: Vec<u8> },
}

impl Rep {
    fn handle(&self) -> u64 {
        match self {
            Rep::Simple { handle, .. } | Rep::Chunk { handle, .. } => *handle,
        }
    }
    fn error(&self) -> u32 {
        match self {
            Rep::Simple { error, .. } => *error,
            Rep::Chunk { ty, payload, .. } if *ty == reply::TYPE_ERROR => {
                proto::parse_error_payload(payload).unwrap().0
            }
            Rep::Chunk { .. } => 0,
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    fn new(s: S) -> Self {
        Client { s, buf: Vec::new(), structured: false, read_lens: HashMap::new() }
    }

    async fn more(&mut self) -> bool {
        let mut tmp = vec![0u8; 65536];
        let n = tokio::time::timeout(Duration::from_secs(10), self.s.read(&mut tmp))
            .await
            .expect("timeout")
            .unwrap();
        self.buf.extend_from_slice(&tmp[..n]);
        n > 0
    }

    async fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).await.unwrap();
    }

    async fn greeting(&mut self) -> u16 {
        loop {
            if let Some((f, n)) = proto::parse_greeting(&self.buf).unwrap() {
                self.buf.drain(..n);
                return f;
            }
            assert!(self.more().await, "eof");
        }
    }

    async fn option(&mut self, code: u32, data: &[u8]) {
        let mut out = Vec::new();
        proto::encode_option(&mut out, code, data);
        self.send(&out).await;
    }

    async fn opt_reply(&mut self) -> (u32, u32, Vec<u8>) {
        loop {
            if let Some((r, n)) = proto::parse_option_reply(&self.buf, 1 << 16).unwrap() {
                let v = (r.option, r.reply_type, r.data.to_vec());
                self.buf.drain(..n);
                return v;
            }
            assert!(self.more().await, "eof");
        }
    }

    /// Fixed newstyle + NO_ZEROES, optional structured replies, then GO.
    async fn connect(&mut self, structured: bool) -> (u64, u16) {
        let hf = self.greeting().await;
        assert_eq!(hf, proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES);
        let mut out = Vec::new();
        proto::encode_client_flags(&mut out, proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES);
        self.send(&out).await;
        if structured {
            self.option(opt::STRUCTURED_REPLY, &[]).await;
            assert_eq!(self.opt_reply().await, (opt::STRUCTURED_REPLY, rep::ACK, vec![]));
            self.structured = true;
        }
        self.option(opt::GO, &proto::encode_info_request("", &[info::BLOCK_SIZE])).await;
        let mut export = None;
        loop {
            let (o, t, d) = self.opt_reply().await;
            assert_eq!(o, opt::GO);
            if t == rep::ACK {
                return export.expect("no NBD_INFO_EXPORT");
            }
            assert_eq!(t, rep::INFO);
            if d[..2] == info::EXPORT.to_be_bytes() {
                export = Some((
                    u64::from_be_bytes(d[2..10].try_into().unwrap()),
                    u16::from_be_bytes([d[10], d[11]]),
                ));
            }
        }
    }

    async fn request(
        &mut self,
        command: Command,
        flags: u16,
        handle: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) {
        if command == Command::Read {
            self.read_lens.insert(handle, len as usize);
        }
        let mut out = proto::encode_request(&Request { flags, command, handle, offset, len }).to_vec();
        out.extend_from_slice(payload);
        self.send(&out).await;
    }

    async fn reply(&mut self) -> Rep {
        loop {
            match proto::parse_reply(&self.buf, 64 << 20).unwrap() {
                Some((ReplyHeader::Simple { error, handle }, n)) => {
                    let dlen = if error == 0 { self.read_lens.get(&handle).copied().unwrap_or(0) } else { 0 };
                    if self.buf.len() >= n + dlen {
                        let data = self.buf[n..n + dlen].to_vec();
                        self.buf.drain(..n + dlen);
                        self.read_lens.remove(&handle);
                        return Rep::Simple { error, handle, data };
                    }
                }
                Some((ReplyHeader::Structured { flags, ty, handle, payload }, n)) => {
                    let r = Rep::Chunk { flags, ty, handle, payload: payload.to_vec() };
                    self.buf.drain(..n);
                    return r;
                }
                None => {}
            }
            assert!(self.more().await, "eof while waiting for a reply");
        }
    }

    async fn expect_eof(&mut self) {
        assert!(!self.more().await, "expected EOF, got {:?}", self.buf);
    }
}

fn start(dev: Arc<dyn BlockDevice>, opts: ServeOptions) -> (Client<DuplexStream>, ServerTask) {
    let (c, s) = tokio::io::duplex(1 << 20);
    let task = tokio::spawn(handle_connection(s, dev, Arc::new(opts)));
    (Client::new(c), task)
}

fn mem(size: usize, byte: u8) -> Arc<MemDevice> {
    Arc::new(MemDevice::from_vec(vec![byte; size]))
}

#[tokio::test]
async fn option_haggling() {
    let opts = ServeOptions { export_name: "disk".into(), ..ServeOptions::default() };
    let (mut c, task) = start(mem(1 << 20, 0), opts);
    c.greeting().await;
    c.send(&proto::FLAG_C_FIXED_NEWSTYLE.to_be_bytes()).await;

    c.option(opt::LIST, &[]).await;
    assert_eq!(c.opt_reply().await, (opt::LIST, rep::SERVER, proto::rep_server("disk")));
    assert_eq!(c.opt_reply().await, (opt::LIST, rep::ACK, vec![]));

    c.option(opt::LIST, b"junk").await;
    assert_eq!(c.opt_reply().await.1, rep::ERR_INVALID);

    // Metadata contexts: listed without structured replies, selected only with them.
    c.option(opt::LIST_META_CONTEXT, &proto::encode_meta_context_request("disk", &[])).await;
    assert_eq!(
        c.opt_reply().await,
        (opt::LIST_META_CONTEXT, rep::META_CONTEXT, proto::rep_meta_context(0, "base:allocation"))
    );
    assert_eq!(c.opt_reply().await, (opt::LIST_META_CONTEXT, rep::ACK, vec![]));
    c.option(opt::LIST_META_CONTEXT, &proto::encode_meta_context_request("disk", &["qemu:x"])).await;
    assert_eq!(c.opt_reply().await, (opt::LIST_META_CONTEXT, rep::ACK, vec![]), "no context of ours");
    c.option(opt::SET_META_CONTEXT, &proto::encode_meta_context_request("disk", &["base:allocation"])).await;
    assert_eq!(c.opt_reply().await.1, rep::ERR_INVALID, "SET before structured replies");
    c.option(opt::SET_META_CONTEXT, b"junk").await;
    assert_eq!(c.opt_reply().await.1, rep::ERR_INVALID);

    for unsupported in [opt::STARTTLS, opt::EXTENDED_HEADERS, 4242] {
        c.option(unsupported, &[0, 0, 0, 0]).await;
        assert_eq!(c.opt_reply().await, (unsupported, rep::ERR_UNSUP, vec![]));
    }

    c.option(opt::INFO, &proto::encode_info_request("anything", &[info::NAME, info::BLOCK_SIZE])).await;
    let mut got = Vec::new();
    loop {
        let (o, t, d) = c.opt_reply().await;
        assert_eq!(o, opt::INFO);
        if t == rep::ACK {
            break;
        }
        assert_eq!(t, rep::INFO);
        got.push(d);
    }
    let flags = tflags::HAS_FLAGS
        | tflags::SEND_FLUSH
        | tflags::SEND_FUA
        | tflags::SEND_TRIM
        | tflags::SEND_WRITE_ZEROES
        | tflags::SEND_CACHE
        | tflags::SEND_FAST_ZERO;
    assert!(got.contains(&proto::info_export(1 << 20, flags).to_vec()), "no multi-conn for a MemDevice");
    assert!(got.contains(&proto::info_block_size(1, 4096, 32 << 20).to_vec()));
    assert!(got.contains(&proto::info_name("disk")));

    // Malformed INFO: request count does not match the length.
    let mut bad = proto::encode_info_request("", &[info::NAME]);
    bad.push(0);
    c.option(opt::INFO, &bad).await;
    assert_eq!(c.opt_reply().await.1, rep::ERR_INVALID);
    // Name length beyond the option.
    c.option(opt::GO, &[0, 0, 1, 0, 0, 0]).await;
    assert_eq!(c.opt_reply().await.1, rep::ERR_INVALID);

    c.option(opt::STRUCTURED_REPLY, &[]).await;
    assert_eq!(c.opt_reply().await.1, rep::ACK);
    c.option(opt::STRUCTURED_REPLY, &[]).await;
    assert_eq!(c.opt_reply().await.1, rep::ERR_INVALID);

    c.option(opt::ABORT, &[]).await;
    assert_eq!(c.opt_reply().await, (opt::ABORT, rep::ACK, vec![]));
    c.expect_eof().await;
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn export_name_with_zeroes_then_simple_io() {
    let dev = mem(1 << 20, 0x42);
    let (mut c, task) = start(dev.clone(), ServeOptions::default());
    c.greeting().await;
    c.send(&proto::FLAG_C_FIXED_NEWSTYLE.to_be_bytes()).await; // no NO_ZEROES
    c.option(opt::EXPORT_NAME, b"any-name").await;
    while c.buf.len() < 134 {
        assert!(c.more().await);
    }
    let ((size, flags), n) = proto::parse_export_name_reply(&c.buf, false).unwrap().unwrap();
    assert_eq!(n, 134);
    assert!(c.buf[10..134].iter().all(|&b| b == 0));
    c.buf.drain(..n);
    assert_eq!(size, 1 << 20);
    assert_eq!(flags & tflags::HAS_FLAGS, tflags::HAS_FLAGS);
    assert_eq!(flags & tflags::CAN_MULTI_CONN, 0);

    c.request(Command::Read, 0, 7, 100, 10, &[]).await;
    assert_eq!(c.reply().await, Rep::Simple { error: 0, handle: 7, data: vec![0x42; 10] });
    c.request(Command::Disc, 0, 8, 0, 0, &[]).await;
    c.expect_eof().await;
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn handshake_errors_close_the_connection() {
    // Unknown client flags.
    let (mut c, task) = start(mem(4096, 0), ServeOptions::default());
    c.greeting().await;
    c.send(&0x8000_0000u32.to_be_bytes()).await;
    assert!(matches!(task.await.unwrap(), Err(NbdError::UnknownClientFlags(_))));

    // Oversized option.
    let (mut c, task) = start(mem(4096, 0), ServeOptions::default());
    c.greeting().await;
    c.send(&1u32.to_be_bytes()).await;
    let mut out = proto::IHAVEOPT.to_be_bytes().to_vec();
    out.extend_from_slice(&opt::LIST.to_be_bytes());
    out.extend_from_slice(&(1u32 << 30).to_be_bytes());
    c.send(&out).await;
    assert!(matches!(task.await.unwrap(), Err(NbdError::OptionTooLarge { .. })));

    // Bad option magic.
    let (mut c, task) = start(mem(4096, 0), ServeOptions::default());
    c.greeting().await;
    c.send(&1u32.to_be_bytes()).await;
    c.send(b"NOTMAGIC\0\0\0\x01\0\0\0\0").await;
    assert!(matches!(task.await.unwrap(), Err(NbdError::BadMagic { .. })));

    // EOF during the handshake.
    let (mut c, task) = start(mem(4096, 0), ServeOptions::default());
    c.greeting().await;
    drop(c);
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn simple_replies_and_validation() {
    let dev = mem(1 << 20, 0);
    let (mut c, task) = start(dev.clone(), ServeOptions::default());
    let (size, flags) = c.connect(false).await;
    assert_eq!(size, 1 << 20);
    assert_eq!(flags & tflags::READ_ONLY, 0);
    assert_eq!(flags & tflags::SEND_DF, 0);

    c.request(Command::Write, 0, 1, 4096, 4, b"abcd").await;
    assert_eq!(c.reply().await.error(), 0);
    c.request(Command::Read, 0, 2, 4096, 4, &[]).await;
    assert_eq!(c.reply().await, Rep::Simple { error: 0, handle: 2, data: b"abcd".to_vec() });

    // Out of bounds: EINVAL for reads, ENOSPC for writes (payload consumed).
    c.request(Command::Read, 0, 3, (1 << 20) - 2, 4, &[]).await;
    assert_eq!(c.reply().await, Rep::Simple { error: errno::EINVAL, handle: 3, data: vec![] });
    c.request(Command::Read, 0, 4, u64::MAX - 1, 4, &[]).await;
    assert_eq!(c.reply().await.error(), errno::EINVAL);
    c.request(Command::Write, 0, 5, 1 << 20, 3, b"xyz").await;
    assert_eq!(c.reply().await, Rep::Simple { error: errno::ENOSPC, handle: 5, data: vec![] });
    c.request(Command::Trim, 0, 6, (1 << 20) - 1, 2, &[]).await;
    assert_eq!(c.reply().await.error(), errno::EINVAL);
    c.request(Command::WriteZeroes, 0, 7, 1 << 21, 1, &[]).await;
    assert_eq!(c.reply().await.error(), errno::EINVAL);
    // Unknown and unsupported commands.
    c.request(Command::Unknown(99), 0, 8, 0, 0, &[]).await;
    assert_eq!(c.reply().await.error(), errno::EINVAL);
    c.request(Command::Unknown(proto::cmd::BLOCK_STATUS), 0, 9, 0, 4096, &[]).await;
    assert_eq!(c.reply().await.error(), errno::EINVAL);
    // Read longer than the maximum block size.
    c.request(Command::Read, 0, 10, 0, (32 << 20) + 1, &[]).await;
    assert_eq!(c.reply().await, Rep::Simple { error: errno::EINVAL, handle: 10, data: vec![] });

    // Connection still alive; trim / write zeroes / flush / FUA work.
    c.request(Command::Write, cflags::FUA, 11, 0, 8, &[9; 8]).await;
    assert_eq!(c.reply().await.error(), 0);
    c.request(Command::WriteZeroes, cflags::NO_HOLE, 12, 2, 2, &[]).await;
    assert_eq!(c.reply().await.error(), 0);
    c.request(Command::Trim, 0, 13, 6, 1, &[]).await;
    assert_eq!(c.reply().await.error(), 0);
    c.request(Command::Flush, 0, 14, 0, 0, &[]).await;
    assert_eq!(c.reply().await.error(), 0);
    c.request(Command::Read, 0, 15, 0, 8, &[]).await;
    assert_eq!(c.reply().await, Rep::Simple { error: 0, handle: 15, data: vec![9, 9, 0, 0, 9, 9, 0, 9] });
    c.request(Command::Read, 0, 16, 0, 0, &[]).await;
    assert_eq!(c.reply().await, Rep::Simple { error: 0, handle: 16, data: vec![] });

    c.request(Command::Disc, 0, 17, 0, 0, &[]).await;
    c.expect_eof().await;
    task.await.unwrap().unwrap();
    assert_eq!(dev.slice(4096, 4), b"abcd");
}

#[tokio::test]
async fn structured_replies() {
    let dev = Arc::new(FlakyDevice::new(1 << 20, 1 << 19));
    let (mut c, task) = start(dev, ServeOptions::default());
    let (_, flags) = c.connect(true).await;
    assert_ne!(flags & tflags::SEND_DF, 0);

    c.request(Command::Write, 0, 1, 10, 3, b"xyz").await;
    assert_eq!(c.reply().await, Rep::Simple { error: 0, handle: 1, data: vec![] });
    c.request(Command::Read, cflags::DF, 2, 9, 5, &[]).await;
    let mut expect = 9u64.to_be_bytes().to_vec();
    expect.extend_from_slice(&[0, b'x', b'y', b'z', 0]);
    assert_eq!(
        c.reply().await,
        Rep::Chunk { flags: reply::FLAG_DONE, ty: reply::TYPE_OFFSET_DATA, handle: 2, payload: expect }
    );
    // Zero-length read: a NONE chunk.
    c.request(Command::Read, 0, 3, 0, 0, &[]).await;
    assert_eq!(
        c.reply().await,
        Rep::Chunk { flags: reply::FLAG_DONE, ty: reply::TYPE_NONE, handle: 3, payload: vec![] }
    );
    // Out of bounds read: an ERROR chunk, never a simple reply.
    c.request(Command::Read, 0, 4, 1 << 20, 1, &[]).await;
    match c.reply().await {
        Rep::Chunk { flags, ty, handle: 4, payload } => {
            assert_eq!((flags, ty), (reply::FLAG_DONE, reply::TYPE_ERROR));
            assert_eq!(proto::parse_error_payload(&payload).unwrap().0, errno::EINVAL);
        }
        other => panic!("{other:?}"),
    }
    // Device read failure: EIO with the device's message, no data.
    c.request(Command::Read, 0, 5, 1 << 19, 512, &[]).await;
    match c.reply().await {
        Rep::Chunk { flags, ty, handle: 5, payload } => {
            assert_eq!((flags, ty), (reply::FLAG_DONE, reply::TYPE_ERROR));
            let (e, msg) = proto::parse_error_payload(&payload).unwrap();
            assert_eq!(e, errno::EIO);
            assert_eq!(msg, b"backend fetch failed");
        }
        other => panic!("{other:?}"),
    }
    c.request(Command::Disc, 0, 6, 0, 0, &[]).await;
    c.expect_eof().await;
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn read_only_export() {
    let dev = mem(65536, 5);
    let opts = ServeOptions { read_only: true, ..ServeOptions::default() };
    let (mut c, task) = start(dev.clone(), opts);
    let (_, flags) = c.connect(false).await;
    assert_ne!(flags & tflags::READ_ONLY, 0);
    assert_eq!(flags & (tflags::SEND_TRIM | tflags::SEND_WRITE_ZEROES), 0);
    c.request(Command::Write, 0, 1, 0, 4, &[1; 4]).await;
    assert_eq!(c.reply().await.error(), errno::EPERM);
    c.request(Command::Trim, 0, 2, 0, 4, &[]).await;
    assert_eq!(c.reply().await.error(), errno::EPERM);
    c.request(Command::WriteZeroes, 0, 3, 0, 4, &[]).await;
    assert_eq!(c.reply().await.error(), errno::EPERM);
    c.request(Command::Flush, 0, 4, 0, 0, &[]).await;
    assert_eq!(c.reply().await.error(), 0);
    c.request(Command::Read, 0, 5, 0, 4, &[]).await;
    assert_eq!(c.reply().await, Rep::Simple { error: 0, handle: 5, data: vec![5; 4] });
    drop(c);
    task.await.unwrap().unwrap();
    assert!(dev.contents().iter().all(|&b| b == 5));
}

#[tokio::test]
async fn fatal_transmission_errors() {
    // Write larger than the maximum payload: connection closed.
    let (mut c, task) = start(mem(1 << 20, 0), ServeOptions::default());
    c.connect(false).await;
    c.request(Command::Write, 0, 1, 0, (32 << 20) + 1, &[]).await;
    assert!(matches!(task.await.unwrap(), Err(NbdError::RequestTooLarge { .. })));
    c.expect_eof().await;

    // Bad request magic.
    let (mut c, task) = start(mem(1 << 20, 0), ServeOptions::default());
    c.connect(false).await;
    c.send(&[0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0]).await;
    match task.await.unwrap() {
        Err(NbdError::BadMagic { got, .. }) => assert_eq!(got, 0xdead_beef),
        other => panic!("{other:?}"),
    }

    // EOF in the middle of a write payload.
    let (mut c, task) = start(mem(1 << 20, 0), ServeOptions::default());
    c.connect(false).await;
    c.request(Command::Write, 0, 1, 0, 4096, &[1; 100]).await;
    drop(c);
    assert!(matches!(task.await.unwrap(), Err(NbdError::UnexpectedEof)));
}

#[tokio::test]
async fn structured_reads_send_zeroes_as_holes() {
    let mut data = vec![0u8; 1 << 20];
    data[4096..8192].fill(7);
    let (mut c, task) = start(Arc::new(MemDevice::sparse(data)), ServeOptions::default());
    c.connect(true).await;
    let chunk = |flags, ty, offset: u64, tail: &[u8]| {
        let mut payload = offset.to_be_bytes().to_vec();
        payload.extend_from_slice(tail);
        Rep::Chunk { flags, ty, handle: 1, payload }
    };
    c.request(Command::Read, 0, 1, 0, 16384, &[]).await;
    assert_eq!(c.reply().await, chunk(0, reply::TYPE_OFFSET_HOLE, 0, &4096u32.to_be_bytes()));
    assert_eq!(c.reply().await, chunk(0, reply::TYPE_OFFSET_DATA, 4096, &[7; 4096]));
    assert_eq!(
        c.reply().await,
        chunk(reply::FLAG_DONE, reply::TYPE_OFFSET_HOLE, 8192, &8192u32.to_be_bytes())
    );
    // All zero: one hole.
    c.request(Command::Read, 0, 1, 65536, 4096, &[]).await;
    assert_eq!(
        c.reply().await,
        chunk(reply::FLAG_DONE, reply::TYPE_OFFSET_HOLE, 65536, &4096u32.to_be_bytes())
    );
    // DF (don't fragment): the bytes, zeroes included, in one data chunk.
    c.request(Command::Read, cflags::DF, 1, 0, 8192, &[]).await;
    let mut both = vec![0u8; 4096];
    both.extend_from_slice(&[7; 4096]);
    assert_eq!(c.reply().await, chunk(reply::FLAG_DONE, reply::TYPE_OFFSET_DATA, 0, &both));
    drop(c);
    let _ = task.await;
}

/// A device whose sparse reads report holes that overlap or run past the read.
struct BadHolesDevice(MemDevice);

#[async_trait::async_trait]
impl BlockDevice for BadHolesDevice {
    fn size(&self) -> u64 {
        self.0.size()
    }
    async fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.0.read(offset, buf).await
    }
    async fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.0.write(offset, data).await
    }
    async fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    async fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0.trim(offset, len).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0.write_zeroes(offset, len).await
    }
    async fn read_sparse_owned(
        &self,
        offset: u64,
        buf: Vec<u8>,
    ) -> (Vec<u8>, io::Result<Vec<std::ops::Range<u32>>>) {
        let len = buf.len() as u32;
        let holes = if offset == 0 { vec![0..8, 4..len] } else { vec![0..4, 8..len + 1] };
        (buf, Ok(holes))
    }
}

#[tokio::test]
async fn malformed_holes_are_an_error_not_a_protocol_violation() {
    let (mut c, task) = start(Arc::new(BadHolesDevice(MemDevice::new(1 << 20))), ServeOptions::default());
    c.connect(true).await;
    for (handle, offset) in [(1, 0), (2, 4096)] {
        c.request(Command::Read, 0, handle, offset, 4096, &[]).await;
        match c.reply().await {
            Rep::Chunk { flags, ty, handle: h, payload } => {
                assert_eq!((flags, ty, h), (reply::FLAG_DONE, reply::TYPE_ERROR, handle));
                assert_eq!(&payload[..4], &errno::EIO.to_be_bytes());
            }
            other => panic!("{other:?}"),
        }
    }
    drop(c);
    let _ = task.await;
}

/// A device that answers a read with its own buffers where it can: each 4 KiB page of the read alternately
/// from a buffer it holds (page index even), from the read's buffer (odd), and zero pages as holes; and,
/// at offset 1 MiB - 4 KiB, spans that do not add up to the read.
struct ScatterDevice(MemDevice);

#[async_trait::async_trait]
impl BlockDevice for ScatterDevice {
    fn size(&self) -> u64 {
        self.0.size()
    }
    async fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.0.read(offset, buf).await
    }
    async fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.0.write(offset, data).await
    }
    async fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    async fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0.trim(offset, len).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0.write_zeroes(offset, len).await
    }
    async fn read_scattered(
        &self,
        offset: u64,
        mut buf: Vec<u8>,
    ) -> (Vec<u8>, io::Result<Vec<isr_nbd::ReadSpan>>) {
        use isr_nbd::ReadSpan;
        if offset == (1 << 20) - 4096 {
            return (buf, Ok(vec![ReadSpan::Buffer(100), ReadSpan::Hole(100)]));
        }
        let mut spans = Vec::new();
        for (k, page) in buf.chunks_mut(4096).enumerate() {
            let at = offset + (k * 4096) as u64;
            let data = self.0.slice(at as usize, page.len());
            let n = page.len() as u32;
            if data.iter().all(|&b| b == 0) {
                spans.push(ReadSpan::Hole(n));
            } else if (at / 4096).is_multiple_of(2) {
                spans.push(ReadSpan::Shared(bytes::Bytes::from(data)));
            } else {
                page.copy_from_slice(&data);
                spans.push(ReadSpan::Buffer(n));
            }
        }
        (buf, Ok(spans))
    }
}

#[tokio::test]
async fn scattered_reads_send_device_buffers_and_holes_in_order() {
    // Pages 0-3: data; 4: zero; 5-6: data; 7: zero.
    let mut data = vec![0u8; 1 << 20];
    for p in [0usize, 1, 2, 3, 5, 6] {
        data[p * 4096..(p + 1) * 4096].fill(p as u8 + 1);
    }
    let (mut c, task) =
        start(Arc::new(ScatterDevice(MemDevice::from_vec(data.clone()))), ServeOptions::default());
    c.connect(true).await;
    let chunk = |flags, ty, offset: u64, tail: &[u8]| {
        let mut payload = offset.to_be_bytes().to_vec();
        payload.extend_from_slice(tail);
        Rep::Chunk { flags, ty, handle: 1, payload }
    };
    // One data chunk from four spans (shared, buffer, shared, buffer), a hole, data again, a hole.
    c.request(Command::Read, 0, 1, 0, 8 * 4096, &[]).await;
    assert_eq!(c.reply().await, chunk(0, reply::TYPE_OFFSET_DATA, 0, &data[..4 * 4096]));
    assert_eq!(c.reply().await, chunk(0, reply::TYPE_OFFSET_HOLE, 4 * 4096, &4096u32.to_be_bytes()));
    assert_eq!(c.reply().await, chunk(0, reply::TYPE_OFFSET_DATA, 5 * 4096, &data[5 * 4096..7 * 4096]));
    assert_eq!(
        c.reply().await,
        chunk(reply::FLAG_DONE, reply::TYPE_OFFSET_HOLE, 7 * 4096, &4096u32.to_be_bytes())
    );
    // A read that starts mid-page and ends in a shared page.
    c.request(Command::Read, 0, 1, 4000, 4096 + 200, &[]).await;
    assert_eq!(c.reply().await, chunk(reply::FLAG_DONE, reply::TYPE_OFFSET_DATA, 4000, &data[4000..8296]));
    // Spans that do not cover the read: an error, not a malformed reply.
    c.request(Command::Read, 0, 2, (1 << 20) - 4096, 4096, &[]).await;
    match c.reply().await {
        Rep::Chunk { flags, ty, handle, payload } => {
            assert_eq!((flags, ty, handle), (reply::FLAG_DONE, reply::TYPE_ERROR, 2));
            assert_eq!(&payload[..4], &errno::EIO.to_be_bytes());
        }
        other => panic!("{other:?}"),
    }
    // DF: the device's read, one data chunk.
    c.request(Command::Read, cflags::DF, 1, 0, 8 * 4096, &[]).await;
    assert_eq!(c.reply().await, chunk(reply::FLAG_DONE, reply::TYPE_OFFSET_DATA, 0, &data[..8 * 4096]));
    drop(c);
    let _ = task.await;
}

/// MemDevice whose reads at or after `fail_from` fail.
struct FlakyDevice {
    inner: MemDevice,
    fail_from: u64,
}

impl FlakyDevice {
    fn new(size: usize, fail_from: u64) -> Self {
        FlakyDevice { inner: MemDevice::new(size), fail_from }
    }
}

#[async_trait::async_trait]
impl BlockDevice for FlakyDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    async fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if offset + buf.len() as u64 > self.fail_from {
            return Err(io::Error::other("backend fetch failed"));
        }
        self.inner.read(offset, buf).await
    }
    async fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.inner.write(offset, data).await
    }
    async fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    async fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.trim(offset, len).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.write_zeroes(offset, len).await
    }
}

/// MemDevice with slow writes that logs the order of events.
struct SlowDevice {
    inner: MemDevice,
    write_delay: Duration,
    log: Mutex<Vec<String>>,
}

impl SlowDevice {
    fn new(size: usize, write_delay: Duration) -> Self {
        SlowDevice { inner: MemDevice::new(size), write_delay, log: Mutex::new(Vec::new()) }
    }
    fn log(&self, s: String) {
        self.log.lock().unwrap().push(s);
    }
    fn events(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

#[async_trait::async_trait]
impl BlockDevice for SlowDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    async fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.log(format!("read {offset}"));
        self.inner.read(offset, buf).await
    }
    async fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.log(format!("write-start {offset}"));
        tokio::time::sleep(self.write_delay).await;
        self.inner.write(offset, data).await?;
        self.log(format!("write-done {offset}"));
        Ok(())
    }
    async fn flush(&self) -> io::Result<()> {
        self.log("flush".into());
        Ok(())
    }
    async fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        tokio::time::sleep(self.write_delay).await;
        self.log(format!("trim-done {offset}"));
        self.inner.trim(offset, len).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.write_zeroes(offset, len).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_waits_for_earlier_writes_and_requests_run_concurrently() {
    let dev = Arc::new(SlowDevice::new(1 << 20, Duration::from_millis(150)));
    let (mut c, task) = start(dev.clone(), ServeOptions::default());
    c.connect(false).await;
    // Pipelined: slow WRITE, slow TRIM, FLUSH, then a fast READ.
    let mut out =
        proto::encode_request(&Request { flags: 0, command: Command::Write, handle: 1, offset: 0, len: 4 })
            .to_vec();
    out.extend_from_slice(b"data");
    out.extend_from_slice(&proto::encode_request(&Request {
        flags: 0,
        command: Command::Trim,
        handle: 2,
        offset: 8192,
        len: 4096,
    }));
    out.extend_from_slice(&proto::encode_request(&Request {
        flags: 0,
        command: Command::Flush,
        handle: 3,
        offset: 0,
        len: 0,
    }));
    out.extend_from_slice(&proto::encode_request(&Request {
        flags: 0,
        command: Command::Read,
        handle: 4,
        offset: 0,
        len: 4,
    }));
    c.read_lens.insert(4, 4);
    c.send(&out).await;

    let first = c.reply().await;
    assert_eq!(first.handle(), 4, "the read must overtake the slow write");
    let mut rest = vec![c.reply().await.handle(), c.reply().await.handle(), c.reply().await.handle()];
    assert_eq!(rest.pop(), Some(3), "flush must be answered last");
    rest.sort();
    assert_eq!(rest, vec![1, 2]);

    let ev = dev.events();
    let pos = |s: &str| ev.iter().position(|e| e == s).unwrap_or_else(|| panic!("{s} missing in {ev:?}"));
    assert!(pos("write-done 0") < pos("flush"), "{ev:?}");
    assert!(pos("trim-done 8192") < pos("flush"), "{ev:?}");

    // FUA: the flush happens after the write, before the reply.
    c.request(Command::Write, cflags::FUA, 5, 100, 1, b"z").await;
    assert_eq!(c.reply().await.error(), 0);
    let ev = dev.events();
    assert_eq!(&ev[ev.len() - 2..], &["write-done 100".to_string(), "flush".to_string()]);

    // DISC with a write in flight: the write is finished and answered first.
    c.request(Command::Write, 0, 6, 200, 2, b"ok").await;
    c.request(Command::Disc, 0, 7, 0, 0, &[]).await;
    assert_eq!(c.reply().await, Rep::Simple { error: 0, handle: 6, data: vec![] });
    c.expect_eof().await;
    task.await.unwrap().unwrap();
    assert_eq!(dev.inner.slice(200, 2), b"ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_pipelined_requests() {
    let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
    let dev = Arc::new(MemDevice::from_vec(data.clone()));
    let opts = ServeOptions { max_in_flight: 8, max_in_flight_bytes: 64 << 10, ..ServeOptions::default() };
    let (mut c, task) = start(dev, opts);
    c.connect(true).await;
    let n = 500u64;
    let mut out = Vec::new();
    for h in 0..n {
        out.extend_from_slice(&proto::encode_request(&Request {
            flags: 0,
            command: Command::Read,
            handle: h,
            offset: h * 1000,
            len: 1000 + (h as u32 % 7) * 1000,
        }));
    }
    // Send everything at once while reading replies concurrently.
    let (rd, mut wr) = tokio::io::split(c.s);
    let sender = tokio::spawn(async move {
        wr.write_all(&out).await.unwrap();
        wr
    });
    let mut client = Client::new(tokio::io::join(rd, tokio::io::sink()));
    client.structured = true;
    let mut seen = std::collections::HashSet::new();
    for _ in 0..n {
        match client.reply().await {
            Rep::Chunk { ty, handle, payload, .. } => {
                assert_eq!(ty, reply::TYPE_OFFSET_DATA);
                let off = u64::from_be_bytes(payload[..8].try_into().unwrap());
                assert_eq!(off, handle * 1000);
                let len = 1000 + (handle as usize % 7) * 1000;
                assert_eq!(&payload[8..], &data[off as usize..off as usize + len]);
                assert!(seen.insert(handle));
            }
            other => panic!("{other:?}"),
        }
    }
    let wr = sender.await.unwrap();
    drop(wr);
    drop(client);
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_over_unix_socket_and_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let listener = tokio::net::UnixListener::bind(&sock).unwrap();
    let dev = mem(1 << 16, 1);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(isr_nbd::serve(listener, dev, async move {
        let _ = rx.await;
    }));
    let mut a = Client::new(tokio::net::UnixStream::connect(&sock).await.unwrap());
    let mut b = Client::new(tokio::net::UnixStream::connect(&sock).await.unwrap());
    a.connect(true).await;
    b.connect(false).await;
    b.request(Command::Read, 0, 1, 0, 2, &[]).await;
    assert_eq!(b.reply().await, Rep::Simple { error: 0, handle: 1, data: vec![1, 1] });
    tx.send(()).unwrap();
    // Both connections are closed by the server, and serve() returns.
    a.expect_eof().await;
    b.expect_eof().await;
    tokio::time::timeout(Duration::from_secs(5), server).await.unwrap().unwrap().unwrap();
}

/// A device whose zero pages are holes, whose aligned zeroing is fast, and that keeps every connection
/// consistent.
struct SparseDevice {
    mem: MemDevice,
    cached: std::sync::Mutex<Vec<(u64, u64)>>,
}

const PAGE: u64 = 4096;

#[async_trait::async_trait]
impl BlockDevice for SparseDevice {
    fn size(&self) -> u64 {
        self.mem.size()
    }
    async fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.mem.read(offset, buf).await
    }
    async fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.mem.write(offset, data).await
    }
    async fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    async fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.mem.write_zeroes(offset, len).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.mem.write_zeroes(offset, len).await
    }
    async fn write_zeroes_fast(&self, offset: u64, len: u64, _no_hole: bool) -> io::Result<()> {
        if !offset.is_multiple_of(PAGE) || !len.is_multiple_of(PAGE) {
            return Err(io::Error::new(io::ErrorKind::Unsupported, "only whole pages are fast"));
        }
        self.mem.write_zeroes(offset, len).await
    }
    async fn block_status(&self, offset: u64, len: u32) -> io::Result<Vec<proto::Extent>> {
        // One extent per page (the server merges them); the first may start mid-page.
        let mut out = Vec::new();
        let (mut pos, end) = (offset, offset + len as u64);
        while pos < end {
            let page_end = ((pos / PAGE + 1) * PAGE).min(self.size());
            let page = self.mem.slice((pos / PAGE * PAGE) as usize, (page_end - pos / PAGE * PAGE) as usize);
            let zero = page.iter().all(|&b| b == 0);
            let flags = if zero { proto::state::HOLE | proto::state::ZERO } else { 0 };
            out.push(proto::Extent { len: (page_end - pos) as u32, flags });
            pos = page_end;
        }
        Ok(out)
    }
    async fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        self.cached.lock().unwrap().push((offset, len));
        Ok(())
    }
    fn multi_conn_consistent(&self) -> bool {
        true
    }
}

fn extents(rep: Rep, handle: u64) -> Vec<(u32, u32)> {
    match rep {
        Rep::Chunk { flags, ty, handle: h, payload } if ty == reply::TYPE_BLOCK_STATUS => {
            assert_eq!((flags, h), (reply::FLAG_DONE, handle));
            let (ctx, e) = proto::parse_block_status_payload(&payload).expect("well-formed block status");
            assert_eq!(ctx, proto::BASE_ALLOCATION_ID);
            e.into_iter().map(|e| (e.len, e.flags)).collect()
        }
        other => panic!("not a block status reply: {other:?}"),
    }
}

#[tokio::test]
async fn block_status_cache_fast_zero_and_multi_conn() {
    // 64 KiB: data in pages 0 and 5, holes elsewhere.
    let mut data = vec![0u8; 16 * PAGE as usize];
    data[..100].fill(1);
    data[5 * PAGE as usize + 7] = 9;
    let dev = Arc::new(SparseDevice { mem: MemDevice::from_vec(data), cached: Default::default() });
    let (mut c, task) = start(dev.clone(), ServeOptions::default());
    let hf = c.greeting().await;
    assert_eq!(hf, proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES);
    let mut out = Vec::new();
    proto::encode_client_flags(&mut out, proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES);
    c.send(&out).await;
    c.option(opt::STRUCTURED_REPLY, &[]).await;
    assert_eq!(c.opt_reply().await.1, rep::ACK);
    c.structured = true;
    // Select base:allocation (queries for contexts we lack are ignored).
    c.option(
        opt::SET_META_CONTEXT,
        &proto::encode_meta_context_request("", &["qemu:dirty-bitmap:b", "base:allocation"]),
    )
    .await;
    assert_eq!(
        c.opt_reply().await,
        (opt::SET_META_CONTEXT, rep::META_CONTEXT, proto::rep_meta_context(1, "base:allocation"))
    );
    assert_eq!(c.opt_reply().await.1, rep::ACK);
    c.option(opt::GO, &proto::encode_info_request("", &[])).await;
    let mut flags = 0;
    loop {
        let (_, t, d) = c.opt_reply().await;
        if t == rep::ACK {
            break;
        }
        if d[..2] == info::EXPORT.to_be_bytes() {
            flags = u16::from_be_bytes([d[10], d[11]]);
        }
    }
    for f in [tflags::CAN_MULTI_CONN, tflags::SEND_CACHE, tflags::SEND_FAST_ZERO] {
        assert_ne!(flags & f, 0, "flag {f:#x} not advertised in {flags:#x}");
    }

    let (hole, data) = (proto::state::HOLE | proto::state::ZERO, 0);
    let p = PAGE as u32;
    c.request(Command::BlockStatus, 0, 1, 0, 16 * p, &[]).await;
    assert_eq!(extents(c.reply().await, 1), [(p, data), (4 * p, hole), (p, data), (10 * p, hole)]);
    // From the middle of a page, clipped to the request, and with REQ_ONE a single extent.
    c.request(Command::BlockStatus, 0, 2, 200, 2 * p, &[]).await;
    assert_eq!(extents(c.reply().await, 2), [(p - 200, data), (p + 200, hole)]);
    c.request(Command::BlockStatus, cflags::REQ_ONE, 3, 0, 16 * p, &[]).await;
    assert_eq!(extents(c.reply().await, 3), [(p, data)]);
    // Out of range or empty: EINVAL as a structured error.
    c.request(Command::BlockStatus, 0, 4, 15 * PAGE, 2 * p, &[]).await;
    assert_eq!(c.reply().await.error(), errno::EINVAL);
    c.request(Command::BlockStatus, 0, 5, 0, 0, &[]).await;
    assert_eq!(c.reply().await.error(), errno::EINVAL);

    // Cache reaches the device.
    c.request(Command::Cache, 0, 6, PAGE, 3 * p, &[]).await;
    assert_eq!(c.reply().await.error(), 0);
    assert_eq!(*dev.cached.lock().unwrap(), [(PAGE, 3 * PAGE)]);

    // Fast zero: done when the device can, ENOTSUP (and nothing changed) when it cannot, EINVAL elsewhere.
    c.request(Command::WriteZeroes, cflags::FAST_ZERO, 7, 5 * PAGE, p, &[]).await;
    assert_eq!(c.reply().await.error(), 0);
    c.request(Command::BlockStatus, 0, 8, 0, 16 * p, &[]).await;
    assert_eq!(extents(c.reply().await, 8), [(p, data), (15 * p, hole)]);
    c.request(Command::WriteZeroes, cflags::FAST_ZERO, 9, 10, 50, &[]).await;
    assert_eq!(c.reply().await.error(), errno::ENOTSUP);
    assert_eq!(dev.mem.slice(0, 100), vec![1u8; 100], "a refused fast zero changed data");
    c.request(Command::Read, cflags::FAST_ZERO, 10, 0, 10, &[]).await;
    assert_eq!(c.reply().await.error(), errno::EINVAL);

    c.request(Command::Disc, 0, 11, 0, 0, &[]).await;
    c.expect_eof().await;
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn block_status_needs_a_negotiated_context() {
    let (mut c, task) = start(mem(65536, 0), ServeOptions::default());
    c.connect(true).await;
    c.request(Command::BlockStatus, 0, 1, 0, 4096, &[]).await;
    assert_eq!(c.reply().await.error(), errno::EINVAL);
    c.request(Command::Disc, 0, 2, 0, 0, &[]).await;
    c.expect_eof().await;
    task.await.unwrap().unwrap();
}

/// MemDevice whose writes block their thread until a read has run (or 60 s pass, so that a server that
/// runs the write on the thread the read needs fails instead of hanging).
struct GatedDevice {
    inner: MemDevice,
    read_ran: (std::sync::Mutex<bool>, std::sync::Condvar),
    log: Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl BlockDevice for GatedDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    async fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read(offset, buf).await?;
        *self.read_ran.0.lock().unwrap() = true;
        self.read_ran.1.notify_all();
        Ok(())
    }
    async fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let state = {
            let ran = self.read_ran.0.lock().unwrap();
            let (ran, _) =
                self.read_ran.1.wait_timeout_while(ran, Duration::from_secs(60), |ran| !*ran).unwrap();
            if *ran {
                "after the read"
            } else {
                "without the read"
            }
        };
        self.inner.write(offset, data).await?;
        self.log.lock().unwrap().push(format!("write {offset} {state}"));
        Ok(())
    }
    async fn flush(&self) -> io::Result<()> {
        self.log.lock().unwrap().push("flush".into());
        Ok(())
    }
    async fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.trim(offset, len).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.write_zeroes(offset, len).await
    }
}

// One runtime thread: a large write that held it would keep the read behind it from running at all.
#[tokio::test(flavor = "current_thread")]
async fn large_writes_leave_the_runtime_free_and_flush_still_waits_for_them() {
    let dev = Arc::new(GatedDevice {
        inner: MemDevice::new(4 << 20),
        read_ran: Default::default(),
        log: Mutex::default(),
    });
    let opts = ServeOptions { offload_write_bytes: 64 << 10, offload_writes: 1, ..ServeOptions::default() };
    let (mut c, task) = start(dev.clone(), opts);
    c.connect(false).await;
    let big: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 253) as u8).collect();
    // A large write, then a read queued behind it, then a second large write and a flush.
    c.request(Command::Write, 0, 1, 0, big.len() as u32, &big).await;
    c.request(Command::Read, 0, 2, 2 << 20, 4096, &[]).await;
    c.request(Command::Write, 0, 3, 1 << 20, big.len() as u32, &big).await;
    c.request(Command::Flush, 0, 4, 0, 0, &[]).await;
    assert_eq!(c.reply().await.handle(), 2, "the read must be answered while the write blocks its thread");
    // The replies of the writes and of the flush may come in any order (the flush waits for the writes to
    // finish, not for their replies to be sent); the device's log shows the order that matters.
    let mut rest = [c.reply().await, c.reply().await, c.reply().await];
    rest.sort_by_key(Rep::handle);
    for (r, h) in rest.iter().zip([1, 3, 4]) {
        assert_eq!(r, &Rep::Simple { error: 0, handle: h, data: vec![] });
    }
    let log = dev.log.lock().unwrap().clone();
    assert_eq!(log.len(), 3, "{log:?}");
    assert!(log[..2].iter().all(|e| e.ends_with("after the read")), "{log:?}");
    assert_eq!(log[2], "flush", "the flush comes after both writes: {log:?}");
    assert_eq!(dev.inner.slice(0, 1 << 20), big);
    assert_eq!(dev.inner.slice(1 << 20, 1 << 20), big);
    drop(c);
    task.await.unwrap().unwrap();
}
