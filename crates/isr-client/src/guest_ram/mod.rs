//! Guest RAM as a file that QEMU maps shared (`memory-backend-file,share=on`), kept in the parcel's memory
//! runtime image (encrypted at rest like the disk's). Two ways to provide the file:
//!
//! - **On demand** ([`GuestRam::serve`]): a FUSE mount in the run's private directory serves the file from
//!   the runtime image ([`fs::RamFs`]). The guest starts before any of its RAM is here; a page is fetched,
//!   verified and decoded when the guest first touches it. Pages the guest dirties come back as writes when
//!   the kernel writes them back; [`GuestRam::write_back`] (after QEMU saved the device state and exited)
//!   makes the kernel write back the rest. The chunks written are exactly the memory chunks that changed.
//! - **Loaded** ([`GuestRam::load`]): where FUSE is not available, the file is a plaintext file in the
//!   private directory (tmpfs), filled from the runtime image before QEMU starts; at the suspend the chunks
//!   that differ are written back into the runtime image. Same memory image, same result, slower start.
//!
//! [`layout`] is the memory image that holds the RAM and the device state together.

pub mod fs;
pub mod layout;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures::StreamExt;

use crate::error::ClientError;
use crate::image::WorkingImage;
pub use fs::RamFsStats;

/// How the guest's RAM was provided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RamMode {
    /// Served by FUSE, fetched as the guest touches it.
    OnDemand,
    /// Filled into a file before QEMU started.
    Loaded,
}

impl std::fmt::Display for RamMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RamMode::OnDemand => "on demand",
            RamMode::Loaded => "loaded before start",
        })
    }
}

enum Backing {
    Fuse { session: Option<fuser::BackgroundSession>, mountpoint: PathBuf },
    File,
}

/// The RAM file of one run.
pub struct GuestRam {
    image: Arc<WorkingImage>,
    ram_len: u64,
    file: PathBuf,
    backing: Backing,
    pub stats: Arc<RamFsStats>,
    /// What was done about FUSE's write-back limits (for the user and the log).
    pub writeback_note: Option<String>,
}

impl std::fmt::Debug for GuestRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestRam").field("file", &self.file).field("mode", &self.mode()).finish()
    }
}

/// Whether this process can serve a FUSE file (`/dev/fuse` opens); else why not.
pub fn fuse_available() -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map(drop)
        .map_err(|e| format!("/dev/fuse: {e}"))
}

