//! The NBD server: accept loop, handshake and the pipelined transmission phase.

use std::collections::BTreeSet;
use std::future::Future;
use std::io::{self, IoSlice};
use std::ops::Range;
use std::sync::{Arc, Mutex};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, warn};

use crate::device::{BlockDevice, ReadSpan};
use crate::proto::{self, cflags, errno, info, opt, rep, tflags, ClientOption, Command, Request};
use crate::NbdError;

/// Server configuration.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Export read-only: advertise `NBD_FLAG_READ_ONLY`, answer writes with `EPERM`.
    pub read_only: bool,
    /// Name reported by `NBD_OPT_LIST` / `NBD_INFO_NAME`. Any requested name
    /// (including the empty default name) is accepted.
    pub export_name: String,
    /// Maximum number of requests processed concurrently per connection.
    pub max_in_flight: usize,
    /// Maximum bytes of read/write payload buffered per connection.
    pub max_in_flight_bytes: usize,
    /// Maximum length of a read or write request (advertised as the maximum
    /// block size). Larger reads get `EINVAL`; larger writes close the connection.
    pub max_request_bytes: u32,
    /// Maximum length of option data during the handshake; larger options
    /// close the connection.
    pub max_option_bytes: u32,
    /// Maximum number of options during one handshake.
    pub max_options: usize,
    /// Writes of at least this many bytes run on a blocking-pool thread instead of a runtime worker
    /// (0: never). A large write's device work (for isr: encryption and the copy into the page cache)
    /// holds its thread for a millisecond or more; on a worker it also holds up the reading of the next
    /// requests from the socket, so the client stops sending and a core goes idle.
    pub offload_write_bytes: u32,
    /// At most this many offloaded writes per connection at once (the others wait their turn without a
    /// thread): the work is CPU-bound, and more threads than cores would only contend for them.
    pub offload_writes: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            read_only: false,
            export_name: String::new(),
            max_in_flight: 64,
            max_in_flight_bytes: 256 << 20,
            max_request_bytes: 32 << 20,
            max_option_bytes: 64 << 10,
            max_options: 1024,
            offload_write_bytes: 256 << 10,
            offload_writes: std::thread::available_parallelism().map_or(2, |n| n.get()),
        }
    }
}

/// Serve `device` on every connection accepted from `listener` until
/// `shutdown` completes, with default [`ServeOptions`].
pub async fn serve(
    listener: UnixListener,
    device: Arc<dyn BlockDevice>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), NbdError> {
    serve_with_options(listener, device, ServeOptions::default(), shutdown).await
}

/// Like [`serve`] with explicit options. On shutdown no new connections are
/// accepted, every connection stops reading new requests, finishes its
/// in-flight requests and is closed; then this returns.
pub async fn serve_with_options(
    listener: UnixListener,
    device: Arc<dyn BlockDevice>,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), NbdError> {
    let options = Arc::new(options);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let (r, w) = stream.into_split();
                    let dev = device.clone();
                    let opts = options.clone();
                    let stop = stop_rx.clone();
                    conns.spawn(async move {
                        if let Err(e) = run_connection(r, w, dev, opts, stop).await {
                            warn!("nbd connection ended with error: {e}");
                        }
                    });
                }
                Err(e) => {
                    warn!("nbd accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    let _ = stop_tx.send(true);
    while conns.join_next().await.is_some() {}
    Ok(())
}

/// Serve one connection over any byte stream (split internally).
pub async fn handle_connection<S>(
    stream: S,
    device: Arc<dyn BlockDevice>,
    options: Arc<ServeOptions>,
) -> Result<(), NbdError>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (r, w) = tokio::io::split(stream);
    handle_split(r, w, device, options).await
}

/// Serve one connection given its read and write halves. Returns when the
/// client disconnects (`NBD_OPT_ABORT`, `NBD_CMD_DISC` or EOF) after all
/// in-flight requests were answered, or on a fatal protocol error.
pub async fn handle_split<R, W>(
    reader: R,
    writer: W,
    device: Arc<dyn BlockDevice>,
    options: Arc<ServeOptions>,
) -> Result<(), NbdError>
where
    R: AsyncRead + Send + Unpin + 'static,
    W: AsyncWrite + Send + Unpin + 'static,
{
    let (_stop_tx, stop_rx) = watch::channel(false);
    run_connection(reader, writer, device, options, stop_rx).await
}

// ---------------------------------------------------------------- reading helpers

enum Fill {
    Data,
    Eof,
    Stop,
}

async fn stopped(rx: &mut watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

async fn fill<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    stop: &mut watch::Receiver<bool>,
) -> io::Result<Fill> {
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(64 << 10);
    }
    tokio::select! {
        biased;
        n = rd.read_buf(buf) => Ok(if n? == 0 { Fill::Eof } else { Fill::Data }),
        _ = stopped(stop) => Ok(Fill::Stop),
    }
}

// ---------------------------------------------------------------- handshake

