//! The block device abstraction served over NBD, plus two simple
//! implementations: [`MemDevice`] (tests, examples) and [`FileDevice`]
//! (a raw image file, used by the benchmark).

use std::io;
use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, RwLock};

/// A virtual disk exported over NBD.
///
/// The server never issues a request that extends beyond [`size`](Self::size)
/// (such requests are answered with `EINVAL`/`ENOSPC` before reaching the
/// device), so implementations may assume `offset + len <= size()`.
///
/// Requests may be issued concurrently (up to the server's in-flight limit
/// per connection); the server only orders `flush` after the writes it must
/// cover. Errors are mapped to NBD error codes with
/// [`proto::io_error_to_errno`](crate::proto::io_error_to_errno): `EIO` by
/// default, `EINVAL` for `InvalidInput`, `ENOSPC` for `StorageFull`, `EPERM`
/// for `PermissionDenied`/`ReadOnlyFilesystem`, or the matching raw OS error.
///
/// The `*_owned` methods have default implementations in terms of the
/// required methods; a device whose I/O runs on another thread (e.g. through
/// `spawn_blocking`) can override them to avoid copying the buffer, since the
/// server always calls the owned variants.
#[async_trait::async_trait]
pub trait BlockDevice: Send + Sync + 'static {
    /// Export size in bytes.
    fn size(&self) -> u64;
    /// Fill `buf` from `offset`. An Err fails only this request (EIO to the
    /// guest), never returns wrong data.
    async fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Write `data` at `offset`.
    async fn write(&self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Make every acknowledged write durable.
    async fn flush(&self) -> io::Result<()>;
    /// Discard a range (contents afterwards are unspecified but stable).
    async fn trim(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Make a range read as zeroes; may deallocate.
    async fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()>;

    /// Like [`write_zeroes`](Self::write_zeroes) but the range must stay
    /// allocated (`NBD_CMD_FLAG_NO_HOLE`). The default calls `write_zeroes`;
    /// override it if `write_zeroes` punches holes.
    async fn write_zeroes_no_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len).await
    }

    /// Zero a range only if that is cheaper than writing zeroes (`NBD_CMD_FLAG_FAST_ZERO`); otherwise fail
    /// with `ErrorKind::Unsupported` (sent as `ENOTSUP`) before changing anything, so that the client
    /// writes the zeroes itself. `no_hole` as for [`write_zeroes_no_hole`](Self::write_zeroes_no_hole).
    /// Default: never fast.
    async fn write_zeroes_fast(&self, _offset: u64, _len: u64, _no_hole: bool) -> io::Result<()> {
        Err(io::Error::new(io::ErrorKind::Unsupported, "fast zero not supported by this device"))
    }

    /// Allocation of `len` bytes at `offset` for the `base:allocation` metadata context: extents in order
    /// from `offset`, covering at least its first byte (the server merges, clips and limits them). Default:
    /// all data.
    async fn block_status(&self, _offset: u64, len: u32) -> io::Result<Vec<crate::proto::Extent>> {
        Ok(vec![crate::proto::Extent { len, flags: 0 }])
    }

    /// Bring a range into whatever the device keeps locally (`NBD_CMD_CACHE`), replying once it is there.
    /// Default: nothing to do (the data is local).
    async fn cache(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }

    /// True when a flush on one connection makes the writes completed on every connection durable, and
    /// every connection reads what any other wrote (`NBD_FLAG_CAN_MULTI_CONN`). Default: false.
    fn multi_conn_consistent(&self) -> bool {
        false
    }

    /// Owned-buffer read: fill all of `buf` from `offset` and hand it back.
    async fn read_owned(&self, offset: u64, mut buf: Vec<u8>) -> (Vec<u8>, io::Result<()>) {
        let r = self.read(offset, &mut buf).await;
        (buf, r)
    }

    /// Owned-buffer read for a structured reply, which may leave out what reads as zeroes: fill `buf` from
    /// `offset` except, if the device likes, ranges that read as zeroes, and return those ranges (relative to
    /// `offset`, in order, apart, within `buf`). The server sends them as holes (`NBD_REPLY_TYPE_OFFSET_HOLE`),
    /// without their bytes. Default: no holes ([`read_owned`](Self::read_owned)).
    async fn read_sparse_owned(&self, offset: u64, buf: Vec<u8>) -> (Vec<u8>, io::Result<Vec<Range<u32>>>) {
        let (buf, r) = self.read_owned(offset, buf).await;
        (buf, r.map(|()| Vec::new()))
    }

    /// Owned-buffer read for a structured reply whose bytes may stay where the device holds them already:
    /// spans covering the read in order, each bytes of `buf` at the same position, a hole (reads as zeroes,
    /// sent without bytes) or a buffer of the device's own (sent from there: no copy into `buf`). The
    /// server writes them with one vectored write. Default: [`read_sparse_owned`](Self::read_sparse_owned),
    /// its holes as holes and the rest from `buf`.
    async fn read_scattered(&self, offset: u64, buf: Vec<u8>) -> (Vec<u8>, io::Result<Vec<ReadSpan>>) {
        let (buf, r) = self.read_sparse_owned(offset, buf).await;
        let spans = r.and_then(|holes| {
            spans_of_holes(&holes, buf.len())
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "device returned malformed holes"))
        });
        (buf, spans)
    }

    /// Owned-buffer write: write all of `data` at `offset` and hand it back.
    async fn write_owned(&self, offset: u64, data: Vec<u8>) -> (Vec<u8>, io::Result<()>) {
        let r = self.write(offset, &data).await;
        (data, r)
    }
}