impl GuestRam {
    /// Serve the first `ram_len` bytes of `image` as `DIR/ram/guest-ram` through FUSE, private to this
    /// user (no `allow_other`). Call it on the tokio runtime that answers the requests.
    pub fn serve(image: Arc<WorkingImage>, ram_len: u64, dir: &Path) -> Result<GuestRam, ClientError> {
        check_len(&image, ram_len)?;
        let mountpoint = dir.join("ram");
        std::fs::create_dir(&mountpoint)
            .map_err(|e| ClientError::io(format!("creating {}", mountpoint.display()), e))?;
        let stats = Arc::new(RamFsStats::default());
        let ram_fs = fs::RamFs {
            image: image.clone(),
            len: ram_len,
            rt: tokio::runtime::Handle::current(),
            // SAFETY: getuid/getgid cannot fail and touch no memory.
            #[allow(unsafe_code)]
            uid: unsafe { libc::getuid() },
            #[allow(unsafe_code)]
            gid: unsafe { libc::getgid() },
            stats: stats.clone(),
        };
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::FSName("isr-ram".into()),
            fuser::MountOption::NoExec,
            fuser::MountOption::NoSuid,
            fuser::MountOption::NoDev,
            fuser::MountOption::DefaultPermissions,
        ];
        let session = fuser::spawn_mount(ram_fs, &mountpoint, &config).map_err(|e| {
            let _ = std::fs::remove_dir(&mountpoint);
            ClientError::io(format!("mounting guest RAM (FUSE) at {}", mountpoint.display()), e)
        })?;
        let writeback_note = Some(lift_writeback_limit(&mountpoint));
        Ok(GuestRam {
            image,
            ram_len,
            file: mountpoint.join(fs::RAM_FILE),
            backing: Backing::Fuse { session: Some(session), mountpoint },
            stats,
            writeback_note,
        })
    }

    /// Fill `DIR/guest-ram` (plaintext: `DIR` must be the run's private directory, on tmpfs) with the first
    /// `ram_len` bytes of `image`.
    pub async fn load(image: Arc<WorkingImage>, ram_len: u64, dir: &Path) -> Result<GuestRam, ClientError> {
        check_len(&image, ram_len)?;
        let file = dir.join(fs::RAM_FILE);
        let ram = GuestRam {
            image: image.clone(),
            ram_len,
            file: file.clone(),
            backing: Backing::File,
            stats: Arc::default(),
            writeback_note: None,
        };
        image_to_file(&image, &file, ram_len).await?;
        Ok(ram)
    }

    /// The file QEMU maps ([`isr_vmm::VmConfig::shared_ram`]).
    pub fn path(&self) -> &Path {
        &self.file
    }

    pub fn mode(&self) -> RamMode {
        match self.backing {
            Backing::Fuse { .. } => RamMode::OnDemand,
            Backing::File => RamMode::Loaded,
        }
    }

    /// After QEMU has exited: bring every change of the RAM into the runtime image, then unmount (or remove
    /// the plaintext file).
    pub async fn write_back(mut self) -> Result<(), ClientError> {
        match &mut self.backing {
            Backing::Fuse { session, .. } => {
                let file = self.file.clone();
                // The kernel writes back every dirty page before it sends the fsync; each write is answered
                // once it is in the runtime image.
                tokio::task::spawn_blocking(move || std::fs::File::open(&file)?.sync_all())
                    .await
                    .map_err(|e| ClientError::Other(format!("write-back task: {e}")))?
                    .map_err(|e| ClientError::io("writing back guest RAM (fsync of the FUSE file)", e))?;
                let errors = self.stats.errors.load(Ordering::Relaxed);
                if errors > 0 {
                    return Err(ClientError::Other(format!(
                        "{errors} guest RAM reads or write-backs failed: the RAM is not complete"
                    )));
                }
                if let Some(s) = session.take() {
                    unmount(s).await?;
                }
            }
            Backing::File => {
                copy_changes_into(&self.image, &self.file, self.ram_len).await?;
                remove_plaintext(&self.file)?;
            }
        }
        Ok(())
    }

    /// Let go without writing anything back (the RAM is not kept): unmount, or remove the plaintext file.
    pub async fn discard(mut self) -> Result<(), ClientError> {
        match &mut self.backing {
            Backing::Fuse { session, .. } => {
                if let Some(s) = session.take() {
                    unmount(s).await?;
                }
            }
            Backing::File => remove_plaintext(&self.file)?,
        }
        Ok(())
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        match &mut self.backing {
            // Only on an error path (the normal ends unmount first). A lazy unmount returns at once: a
            // blocking one could wait for write-backs that need this thread's runtime.
            Backing::Fuse { session, mountpoint } => {
                if session.is_some() {
                    detach_mounts_under(mountpoint);
                    drop(session.take());
                }
            }
            Backing::File => {
                let _ = std::fs::remove_file(&self.file);
            }
        }
    }
}

fn check_len(image: &WorkingImage, ram_len: u64) -> Result<(), ClientError> {
    if image.len() < ram_len {
        return Err(ClientError::Other(format!(
            "the memory image ({} bytes) is smaller than the guest RAM ({ram_len} bytes)",
            image.len()
        )));
    }
    Ok(())
}

fn remove_plaintext(path: &Path) -> Result<(), ClientError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(ClientError::io(format!("removing {} (it holds guest RAM)", path.display()), e))
        }
        _ => Ok(()),
    }
}

async fn unmount(session: fuser::BackgroundSession) -> Result<(), ClientError> {
    tokio::task::spawn_blocking(move || session.umount_and_join())
        .await
        .map_err(|e| ClientError::Other(format!("unmount task: {e}")))?
        .map_err(|e| ClientError::io("unmounting guest RAM (FUSE)", e))
}