/// What the export offers, for the transmission flags.
#[derive(Debug, Clone, Copy)]
struct Offer {
    read_only: bool,
    /// The device keeps every connection consistent (`CAN_MULTI_CONN`).
    multi_conn: bool,
}

fn transmission_flags(offer: Offer, structured: bool) -> u16 {
    let mut f = tflags::HAS_FLAGS | tflags::SEND_FLUSH | tflags::SEND_CACHE;
    if offer.read_only {
        f |= tflags::READ_ONLY;
    } else {
        f |= tflags::SEND_FUA | tflags::SEND_TRIM | tflags::SEND_WRITE_ZEROES | tflags::SEND_FAST_ZERO;
    }
    // Read-only: nothing to be inconsistent about.
    if offer.read_only || offer.multi_conn {
        f |= tflags::CAN_MULTI_CONN;
    }
    if structured {
        f |= tflags::SEND_DF;
    }
    f
}

/// What the handshake settled.
#[derive(Debug, Clone, Copy, Default)]
struct Negotiated {
    structured: bool,
    /// `base:allocation` was selected with `NBD_OPT_SET_META_CONTEXT`.
    block_status: bool,
}

/// The contexts of ours that a meta context query names: `base:` or `base:allocation`.
fn query_matches(query: &str, list: bool) -> bool {
    query == proto::BASE_ALLOCATION || (list && query == "base:")
}

/// Run the handshake. `Ok(Some(_))` means: enter transmission.
async fn handshake<R, W>(
    rd: &mut R,
    buf: &mut BytesMut,
    wr: &mut W,
    size: u64,
    offer: Offer,
    opts: &ServeOptions,
    stop: &mut watch::Receiver<bool>,
) -> Result<Option<Negotiated>, NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut out = Vec::with_capacity(256);
    proto::encode_greeting(&mut out, proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES);
    wr.write_all(&out).await?;
    wr.flush().await?;

    let client_flags = loop {
        if let Some((f, n)) = proto::parse_client_flags(buf)? {
            buf.advance(n);
            break f;
        }
        match fill(rd, buf, stop).await? {
            Fill::Data => {}
            Fill::Eof | Fill::Stop => return Ok(None),
        }
    };
    let no_zeroes = client_flags & proto::FLAG_C_NO_ZEROES != 0;
    let mut structured = false;
    let mut block_status = false;

    for _ in 0..opts.max_options {
        let (code, decoded, n) = loop {
            if let Some((raw, n)) = proto::parse_option(buf, opts.max_option_bytes)? {
                break (raw.code, ClientOption::decode(&raw), n);
            }
            match fill(rd, buf, stop).await? {
                Fill::Data => {}
                Fill::Eof => return Err(NbdError::UnexpectedEof),
                Fill::Stop => return Ok(None),
            }
        };
        buf.advance(n);
        out.clear();
        debug!(option = code, "nbd option");
        let option = match decoded {
            Ok(o) => o,
            Err(e) if code == opt::EXPORT_NAME => return Err(NbdError::InvalidExportName(e)),
            Err(e) => {
                proto::encode_option_reply(&mut out, code, rep::ERR_INVALID, e.reason.as_bytes());
                wr.write_all(&out).await?;
                continue;
            }
        };
        match option {
            ClientOption::ExportName(_name) => {
                let flags = transmission_flags(offer, structured);
                proto::encode_export_name_reply(&mut out, size, flags, no_zeroes);
                wr.write_all(&out).await?;
                wr.flush().await?;
                return Ok(Some(Negotiated { structured, block_status }));
            }
            ClientOption::Abort => {
                proto::encode_option_reply(&mut out, code, rep::ACK, &[]);
                // The client may already have closed; ignore errors.
                let _ = wr.write_all(&out).await;
                let _ = wr.flush().await;
                return Ok(None);
            }
            ClientOption::List => {
                proto::encode_option_reply(
                    &mut out,
                    code,
                    rep::SERVER,
                    &proto::rep_server(&opts.export_name),
                );
                proto::encode_option_reply(&mut out, code, rep::ACK, &[]);
            }
            ClientOption::StructuredReply => {
                if structured {
                    proto::encode_option_reply(
                        &mut out,
                        code,
                        rep::ERR_INVALID,
                        b"structured replies already negotiated",
                    );
                } else {
                    structured = true;
                    proto::encode_option_reply(&mut out, code, rep::ACK, &[]);
                }
            }
            ClientOption::ListMetaContext(req) => {
                // Every context when nothing is asked for, else those the queries name (ids are 0 in a list).
                if req.queries.is_empty() || req.queries.iter().any(|q| query_matches(q, true)) {
                    proto::encode_option_reply(
                        &mut out,
                        code,
                        rep::META_CONTEXT,
                        &proto::rep_meta_context(0, proto::BASE_ALLOCATION),
                    );
                }
                proto::encode_option_reply(&mut out, code, rep::ACK, &[]);
            }
            ClientOption::SetMetaContext(req) => {
                if !structured {
                    proto::encode_option_reply(
                        &mut out,
                        code,
                        rep::ERR_INVALID,
                        b"metadata contexts need structured replies",
                    );
                } else {
                    // A new selection replaces the previous one.
                    block_status = req.queries.iter().any(|q| query_matches(q, false));
                    if block_status {
                        proto::encode_option_reply(
                            &mut out,
                            code,
                            rep::META_CONTEXT,
                            &proto::rep_meta_context(proto::BASE_ALLOCATION_ID, proto::BASE_ALLOCATION),
                        );
                    }
                    proto::encode_option_reply(&mut out, code, rep::ACK, &[]);
                }
            }
            ClientOption::Info(req) | ClientOption::Go(req) => {
                let flags = transmission_flags(offer, structured);
                proto::encode_option_reply(&mut out, code, rep::INFO, &proto::info_export(size, flags));
                proto::encode_option_reply(
                    &mut out,
                    code,
                    rep::INFO,
                    &proto::info_block_size(1, 4096, opts.max_request_bytes),
                );
                if req.requests.contains(&info::NAME) {
                    proto::encode_option_reply(
                        &mut out,
                        code,
                        rep::INFO,
                        &proto::info_name(&opts.export_name),
                    );
                }
                proto::encode_option_reply(&mut out, code, rep::ACK, &[]);
                if code == opt::GO {
                    wr.write_all(&out).await?;
                    wr.flush().await?;
                    return Ok(Some(Negotiated { structured, block_status }));
                }
            }
            ClientOption::Unsupported(_) => {
                proto::encode_option_reply(&mut out, code, rep::ERR_UNSUP, &[]);
            }
        }
        wr.write_all(&out).await?;
        wr.flush().await?;
    }
    Err(NbdError::TooManyOptions)
}