/// One part of a scattered read ([`BlockDevice::read_scattered`]), in the request's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadSpan {
    /// The next this many bytes are in the read's buffer, at the same position.
    Buffer(u32),
    /// The next this many bytes read as zeroes: a hole, sent without its bytes.
    Hole(u32),
    /// The next bytes are these, which the device holds already: sent from here, not copied into the buffer.
    Shared(bytes::Bytes),
}

impl ReadSpan {
    /// How many bytes of the read this span covers.
    pub fn len(&self) -> usize {
        match self {
            ReadSpan::Buffer(n) | ReadSpan::Hole(n) => *n as usize,
            ReadSpan::Shared(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The spans of a read of `len` bytes whose `holes` read as zeroes and whose other bytes are in the buffer;
/// `None` unless the holes are in order, apart, none empty and none past `len`.
pub fn spans_of_holes(holes: &[Range<u32>], len: usize) -> Option<Vec<ReadSpan>> {
    let mut spans = Vec::with_capacity(2 * holes.len() + 1);
    let mut at = 0usize;
    for h in holes {
        let (start, end) = (h.start as usize, h.end as usize);
        if start < at || start >= end || end > len {
            return None;
        }
        if start > at {
            spans.push(ReadSpan::Buffer((start - at) as u32));
        }
        spans.push(ReadSpan::Hole(h.end - h.start));
        at = end;
    }
    if at < len {
        spans.push(ReadSpan::Buffer(u32::try_from(len - at).ok()?));
    }
    Some(spans)
}

fn check_range(size: u64, offset: u64, len: u64) -> io::Result<(usize, usize)> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok((offset as usize, end as usize)),
        _ => Err(io::Error::new(io::ErrorKind::InvalidInput, "range beyond end of device")),
    }
}

/// The runs of whole zero blocks of `block` bytes in `buf` (blocks counted from its start; a shorter last
/// block counts too), merged, for [`BlockDevice::read_sparse_owned`].
pub fn zero_runs(buf: &[u8], block: usize) -> Vec<Range<u32>> {
    let mut runs: Vec<Range<u32>> = Vec::new();
    for (k, b) in buf.chunks(block.max(1)).enumerate() {
        if b.iter().any(|&x| x != 0) {
            continue;
        }
        let start = (k * block) as u32;
        let end = start + b.len() as u32;
        match runs.last_mut() {
            Some(r) if r.end == start => r.end = end,
            _ => runs.push(start..end),
        }
    }
    runs
}

/// An in-memory device (a `Vec<u8>` behind a lock).
#[derive(Debug, Default)]
pub struct MemDevice {
    data: RwLock<Vec<u8>>,
    /// Report zero 4 KiB blocks of a read as holes.
    sparse: bool,
}

impl MemDevice {
    /// A zero-filled device of `size` bytes.
    pub fn new(size: usize) -> Self {
        Self::from_vec(vec![0; size])
    }
    /// A device with the given contents.
    pub fn from_vec(data: Vec<u8>) -> Self {
        MemDevice { data: RwLock::new(data), sparse: false }
    }
    /// A device with the given contents whose structured reads send zero 4 KiB blocks as holes.
    pub fn sparse(data: Vec<u8>) -> Self {
        MemDevice { data: RwLock::new(data), sparse: true }
    }
    /// A copy of the current contents.
    pub fn contents(&self) -> Vec<u8> {
        self.data.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
    /// A copy of `len` bytes at `offset` (panics if out of range).
    pub fn slice(&self, offset: usize, len: usize) -> Vec<u8> {
        self.data.read().unwrap_or_else(|e| e.into_inner())[offset..offset + len].to_vec()
    }
    fn fill(&self, offset: u64, len: u64, byte: u8) -> io::Result<()> {
        let mut d = self.data.write().unwrap_or_else(|e| e.into_inner());
        let (s, e) = check_range(d.len() as u64, offset, len)?;
        d[s..e].fill(byte);
        Ok(())
    }
}

#[async_trait::async_trait]
impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.data.read().unwrap_or_else(|e| e.into_inner()).len() as u64
    }
    async fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let d = self.data.read().unwrap_or_else(|e| e.into_inner());
        let (s, e) = check_range(d.len() as u64, offset, buf.len() as u64)?;
        buf.copy_from_slice(&d[s..e]);
        Ok(())
    }
    async fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut d = self.data.write().unwrap_or_else(|e| e.into_inner());
        let (s, e) = check_range(d.len() as u64, offset, data.len() as u64)?;
        d[s..e].copy_from_slice(data);
        Ok(())
    }
    async fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    async fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        // Discarded blocks read back as zeroes here.
        self.fill(offset, len, 0)
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fill(offset, len, 0)
    }
    async fn read_sparse_owned(
        &self,
        offset: u64,
        mut buf: Vec<u8>,
    ) -> (Vec<u8>, io::Result<Vec<Range<u32>>>) {
        let r = self.read(offset, &mut buf).await;
        let holes = if self.sparse { zero_runs(&buf, 4096) } else { Vec::new() };
        (buf, r.map(|()| holes))
    }
}