/// FUSE limits the dirty pages of its files to a small share of the write-back budget (`strict_limit`,
/// `max_ratio` 1%): a guest that writes much memory would be throttled to the speed of write-back. As root the
/// limit is lifted for this mount (its backing device in /sys/class/bdi); otherwise it stays, and says so.
fn lift_writeback_limit(mountpoint: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let dev = match std::fs::metadata(mountpoint) {
        Ok(m) => m.dev(),
        Err(e) => return format!("write-back limit kept (stat {}: {e})", mountpoint.display()),
    };
    let bdi = PathBuf::from(format!("/sys/class/bdi/{}:{}", libc::major(dev), libc::minor(dev)));
    let mut done = Vec::new();
    for (knob, value) in [("strict_limit", "0"), ("max_ratio", "100")] {
        let path = bdi.join(knob);
        if !path.exists() {
            continue;
        }
        match std::fs::write(&path, value) {
            Ok(()) => done.push(format!("{knob}={value}")),
            Err(e) => return format!("write-back limit kept ({}: {e})", path.display()),
        }
    }
    format!("write-back limit lifted ({})", done.join(", "))
}

/// Lazily unmount every mount at or below `dir` (FUSE mounts left by a run that died): afterwards the
/// directory can be removed. Quiet: nothing mounted is the usual case.
pub fn detach_mounts_under(dir: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return };
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    // Deepest first.
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else { continue };
        // SAFETY: umount2 reads the NUL-terminated path and has no other memory effects.
        #[allow(unsafe_code)]
        let r = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        if r != 0 {
            tracing::warn!("unmounting {}: {}", p.display(), std::io::Error::last_os_error());
        }
    }
}

/// /proc/self/mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Write the first `len` bytes of `img` into a new file at `path` (zero ranges left as holes), several pieces
/// at a time.
pub(crate) async fn image_to_file(img: &Arc<WorkingImage>, path: &Path, len: u64) -> Result<(), ClientError> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::create(path)
        .map_err(|e| ClientError::io(format!("creating {}", path.display()), e))?;
    file.set_len(len).map_err(|e| ClientError::io(format!("sizing {}", path.display()), e))?;
    let file = Arc::new(file);
    let piece = 4 * img.chunk_size().as_usize() as u64;
    let results: Vec<Result<(), ClientError>> = futures::stream::iter((0..len).step_by(piece as usize))
        .map(|off| {
            let (img, file) = (img.clone(), file.clone());
            async move {
                let n = piece.min(len - off) as usize;
                let (buf, r) = img.read_owned(off, vec![0u8; n]).await;
                r.map_err(|e| ClientError::io(format!("reading the memory image at {off}"), e))?;
                if isr_format::codec::is_zero(&buf) {
                    return Ok(());
                }
                tokio::task::spawn_blocking(move || file.write_all_at(&buf, off))
                    .await
                    .map_err(|e| ClientError::Other(format!("writer task: {e}")))?
                    .map_err(|e| ClientError::io("writing the memory image", e))
            }
        })
        .buffer_unordered(4)
        .collect()
        .await;
    results.into_iter().collect()
}

/// Write into `img` every chunk of the first `len` bytes of the file at `path` that differs from it.
pub(crate) async fn copy_changes_into(
    img: &Arc<WorkingImage>,
    path: &Path,
    len: u64,
) -> Result<(), ClientError> {
    use std::os::unix::fs::FileExt;
    let file = Arc::new(
        std::fs::File::open(path).map_err(|e| ClientError::io(format!("opening {}", path.display()), e))?,
    );
    let chunk = img.chunk_size().as_usize() as u64;
    let results: Vec<Result<(), ClientError>> = futures::stream::iter((0..len).step_by(chunk as usize))
        .map(|off| {
            let (img, file) = (img.clone(), file.clone());
            async move {
                let n = chunk.min(len - off) as usize;
                let new = tokio::task::spawn_blocking(move || {
                    let mut b = vec![0u8; n];
                    file.read_exact_at(&mut b, off).map(|()| b)
                })
                .await
                .map_err(|e| ClientError::Other(format!("reader task: {e}")))?
                .map_err(|e| ClientError::io("reading the saved memory", e))?;
                let (old, r) = img.read_owned(off, vec![0u8; n]).await;
                r.map_err(|e| ClientError::io(format!("reading the memory runtime image at {off}"), e))?;
                if old != new {
                    img.write(off, &new)
                        .await
                        .map_err(|e| ClientError::io("writing the memory runtime image", e))?;
                }
                Ok(())
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    results.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_mountinfo("/dev/shm/a\\040b/ram"), "/dev/shm/a b/ram");
        assert_eq!(unescape_mountinfo("/x\\134y"), "/x\\y");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo("/cut\\04"), "/cut\\04");
    }
}