// ---------------------------------------------------------------- buffers, replies

/// Per-connection pool of payload buffers.
#[derive(Debug, Default)]
struct BufPool {
    bufs: Mutex<Vec<Vec<u8>>>,
}

const POOL_MAX_BUFS: usize = 64;
const POOL_MAX_BUF_BYTES: usize = 4 << 20;

impl BufPool {
    fn get(&self, len: usize) -> Vec<u8> {
        let mut v = self.bufs.lock().unwrap_or_else(|e| e.into_inner()).pop().unwrap_or_default();
        // Only growth is zero-filled; the device overwrites the whole buffer.
        v.resize(len, 0);
        v
    }
    fn put(&self, v: Vec<u8>) {
        if v.capacity() == 0 || v.capacity() > POOL_MAX_BUF_BYTES {
            return;
        }
        let mut bufs = self.bufs.lock().unwrap_or_else(|e| e.into_inner());
        if bufs.len() < POOL_MAX_BUFS {
            bufs.push(v);
        }
    }
}

enum Body {
    None,
    Pooled(Vec<u8>),
    Owned(Vec<u8>),
}

/// One reply, written by the [`ReplySink`]. Holding the permits until the
/// reply is on the wire bounds the memory of queued replies.
struct Outgoing {
    head: [u8; 32],
    head_len: u8,
    body: Body,
    /// A scattered read's reply: structured chunks, each a header and its bytes (from `body` or a buffer of
    /// the device's; none for a hole), sent after `head` in place of the whole body.
    pieces: Vec<Piece>,
    _permit: Option<OwnedSemaphorePermit>,
    _bytes: Option<OwnedSemaphorePermit>,
}

/// One part of a scattered read's reply: a chunk header (`head_len` 0 for the further bytes of a data chunk
/// that comes from more than one buffer) and the bytes that follow it.
struct Piece {
    head: [u8; 32],
    head_len: u8,
    data: PieceData,
}

enum PieceData {
    None,
    /// A range of the reply's `body`.
    Body(Range<usize>),
    /// A buffer the device held already ([`ReadSpan::Shared`]).
    Shared(Bytes),
}

impl Outgoing {
    fn new(head: &[u8], body: Body) -> Self {
        let mut h = [0u8; 32];
        h[..head.len()].copy_from_slice(head);
        Outgoing {
            head: h,
            head_len: head.len() as u8,
            body,
            pieces: Vec::new(),
            _permit: None,
            _bytes: None,
        }
    }