/// A raw image file accessed with positioned I/O (`pread`/`pwrite`) on
/// tokio's blocking thread pool. `flush` is `fdatasync`, `trim` is a no-op.
///
/// With [`with_inline_reads`](Self::with_inline_reads), reads up to a given
/// size are done directly on the async task instead, saving a thread
/// hand-off per request; only sensible when the image lives in the page
/// cache (a small `pread` then takes microseconds). Writes always go to the
/// blocking pool (buffered writes serialize on the inode lock and may be
/// throttled, which must not stall the runtime).
#[derive(Debug, Clone)]
pub struct FileDevice {
    file: Arc<std::fs::File>,
    size: u64,
    inline_max: usize,
}

impl FileDevice {
    /// Open an existing image read-write; its current length is the export size.
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new().read(true).write(true).open(path)?;
        Self::from_file(file)
    }
    /// Wrap an open file.
    pub fn from_file(file: std::fs::File) -> io::Result<Self> {
        let size = file.metadata()?.len();
        Ok(FileDevice { file: Arc::new(file), size, inline_max: 0 })
    }
    /// Do reads of at most `max_len` bytes inline (0 = never, the default).
    pub fn with_inline_reads(mut self, max_len: usize) -> Self {
        self.inline_max = max_len;
        self
    }
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&std::fs::File) -> T + Send + 'static,
    ) -> io::Result<T> {
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || f(&file))
            .await
            .map_err(|e| io::Error::other(format!("blocking task failed: {e}")))
    }
}

