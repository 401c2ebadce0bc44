//! The FUSE file system that serves guest RAM: one directory holding one file, `guest-ram`, whose bytes are
//! the first `len` bytes of the memory image's runtime image. QEMU maps it shared; a page the guest touches
//! first is read here (the chunk fetched, verified and decoded on its first read), and a page it dirtied comes
//! back as a write when the kernel writes it back (at the latest with the fsync of the suspend).
//!
//! Requests are answered on the tokio runtime, so that many can be in flight (a fetch waits on the network
//! without holding up the pages that are already here).

use std::ffi::OsStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner, OpenFlags,
    ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request, WriteFlags,
};

use crate::image::WorkingImage;

/// The name of the RAM file in the mount.
pub const RAM_FILE: &str = "guest-ram";
const RAM_INO: INodeNo = INodeNo(2);
/// Attributes never change while mounted.
const TTL: Duration = Duration::from_secs(3600);
/// The largest read and write the kernel sends (a chunk of the default size).
pub const MAX_IO: u32 = 1 << 20;

/// Counts of what the guest asked for.
#[derive(Debug, Default)]
pub struct RamFsStats {
    pub reads: AtomicU64,
    pub bytes_read: AtomicU64,
    pub writes: AtomicU64,
    pub bytes_written: AtomicU64,
    pub errors: AtomicU64,
}

pub struct RamFs {
    pub image: Arc<WorkingImage>,
    pub len: u64,
    pub rt: tokio::runtime::Handle,
    pub uid: u32,
    pub gid: u32,
    pub stats: Arc<RamFsStats>,
}

impl std::fmt::Debug for RamFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RamFs").field("len", &self.len).finish()
    }
}

impl RamFs {
    fn attr(&self, ino: INodeNo) -> FileAttr {
        let (kind, perm, size, nlink) = if ino == RAM_INO {
            (FileType::RegularFile, 0o600, self.len, 1)
        } else {
            (FileType::Directory, 0o700, 0, 2)
        };
        FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            flags: 0,
            blksize: 4096,
        }
    }
}

impl Filesystem for RamFs {
    fn init(&mut self, _req: &Request, config: &mut fuser::KernelConfig) -> std::io::Result<()> {
        // Fewer, larger requests: a fetch decodes a whole chunk anyway, and write-back of a guest that
        // dirtied much RAM goes in large pieces. A kernel that offers less keeps its own limits.
        let _ = config.set_max_readahead(MAX_IO);
        let _ = config.set_max_write(MAX_IO);
        let _ = config.set_max_background(64);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent == INodeNo::ROOT && name == RAM_FILE {
            reply.entry(&TTL, &self.attr(RAM_INO), Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino == INodeNo::ROOT || ino == RAM_INO {
            reply.attr(&TTL, &self.attr(ino));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // The RAM has the VM's size, always: a truncate to that size is a no-op, any other is refused.
        match size {
            Some(s) if ino != RAM_INO || s != self.len => reply.error(Errno::EPERM),
            _ => reply.attr(&TTL, &self.attr(ino)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino == RAM_INO {
            // Cached (not direct I/O): QEMU maps the file shared, which needs the page cache.
            reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE);
        } else {
            reply.error(Errno::EISDIR);
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino != RAM_INO {
            return reply.error(Errno::EISDIR);
        }
        let n = (size as u64).min(self.len.saturating_sub(offset)) as usize;
        if n == 0 {
            return reply.data(&[]);
        }
        let (image, stats) = (self.image.clone(), self.stats.clone());
        self.rt.spawn(async move {
            let (buf, r) = image.read_owned(offset, vec![0u8; n]).await;
            match r {
                Ok(()) => {
                    stats.reads.fetch_add(1, Ordering::Relaxed);
                    stats.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
                    reply.data(&buf);
                }
                Err(e) => {
                    // The guest sees a bus error for this page, never wrong data.
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(offset, error = %e, "guest RAM: a read failed");
                    reply.error(Errno::EIO);
                }
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if ino != RAM_INO {
            return reply.error(Errno::EISDIR);
        }
        if offset.checked_add(data.len() as u64).is_none_or(|end| end > self.len) {
            return reply.error(Errno::EFBIG);
        }
        let (image, stats, data) = (self.image.clone(), self.stats.clone(), data.to_vec());
        self.rt.spawn(async move {
            match image.write(offset, &data).await {
                Ok(()) => {
                    stats.writes.fetch_add(1, Ordering::Relaxed);
                    stats.bytes_written.fetch_add(data.len() as u64, Ordering::Relaxed);
                    reply.written(data.len() as u32);
                }
                Err(e) => {
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(offset, error = %e, "guest RAM: a write-back failed");
                    reply.error(Errno::EIO);
                }
            }
        });
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _owner: LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        // The kernel sends this after every dirty page was written back (each write answered only once it
        // is in the runtime image). RAM is not meant to survive a crash: nothing more to make durable.
        reply.ok();
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (INodeNo::ROOT, FileType::Directory, "."),
            (INodeNo::ROOT, FileType::Directory, ".."),
            (RAM_INO, FileType::RegularFile, RAM_FILE),
        ];
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(ino, (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }
}