    /// The reply to a structured read of `len` bytes at `offset` that the device answered with `spans`
    /// (bytes of `buf`, holes, buffers of its own): an `OFFSET_DATA` chunk per run of data spans (its bytes
    /// written from where they are) and an `OFFSET_HOLE` chunk per hole, in order, the last one flagged
    /// done. `Err(buf)` when the spans do not cover exactly `len` bytes, or one is empty.
    fn scattered_read(
        handle: u64,
        offset: u64,
        buf: Vec<u8>,
        spans: Vec<ReadSpan>,
        len: u32,
    ) -> Result<Self, Vec<u8>> {
        let total = spans.iter().try_fold(0usize, |at, s| (!s.is_empty()).then(|| at + s.len()));
        if total != Some(len as usize) || buf.len() != len as usize {
            return Err(buf);
        }
        if let [ReadSpan::Buffer(_)] = spans[..] {
            return Ok(Outgoing::new(
                &proto::encode_offset_data_header(handle, offset, len),
                Body::Pooled(buf),
            ));
        }
        // The reply's chunks: each a hole or a run of data spans, with its number of spans and its bytes.
        let mut chunks: Vec<(bool, usize, Range<usize>)> = Vec::new();
        let mut at = 0;
        for s in &spans {
            let hole = matches!(s, ReadSpan::Hole(_));
            match chunks.last_mut() {
                Some((false, count, bytes)) if !hole => {
                    *count += 1;
                    bytes.end += s.len();
                }
                _ => chunks.push((hole, 1, at..at + s.len())),
            }
            at += s.len();
        }
        let last = chunks.len() - 1;
        let mut pieces = Vec::with_capacity(spans.len() + chunks.len());
        let mut spans = spans.into_iter();
        for (c, (hole, count, bytes)) in chunks.into_iter().enumerate() {
            let flags = if c == last { proto::reply::FLAG_DONE } else { 0 };
            let (pos, n) = (offset + bytes.start as u64, bytes.len() as u32);
            let mut head = [0u8; 32];
            if hole {
                head.copy_from_slice(&proto::encode_offset_hole(flags, handle, pos, n));
                pieces.push(Piece { head, head_len: 32, data: PieceData::None });
                spans.next();
                continue;
            }
            let h = proto::encode_offset_data_chunk_header(flags, handle, pos, n);
            head[..h.len()].copy_from_slice(&h);
            // The chunk's header goes before its first span only.
            let mut head_len = h.len() as u8;
            let mut at = bytes.start;
            for s in spans.by_ref().take(count) {
                let n = s.len();
                let data = match s {
                    ReadSpan::Buffer(_) => PieceData::Body(at..at + n),
                    ReadSpan::Shared(b) => PieceData::Shared(b),
                    ReadSpan::Hole(_) => unreachable!("a run of data spans holds no hole"),
                };
                at += n;
                pieces.push(Piece { head, head_len, data });
                head_len = 0;
            }
        }
        Ok(Outgoing {
            head: [0; 32],
            head_len: 0,
            body: Body::Pooled(buf),
            pieces,
            _permit: None,
            _bytes: None,
        })
    }

    fn body(&self) -> &[u8] {
        match &self.body {
            Body::None => &[],
            Body::Pooled(v) | Body::Owned(v) => v,
        }
    }
}

async fn write_batch<W: AsyncWrite + Unpin + ?Sized>(wr: &mut W, batch: &[Outgoing]) -> io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(batch.len() * 2);
    for o in batch {
        if o.head_len > 0 {
            slices.push(IoSlice::new(&o.head[..o.head_len as usize]));
        }
        let b = o.body();
        if o.pieces.is_empty() {
            if !b.is_empty() {
                slices.push(IoSlice::new(b));
            }
            continue;
        }
        for p in &o.pieces {
            if p.head_len > 0 {
                slices.push(IoSlice::new(&p.head[..p.head_len as usize]));
            }
            match &p.data {
                PieceData::None => {}
                PieceData::Body(r) => slices.push(IoSlice::new(&b[r.clone()])),
                PieceData::Shared(bytes) => slices.push(IoSlice::new(bytes)),
            }
        }
    }
    let mut rest: &mut [IoSlice<'_>] = &mut slices;
    while !rest.is_empty() {
        let n = wr.write_vectored(rest).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut rest, n);
    }
    Ok(())
}

type BoxWriter = std::pin::Pin<Box<dyn AsyncWrite + Send>>;

/// Reply sink shared by all request tasks of a connection. Whoever finds the
/// socket free writes every queued reply in one vectored write ("combining"),
/// so a reply normally goes out from the task that produced it without a
/// hand-off to a writer task.
struct ReplySink {
    queue: Mutex<Vec<Outgoing>>,
    writer: tokio::sync::Mutex<Option<BoxWriter>>,
    pool: Arc<BufPool>,
}

impl ReplySink {
    fn new(wr: BoxWriter, pool: Arc<BufPool>) -> Self {
        ReplySink {
            queue: Mutex::new(Vec::with_capacity(64)),
            writer: tokio::sync::Mutex::new(Some(wr)),
            pool,
        }
    }

    fn take_queue(&self, into: &mut Vec<Outgoing>) {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::swap(&mut *q, into);
    }