#[async_trait::async_trait]
impl BlockDevice for FileDevice {
    fn size(&self) -> u64 {
        self.size
    }
    async fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let (tmp, r) = self.read_owned(offset, vec![0; buf.len()]).await;
        r?;
        buf.copy_from_slice(&tmp);
        Ok(())
    }
    async fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.write_owned(offset, data.to_vec()).await.1
    }
    async fn flush(&self) -> io::Result<()> {
        self.blocking(|f| f.sync_data()).await?
    }
    async fn trim(&self, _offset: u64, _len: u64) -> io::Result<()> {
        // Advisory; keeping the data is a valid discard.
        Ok(())
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.blocking(move |f| {
            use std::os::unix::fs::FileExt;
            const CHUNK: u64 = 1 << 20;
            let zeroes = vec![0u8; CHUNK.min(len) as usize];
            let mut done = 0;
            while done < len {
                let n = CHUNK.min(len - done);
                f.write_all_at(&zeroes[..n as usize], offset + done)?;
                done += n;
            }
            Ok(())
        })
        .await?
    }
    async fn read_owned(&self, offset: u64, mut buf: Vec<u8>) -> (Vec<u8>, io::Result<()>) {
        if buf.len() <= self.inline_max && !buf.is_empty() {
            use std::os::unix::fs::FileExt;
            // Inline I/O was explicitly requested for page-cache-backed images.
            let r = self.file.read_exact_at(&mut buf, offset);
            return (buf, r);
        }
        let file = self.file.clone();
        match tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::FileExt;
            let r = file.read_exact_at(&mut buf, offset);
            (buf, r)
        })
        .await
        {
            Ok(res) => res,
            Err(e) => (Vec::new(), Err(io::Error::other(format!("blocking task failed: {e}")))),
        }
    }
    async fn write_owned(&self, offset: u64, data: Vec<u8>) -> (Vec<u8>, io::Result<()>) {
        let file = self.file.clone();
        match tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::FileExt;
            let r = file.write_all_at(&data, offset);
            (data, r)
        })
        .await
        {
            Ok(res) => res,
            Err(e) => (Vec::new(), Err(io::Error::other(format!("blocking task failed: {e}")))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_runs_merge_whole_zero_blocks() {
        let mut b = vec![0u8; 4 * 4096 + 100];
        b[4096 + 7] = 1;
        assert_eq!(zero_runs(&b, 4096), vec![0..4096, 8192..(4 * 4096 + 100)]);
        b[4 * 4096 + 99] = 1;
        assert_eq!(zero_runs(&b, 4096), vec![0..4096, 8192..4 * 4096]);
        assert_eq!(zero_runs(&[], 4096), Vec::<Range<u32>>::new());
    }

    async fn exercise(dev: &dyn BlockDevice) {
        dev.write(10, b"hello").await.unwrap();
        let mut b = [0u8; 7];
        dev.read(9, &mut b).await.unwrap();
        assert_eq!(&b, b"\0hello\0");
        let (v, r) = dev.write_owned(100, vec![7; 50]).await;
        r.unwrap();
        assert_eq!(v.len(), 50);
        dev.write_zeroes(110, 10).await.unwrap();
        dev.write_zeroes_no_hole(130, 5).await.unwrap();
        let (v, r) = dev.read_owned(100, vec![1; 50]).await;
        r.unwrap();
        let mut expect = vec![7u8; 50];
        expect[10..20].fill(0);
        expect[30..35].fill(0);
        assert_eq!(v, expect);
        dev.trim(0, 4).await.unwrap();
        dev.flush().await.unwrap();
    }

    #[tokio::test]
    async fn mem_device() {
        let dev = MemDevice::new(4096);
        assert_eq!(dev.size(), 4096);
        exercise(&dev).await;
        let mut b = [0u8; 2];
        assert_eq!(dev.read(4095, &mut b).await.unwrap_err().kind(), io::ErrorKind::InvalidInput);
        assert!(dev.write(u64::MAX, b"x").await.is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn file_device() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(8192).unwrap();
        for inline in [0, 64 << 10] {
            let dev = FileDevice::from_file(f.try_clone().unwrap()).unwrap().with_inline_reads(inline);
            assert_eq!(dev.size(), 8192);
            exercise(&dev).await;
            // Reading past the end of the file fails instead of returning short data.
            let (_, r) = dev.read_owned(8190, vec![0; 4]).await;
            assert!(r.is_err());
        }
    }
}