    fn queue_is_empty(&self) -> bool {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).is_empty()
    }

    async fn send(&self, out: Outgoing) {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).push(out);
        let mut batch = Vec::new();
        loop {
            // If the socket is busy, its holder will pick our reply up.
            let Ok(mut guard) = self.writer.try_lock() else { return };
            loop {
                self.take_queue(&mut batch);
                if batch.is_empty() {
                    break;
                }
                if let Some(wr) = guard.as_mut() {
                    if let Err(e) = write_batch(wr, &batch).await {
                        debug!("nbd reply write failed: {e}");
                        *guard = None; // connection broken: drop further replies
                    }
                }
                for o in batch.drain(..) {
                    if let Body::Pooled(v) = o.body {
                        self.pool.put(v);
                    }
                }
            }
            drop(guard);
            // A reply queued after our last check but before we unlocked?
            if self.queue_is_empty() {
                return;
            }
        }
    }

    async fn close(&self) {
        let mut guard = self.writer.lock().await;
        if let Some(mut wr) = guard.take() {
            let _ = wr.flush().await;
            let _ = wr.shutdown().await;
        }
    }
}

// ---------------------------------------------------------------- write ordering

/// Tracks in-flight write-type requests by arrival order so that a FLUSH can
/// wait for exactly the writes received before it.
#[derive(Debug, Default)]
struct WriteTracker {
    state: Mutex<(u64, BTreeSet<u64>)>,
    notify: Notify,
}

struct WriteToken {
    tracker: Arc<WriteTracker>,
    seq: u64,
}

impl Drop for WriteToken {
    fn drop(&mut self) {
        self.tracker.state.lock().unwrap_or_else(|e| e.into_inner()).1.remove(&self.seq);
        self.tracker.notify.notify_waiters();
    }
}

impl WriteTracker {
    fn begin(self: &Arc<Self>) -> WriteToken {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let seq = st.0;
        st.0 += 1;
        st.1.insert(seq);
        WriteToken { tracker: self.clone(), seq }
    }
    fn barrier(&self) -> u64 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).0
    }
    fn drained(&self, barrier: u64) -> bool {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.1.first().is_none_or(|&s| s >= barrier)
    }
    async fn wait(&self, barrier: u64) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.drained(barrier) {
                return;
            }
            notified.await;
        }
    }
}

// ---------------------------------------------------------------- transmission

struct Conn {
    dev: Arc<dyn BlockDevice>,
    structured: bool,
    block_status: bool,
    pool: Arc<BufPool>,
    writes: Arc<WriteTracker>,
    sink: ReplySink,
}

impl Conn {
    fn error_reply(&self, req: &Request, error: u32, msg: &str) -> Outgoing {
        if self.structured && matches!(req.command, Command::Read | Command::BlockStatus) {
            let mut v = Vec::with_capacity(32 + msg.len());
            proto::encode_structured_error(&mut v, req.handle, error, msg);
            Outgoing::new(&[], Body::Owned(v))
        } else {
            Outgoing::new(&proto::encode_simple_reply(error, req.handle), Body::None)
        }
    }

    fn ok_reply(&self, req: &Request) -> Outgoing {
        Outgoing::new(&proto::encode_simple_reply(0, req.handle), Body::None)
    }

    fn io_error_reply(&self, req: &Request, e: &io::Error) -> Outgoing {
        debug!(handle = req.handle, ?req.command, "device error: {e}");
        self.error_reply(req, proto::io_error_to_errno(e), &e.to_string())
    }

    async fn flush_if_fua(&self, req: &Request) -> io::Result<()> {
        if req.flags & cflags::FUA != 0 {
            self.dev.flush().await
        } else {
            Ok(())
        }
    }

    async fn execute(
        &self,
        req: Request,
        payload: Vec<u8>,
        token: Option<WriteToken>,
        barrier: u64,
    ) -> Outgoing {
        let out = match req.command {
            Command::Read if self.structured && req.len > 0 && req.flags & cflags::DF == 0 => {
                let (buf, r) = self.dev.read_scattered(req.offset, payload).await;
                match r {
                    Err(e) => {
                        self.pool.put(buf);
                        self.io_error_reply(&req, &e)
                    }
                    Ok(_) if buf.len() != req.len as usize => {
                        self.pool.put(buf);
                        self.error_reply(&req, errno::EIO, "device returned a short buffer")
                    }
                    Ok(spans) => {
                        match Outgoing::scattered_read(req.handle, req.offset, buf, spans, req.len) {
                            Ok(out) => out,
                            Err(buf) => {
                                self.pool.put(buf);
                                self.error_reply(&req, errno::EIO, "device returned malformed read spans")
                            }
                        }
                    }
                }
            }
            Command::Read => {
                let (buf, r) = self.dev.read_owned(req.offset, payload).await;
                match r {
                    Err(e) => {
                        self.pool.put(buf);
                        self.io_error_reply(&req, &e)
                    }
                    Ok(()) if buf.len() != req.len as usize => {
                        self.pool.put(buf);
                        self.error_reply(&req, errno::EIO, "device returned a short buffer")
                    }
                    Ok(()) if self.structured && req.len == 0 => {
                        self.pool.put(buf);
                        Outgoing::new(&proto::encode_structured_none(req.handle), Body::None)
                    }
                    Ok(()) if self.structured => Outgoing::new(
                        &proto::encode_offset_data_header(req.handle, req.offset, req.len),
                        Body::Pooled(buf),
                    ),
                    Ok(()) => Outgoing::new(&proto::encode_simple_reply(0, req.handle), Body::Pooled(buf)),
                }
            }
            Command::Write => {
                let (buf, r) = self.dev.write_owned(req.offset, payload).await;
                self.pool.put(buf);
                self.finish_write(&req, r).await
            }
            Command::Trim => {
                let r = self.dev.trim(req.offset, req.len as u64).await;
                self.finish_write(&req, r).await
            }
            Command::WriteZeroes if req.flags & cflags::FAST_ZERO != 0 => {
                let no_hole = req.flags & cflags::NO_HOLE != 0;
                let r = self.dev.write_zeroes_fast(req.offset, req.len as u64, no_hole).await;
                self.finish_write(&req, r).await
            }
            Command::WriteZeroes => {
                let r = if req.flags & cflags::NO_HOLE != 0 {
                    self.dev.write_zeroes_no_hole(req.offset, req.len as u64).await
                } else {
                    self.dev.write_zeroes(req.offset, req.len as u64).await
                };
                self.finish_write(&req, r).await
            }
            Command::Flush => {
                self.writes.wait(barrier).await;
                match self.dev.flush().await {
                    Ok(()) => self.ok_reply(&req),
                    Err(e) => self.io_error_reply(&req, &e),
                }
            }
            Command::Cache => match self.dev.cache(req.offset, req.len as u64).await {
                Ok(()) => self.ok_reply(&req),
                Err(e) => self.io_error_reply(&req, &e),
            },
            Command::BlockStatus if !self.block_status => {
                self.error_reply(&req, errno::EINVAL, "no metadata context was negotiated")
            }
            Command::BlockStatus => match self.dev.block_status(req.offset, req.len).await {
                Ok(extents) => {
                    let extents = normalize_extents(extents, req.len, req.flags & cflags::REQ_ONE != 0);
                    if extents.is_empty() {
                        self.error_reply(&req, errno::EIO, "device returned no extent")
                    } else {
                        let mut v = Vec::with_capacity(24 + 8 * extents.len());
                        proto::encode_block_status(&mut v, req.handle, proto::BASE_ALLOCATION_ID, &extents);
                        Outgoing::new(&[], Body::Owned(v))
                    }
                }
                Err(e) => self.io_error_reply(&req, &e),
            },
            Command::Disc | Command::Unknown(_) => {
                self.error_reply(&req, errno::EINVAL, "unexpected command")
            }
        };
        drop(token);
        out
    }

    async fn finish_write(&self, req: &Request, r: io::Result<()>) -> Outgoing {
        match r.and(self.flush_if_fua(req).await) {
            Ok(()) => self.ok_reply(req),
            Err(e) => self.io_error_reply(req, &e),
        }
    }
}

/// At most this many extents in one block status reply.
const MAX_EXTENTS: usize = 1 << 16;

/// Block status extents as they go on the wire: no empty ones, adjacent ones with the same flags merged,
/// none past `len` (the request's length), at most [`MAX_EXTENTS`] (one with `req_one`).
fn normalize_extents(extents: Vec<proto::Extent>, len: u32, req_one: bool) -> Vec<proto::Extent> {
    let mut out: Vec<proto::Extent> = Vec::new();
    let mut left = len;
    for e in extents {
        let n = e.len.min(left);
        if n == 0 {
            continue;
        }
        left -= n;
        let full = out.len() >= MAX_EXTENTS;
        match out.last_mut() {
            Some(last) if last.flags == e.flags => last.len += n,
            _ if full => break,
            _ => out.push(proto::Extent { len: n, flags: e.flags }),
        }
        if left == 0 {
            break;
        }
    }
    if req_one {
        out.truncate(1);
    }
    out
}

/// Validate a request against the export; `Some((errno, message))` to reject.
fn validate(req: &Request, size: u64, read_only: bool, max_request: u32) -> Option<(u32, &'static str)> {
    match req.command {
        Command::Unknown(_) => return Some((errno::EINVAL, "unsupported command")),
        Command::Disc | Command::Flush => return None,
        _ => {}
    }
    if req.flags & cflags::FAST_ZERO != 0 && req.command != Command::WriteZeroes {
        return Some((errno::EINVAL, "fast zero applies to write zeroes only"));
    }
    if req.command == Command::BlockStatus && req.len == 0 {
        return Some((errno::EINVAL, "block status of an empty range"));
    }
    if read_only && req.command.is_write() {
        return Some((errno::EPERM, "export is read-only"));
    }
    if req.command == Command::Read && req.len > max_request {
        return Some((errno::EINVAL, "request length exceeds maximum block size"));
    }
    let in_bounds = req.offset.checked_add(req.len as u64).is_some_and(|end| end <= size);
    if !in_bounds {
        if req.command == Command::Write {
            return Some((errno::ENOSPC, "write beyond end of export"));
        }
        return Some((errno::EINVAL, "request beyond end of export"));
    }
    None
}

async fn run_connection<R, W>(
    mut rd: R,
    mut wr: W,
    device: Arc<dyn BlockDevice>,
    opts: Arc<ServeOptions>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), NbdError>
where
    R: AsyncRead + Send + Unpin + 'static,
    W: AsyncWrite + Send + Unpin + 'static,
{
    let size = device.size();
    let mut buf = BytesMut::with_capacity(128 << 10);
    let offer = Offer { read_only: opts.read_only, multi_conn: device.multi_conn_consistent() };
    let negotiated = match handshake(&mut rd, &mut buf, &mut wr, size, offer, &opts, &mut stop).await? {
        Some(n) => n,
        None => return Ok(()),
    };
    let Negotiated { structured, block_status } = negotiated;
    debug!(structured, block_status, size, "nbd transmission phase");

    let pool = Arc::new(BufPool::default());
    let sink = ReplySink::new(Box::pin(wr), pool.clone());
    let conn = Arc::new(Conn { dev: device, structured, block_status, pool, writes: Arc::default(), sink });

    let max_in_flight = opts.max_in_flight.clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
    let slots = Arc::new(Semaphore::new(max_in_flight));
    const UNIT: usize = 4096;
    let byte_units = opts.max_in_flight_bytes.max(opts.max_request_bytes as usize).div_ceil(UNIT).max(1);
    let byte_units = byte_units.min(u32::MAX as usize).min(Semaphore::MAX_PERMITS);
    let bytes = Arc::new(Semaphore::new(byte_units));
    let offload = Arc::new(Semaphore::new(opts.offload_writes.clamp(1, Semaphore::MAX_PERMITS)));
    let limits = Limits { slots, bytes, offload };

    let result = read_requests(&mut rd, &mut buf, &conn, &opts, size, &limits, &mut stop).await;

    // Finish everything in flight, then close the writer.
    let _all = limits.slots.acquire_many(max_in_flight as u32).await;
    conn.sink.close().await;
    result
}

/// A connection's limits on the requests it runs at once.
struct Limits {
    /// One permit per request in flight.
    slots: Arc<Semaphore>,
    /// One permit per 4 KiB of read or write payload in flight.
    bytes: Arc<Semaphore>,
    /// One permit per write running on a blocking-pool thread.
    offload: Arc<Semaphore>,
}

async fn read_requests<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    conn: &Arc<Conn>,
    opts: &ServeOptions,
    size: u64,
    limits: &Limits,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), NbdError> {
    let Limits { slots, bytes, offload } = limits;
    const UNIT: usize = 4096;
    loop {
        let req = loop {
            if let Some((req, n)) = proto::parse_request(buf, opts.max_request_bytes)? {
                buf.advance(n);
                break req;
            }
            match fill(rd, buf, stop).await? {
                Fill::Data => {}
                Fill::Eof if buf.is_empty() => return Ok(()),
                Fill::Eof => return Err(NbdError::UnexpectedEof),
                Fill::Stop => return Ok(()),
            }
        };
        if req.command == Command::Disc {
            debug!("nbd client disconnect");
            return Ok(());
        }
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return Ok(());
        };
        let data_len = match req.command {
            Command::Write => req.len as usize,
            Command::Read if req.len <= opts.max_request_bytes => req.len as usize,
            _ => 0,
        };
        let byte_permit = if data_len > 0 {
            let units = data_len.div_ceil(UNIT) as u32;
            bytes.clone().acquire_many_owned(units).await.ok()
        } else {
            None
        };

        let rejected = validate(&req, size, opts.read_only, opts.max_request_bytes);
        // Receive the write payload straight into a pooled buffer (even when
        // the request is rejected, to stay in sync with the stream).
        let mut payload = Vec::new();
        if req.command == Command::Write {
            payload = conn.pool.get(data_len);
            let have = buf.len().min(data_len);
            payload[..have].copy_from_slice(&buf[..have]);
            buf.advance(have);
            if have < data_len {
                match rd.read_exact(&mut payload[have..]).await {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                        return Err(NbdError::UnexpectedEof)
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        } else if req.command == Command::Read && rejected.is_none() {
            payload = conn.pool.get(data_len);
        }

        if let Some((err, msg)) = rejected {
            debug!(handle = req.handle, ?req.command, offset = req.offset, len = req.len, "rejected: {msg}");
            conn.pool.put(payload);
            let mut out = conn.error_reply(&req, err, msg);
            out._permit = Some(permit);
            out._bytes = byte_permit;
            conn.sink.send(out).await;
            continue;
        }

        let (token, barrier) = match req.command {
            c if c.is_write() => (Some(conn.writes.begin()), 0),
            Command::Flush => (None, conn.writes.barrier()),
            _ => (None, 0),
        };
        let conn = conn.clone();
        let offload = (req.command == Command::Write
            && opts.offload_write_bytes > 0
            && req.len >= opts.offload_write_bytes)
            .then(|| offload.clone());
        tokio::spawn(async move {
            let mut out = match offload {
                None => conn.execute(req, payload, token, barrier).await,
                Some(offload) => {
                    let Ok(_turn) = offload.acquire_owned().await else { return };
                    let runtime = tokio::runtime::Handle::current();
                    let c = conn.clone();
                    let job = move || runtime.block_on(c.execute(req, payload, token, barrier));
                    match tokio::task::spawn_blocking(job).await {
                        Ok(out) => out,
                        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                        // The runtime is shutting down: no reply (the request's permits go with it).
                        Err(_) => return,
                    }
                }
            };
            out._permit = Some(permit);
            out._bytes = byte_permit;
            conn.sink.send(out).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Write `out` as the server would and parse it back as a client: the read's bytes (zeroes for holes),
    /// after checking the chunks are in order, cover the read, never empty, the last one alone flagged done.
    fn reply_bytes(out: &Outgoing, handle: u64, offset: u64, len: usize) -> Vec<u8> {
        let mut wire = Vec::new();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(write_batch(&mut wire, std::slice::from_ref(out))).unwrap();
        let mut got = Vec::with_capacity(len);
        let mut rest = &wire[..];
        loop {
            let (rep, used) = proto::parse_reply(rest, u32::MAX - 8).unwrap().expect("a whole chunk");
            let proto::ReplyHeader::Structured { flags, ty, handle: h, payload } = rep else {
                panic!("a structured read answered with a simple reply")
            };
            assert_eq!(h, handle);
            let at = u64::from_be_bytes(payload[..8].try_into().unwrap());
            assert_eq!(at, offset + got.len() as u64, "chunks in order, none missing");
            match ty {
                proto::reply::TYPE_OFFSET_DATA => {
                    assert!(payload.len() > 8, "an empty data chunk");
                    got.extend_from_slice(&payload[8..]);
                }
                proto::reply::TYPE_OFFSET_HOLE => {
                    let n = u32::from_be_bytes(payload[8..12].try_into().unwrap()) as usize;
                    assert!(n > 0, "an empty hole");
                    got.resize(got.len() + n, 0);
                }
                other => panic!("chunk type {other}"),
            }
            rest = &rest[used..];
            if flags & proto::reply::FLAG_DONE != 0 {
                assert!(rest.is_empty(), "bytes after the chunk flagged done");
                return got;
            }
            assert!(!rest.is_empty(), "no chunk flagged done");
        }
    }

    /// A span kind (0 buffer, 1 hole, 2 shared) and a length, in bytes.
    fn spans_strategy() -> impl Strategy<Value = Vec<(u8, u16)>> {
        proptest::collection::vec((0u8..3, 1u16..3000), 1..12)
    }

    proptest! {
        #[test]
        fn a_scattered_reply_carries_exactly_the_spans_bytes(kinds in spans_strategy(), offset in 0u64..1 << 40) {
            let len: usize = kinds.iter().map(|&(_, n)| n as usize).sum();
            // The device's view: byte i of the read is i * 7 + 1 (never 0) except in holes.
            let byte = |i: usize| (i * 7 % 255 + 1) as u8;
            let mut buf = vec![0xeeu8; len];
            let (mut spans, mut expect, mut at) = (Vec::new(), Vec::with_capacity(len), 0);
            for &(kind, n) in &kinds {
                let n = n as usize;
                let bytes: Vec<u8> = (at..at + n).map(byte).collect();
                match kind {
                    0 => {
                        buf[at..at + n].copy_from_slice(&bytes);
                        spans.push(ReadSpan::Buffer(n as u32));
                        expect.extend_from_slice(&bytes);
                    }
                    1 => {
                        spans.push(ReadSpan::Hole(n as u32));
                        expect.resize(expect.len() + n, 0);
                    }
                    _ => {
                        spans.push(ReadSpan::Shared(Bytes::from(bytes.clone())));
                        expect.extend_from_slice(&bytes);
                    }
                }
                at += n;
            }
            let out = Outgoing::scattered_read(9, offset, buf, spans.clone(), len as u32)
                .unwrap_or_else(|_| panic!("valid spans refused"));
            prop_assert_eq!(reply_bytes(&out, 9, offset, len), expect);
            // Spans that fall short of the read, or run past it, are refused.
            prop_assert!(Outgoing::scattered_read(9, offset, vec![0; len + 1], spans.clone(), len as u32 + 1).is_err());
            if len > 1 {
                prop_assert!(Outgoing::scattered_read(9, offset, vec![0; len - 1], spans, len as u32 - 1).is_err());
            }
        }
    }

    #[test]
    fn an_empty_span_is_refused() {
        let spans = vec![ReadSpan::Buffer(4), ReadSpan::Hole(0), ReadSpan::Buffer(4)];
        assert!(Outgoing::scattered_read(1, 0, vec![0; 8], spans, 8).is_err());
    }
}
