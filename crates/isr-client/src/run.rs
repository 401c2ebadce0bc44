//! The run-time bookkeeping of a parcel on this client: who runs it, where its plaintext lives, how the last
//! run ended, and the cleanup after a run that died (`kill -9`, crash).
//!
//! ```text
//! PARCEL_DIR/run.lock          flock held by the `isr resume` / `isr disk` running the parcel (the kernel
//!                              releases it when that process dies, however it dies)
//! PARCEL_DIR/run.json          the record of the running (or dead) run: run id, pid of isr, pid of QEMU,
//!                              the private directory, whether it consumed the saved memory image
//! PARCEL_DIR/run-outcome.json  how the last run ended, written by it before it releases run.lock
//! RUNTIME_DIR/isr-PARCEL-ID/   the private directory (0700) of a resume: kernel, initrd, memory image in
//!                              plaintext, QEMU's sockets; removed when the resume ends
//! HOME/logs/USER/PARCEL/console.log   the guest's serial console (kept across checkin)
//! HOME/transient/USER/PARCEL/  run.lock, run.json and run-outcome.json of a transient run
//!                              (`crate::transient`), whose private directory holds its whole working area
//! ```
//!
//! A record without a holder of `run.lock` is stale: its isr died. Every command that opens the parcel
//! ([`clean_stale`]) then kills a QEMU still alive whose command line names the private directory, removes
//! the private directory and the record, and says so on stderr. So the next isr command of that parcel removes
//! a stale private directory at the latest.

use crate::error::ClientError;
use crate::home::{now_unix, write_atomic};
use crate::parcel_files::ParcelFiles;
use isr_format::ImageKind;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// In the `-name` argument of every QEMU that isr starts (`isr_vmm::VmConfig::qemu_args`; under libvirt an
/// extra `-name` in the domain's `<qemu:commandline>`).
const QEMU_NAME_MARK: &[u8] = b"process=isr-qemu";

/// Whether a disk export or VM of the parcel is running (it holds `run.lock`).
pub fn is_running(dir: &Path) -> bool {
    let Ok(f) = std::fs::File::open(ParcelFiles::new(dir).run_lock()) else { return false };
    !try_flock(&f)
}

fn try_flock(f: &std::fs::File) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a valid open descriptor has no memory-safety preconditions.
    #[allow(unsafe_code)]
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    r == 0
}

/// Held while a disk export or VM runs; released (by the kernel, even on kill -9) when dropped.
#[derive(Debug)]
pub struct RunGuard {
    _file: std::fs::File,
}

impl RunGuard {
    pub fn acquire(dir: &Path) -> Result<RunGuard, ClientError> {
        RunGuard::try_acquire(dir)?
            .ok_or_else(|| ClientError::Other("the parcel is already running on this client".into()))
    }

    /// The guard, or `None` when another process holds it.
    pub fn try_acquire(dir: &Path) -> Result<Option<RunGuard>, ClientError> {
        let path = ParcelFiles::new(dir).run_lock();
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| ClientError::io(format!("opening {}", path.display()), e))?;
        Ok(try_flock(&f).then_some(RunGuard { _file: f }))
    }
}

/// What runs the parcel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunKind {
    Resume,
    Disk,
    /// `isr resume --transient`: a version run without lock or check-in; its records are in
    /// `Home::transient_dir`, everything else in its private directory.
    Transient,
}

impl RunKind {
    fn command(self) -> &'static str {
        match self {
            RunKind::Resume => "isr resume",
            RunKind::Disk => "isr disk",
            RunKind::Transient => "isr resume --transient",
        }
    }
}

/// The record of a run (`run.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    pub run_id: String,
    pub kind: RunKind,
    pub isr_pid: u32,
    pub qemu_pid: Option<u32>,
    /// The private directory holding plaintext (resume only).
    pub private_dir: Option<PathBuf>,
    pub started_unix: i64,
    /// The run resumed the saved memory image: the image no longer matches the disk.
    #[serde(default)]
    pub memory_consumed: bool,
    /// The libvirt domain running the VM (`isr resume --vmm libvirt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub libvirt_domain: Option<LibvirtDomain>,
}

/// A libvirt domain as `run.json` records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LibvirtDomain {
    pub uri: String,
    pub name: String,
}

/// How a run ended. Stored in `run-outcome.json` as the words shown to the user; a word this version does not
/// know (written by another version of isr) reads as [`RunEnd::Unknown`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "&'static str")]
pub enum RunEnd {
    /// The memory image was saved and the VM stopped (`isr suspend`).
    Suspended,
    /// Stopped without saving memory (`isr poweroff`).
    PoweredOff,
    /// The guest shut itself down.
    GuestShutdown,
    /// QEMU exited on its own.
    QemuExited,
    /// An `isr disk` export ended.
    Stopped,
    /// The run failed (its error is in [`RunOutcome::error`]).
    Failed,
    /// A transient run ended as asked, every change dropped.
    TransientEnded,
    /// Recorded by another version of isr.
    Unknown,
}

impl RunEnd {
    const ALL: [RunEnd; 7] = [
        RunEnd::Suspended,
        RunEnd::PoweredOff,
        RunEnd::GuestShutdown,
        RunEnd::QemuExited,
        RunEnd::Stopped,
        RunEnd::Failed,
        RunEnd::TransientEnded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RunEnd::Suspended => "suspended",
            RunEnd::PoweredOff => "powered off",
            RunEnd::GuestShutdown => "shut down by the guest",
            RunEnd::QemuExited => "QEMU exited",
            RunEnd::Stopped => "stopped",
            RunEnd::Failed => "failed",
            RunEnd::TransientEnded => "transient run ended: every change dropped",
            RunEnd::Unknown => "ended",
        }
    }
}

impl From<String> for RunEnd {
    fn from(s: String) -> RunEnd {
        RunEnd::ALL.into_iter().find(|e| e.as_str() == s).unwrap_or(RunEnd::Unknown)
    }
}

impl From<RunEnd> for &'static str {
    fn from(e: RunEnd) -> &'static str {
        e.as_str()
    }
}

impl std::fmt::Display for RunEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// How a run ended (`run-outcome.json`), for `isr suspend` and `isr poweroff` to report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunOutcome {
    pub run_id: String,
    /// A new memory image was stored durably (the run was suspended).
    pub memory_image_stored: bool,
    pub outcome: RunEnd,
    /// The error, when the run failed.
    pub error: Option<String>,
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>, ClientError> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| ClientError::Integrity(format!("{} is corrupt: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ClientError::io(format!("reading {}", path.display()), e)),
    }
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), ClientError> {
    write_atomic(path, &serde_json::to_vec_pretty(value).expect("serializable"))
}

/// The record of the parcel's current or last unfinished run.
pub fn read_record(dir: &Path) -> Result<Option<RunRecord>, ClientError> {
    read_json(&ParcelFiles::new(dir).run_record())
}

/// How the parcel's last run ended.
pub fn read_outcome(dir: &Path) -> Result<Option<RunOutcome>, ClientError> {
    read_json(&ParcelFiles::new(dir).run_outcome())
}

/// A run in progress: holds `run.lock`, and its record is on disk.
#[derive(Debug)]
pub struct Run {
    files: ParcelFiles,
    record: RunRecord,
    _guard: RunGuard,
}

impl Run {
    /// Take `run.lock` (refusing when the parcel already runs), clean up after a dead earlier run, and write
    /// the record. A resume passes the private directory it will create (`private_dir_path`), so a kill at any
    /// later moment leaves a record that names it.
    pub fn start(dir: &Path, kind: RunKind, private_dir: Option<PathBuf>) -> Result<Run, ClientError> {
        let guard = RunGuard::acquire(dir)?;
        if let Some(msg) = clean_locked(dir)? {
            eprintln!("isr: {msg}");
        }
        let record = RunRecord {
            run_id: new_run_id(),
            kind,
            isr_pid: std::process::id(),
            qemu_pid: None,
            private_dir,
            started_unix: now_unix(),
            memory_consumed: false,
            libvirt_domain: None,
        };
        let files = ParcelFiles::new(dir);
        write_json(&files.run_record(), &record)?;
        Ok(Run { files, record, _guard: guard })
    }

    pub fn record(&self) -> &RunRecord {
        &self.record
    }

    /// Record the VM's QEMU and, under libvirt, its domain (the cleanup after a crash destroys it).
    pub fn set_vm(
        &mut self,
        pid: Option<u32>,
        domain: Option<isr_vmm::DomainRef>,
    ) -> Result<(), ClientError> {
        self.record.qemu_pid = pid;
        self.record.libvirt_domain = domain.map(|d| LibvirtDomain { uri: d.uri, name: d.name });
        write_json(&self.files.run_record(), &self.record)
    }

    /// Record durably, before the guest runs, that this run consumes the saved memory image; then drop the
    /// image from the parcel's state. From here on, however this run ends, the next resume boots cold unless
    /// this run stores a new memory image.
    pub fn consume_memory_image(&mut self) -> Result<(), ClientError> {
        if self.record.kind == RunKind::Transient {
            // It runs a copy of a version's memory image: nothing of the parcel's is consumed.
            return Ok(());
        }
        self.record.memory_consumed = true;
        write_json(&self.files.run_record(), &self.record)?;
        drop_memory_image(self.files.dir())
    }

    /// Like [`Run::consume_memory_image`] for a run whose guest RAM lives in the memory runtime image (a
    /// shared file): the memory image stops being one to resume (durably, before the guest runs), but its
    /// runtime image stays: it is the guest's RAM now. A run that dies leaves it to be dropped.
    pub fn consume_memory_image_in_use(&mut self) -> Result<(), ClientError> {
        if self.record.kind == RunKind::Transient {
            return Ok(());
        }
        self.record.memory_consumed = true;
        write_json(&self.files.run_record(), &self.record)?;
        drop_memory_keyrings(self.files.dir())
    }

    /// Record how the run ended, remove the record and release `run.lock`. Call it after the private
    /// directory is gone and QEMU has exited.
    pub fn finish(
        self,
        outcome: RunEnd,
        memory_image_stored: bool,
        error: Option<String>,
    ) -> Result<(), ClientError> {
        let o = RunOutcome { run_id: self.record.run_id.clone(), memory_image_stored, outcome, error };
        write_json(&self.files.run_outcome(), &o)?;
        remove_if_present(&self.files.run_record())?;
        let _ = std::fs::remove_file(self.files.legacy_run_pid());
        Ok(())
    }
}

fn new_run_id() -> String {
    hex::encode(isr_format::random_bytes::<8>())
}

fn remove_if_present(path: &Path) -> Result<(), ClientError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ClientError::io(format!("removing {}", path.display()), e)),
    }
}

fn sync_dir(dir: &Path) -> Result<(), ClientError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| ClientError::io(format!("syncing {}", dir.display()), e))
}

/// Whether the next resume of the parcel in `dir` would start from a saved memory image (it is suspended).
/// Reads only local files (no password needed): the base has a memory image when its memory keyring is
/// there.
pub fn memory_image_would_resume(dir: &Path) -> Result<bool, ClientError> {
    let files = ParcelFiles::new(dir);
    let Some(st) = read_json::<serde_json::Value>(&files.state())? else { return Ok(false) };
    let dropped = st.get("memory_dropped").and_then(serde_json::Value::as_bool).unwrap_or(false);
    Ok(!dropped
        && (files.work_keyring(ImageKind::Memory).exists() || files.base_keyring(ImageKind::Memory).exists()))
}

/// Drop the parcel's saved memory image: the state says so first (durably), then the working memory keyring
/// goes; a crash in between still boots cold. Idempotent.
pub fn drop_memory_image(dir: &Path) -> Result<(), ClientError> {
    drop_memory_keyrings(dir)?;
    // Its runtime image may hold changes of the memory image that is dropped here.
    crate::resume::remove_runtime_memory(dir)
}

/// [`drop_memory_image`] but for its runtime image, which a running VM may be using.
fn drop_memory_keyrings(dir: &Path) -> Result<(), ClientError> {
    let files = ParcelFiles::new(dir);
    let path = files.state();
    // As JSON, touching only this one field of the state (`home::LocalState`).
    let mut st: serde_json::Value =
        read_json(&path)?.ok_or_else(|| ClientError::Other(format!("{} is missing", path.display())))?;
    let obj = st
        .as_object_mut()
        .ok_or_else(|| ClientError::Integrity(format!("{} is not a JSON object", path.display())))?;
    // Only a memory image of the base needs the flag; without one, the working keyring is all there is.
    obj.insert("memory_dropped".into(), files.base_keyring(ImageKind::Memory).exists().into());
    write_json(&path, &st)?;
    let work = files.work_keyring(ImageKind::Memory);
    if work.exists() {
        remove_if_present(&work)?;
        sync_dir(&files.keyrings_dir())?;
    }
    Ok(())
}

/// Clean up after a dead run of the parcel in `dir`, if there was one and nothing runs it now; says on stderr
/// what was done. Cheap when there is nothing to do.
pub fn clean_stale(dir: &Path) -> Result<(), ClientError> {
    let files = ParcelFiles::new(dir);
    if !files.run_record().exists() && !files.legacy_run_pid().exists() {
        return Ok(());
    }
    // Holding run.lock while cleaning: a resume starting meanwhile waits for it instead of losing its files.
    let Some(_guard) = RunGuard::try_acquire(dir)? else { return Ok(()) };
    if let Some(msg) = clean_locked(dir)? {
        eprintln!("isr: {msg}");
    }
    Ok(())
}

/// The cleanup itself, with `run.lock` held by the caller. Returns what was done, for the user.
fn clean_locked(dir: &Path) -> Result<Option<String>, ClientError> {
    let files = ParcelFiles::new(dir);
    let _ = std::fs::remove_file(files.legacy_run_pid());
    let Some(rec) = read_record(dir)? else { return Ok(None) };
    let parcel = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let ended = read_outcome(dir)?.is_some_and(|o| o.run_id == rec.run_id);
    let mut done = Vec::new();
    if let Some(d) = &rec.libvirt_domain {
        // Normally gone with its isr already (autodestroy); a daemon that missed it is told again.
        let domain = isr_vmm::DomainRef { uri: d.uri.clone(), name: d.name.clone() };
        if let Ok(true) = isr_vmm::libvirt::destroy_domain_blocking(&domain, Path::new("virsh")) {
            done.push(format!("destroyed its {domain}"));
        }
    }
    if let Some(private) = &rec.private_dir {
        for pid in processes_naming(private) {
            kill_and_wait(pid);
            done.push(format!("stopped its QEMU (pid {pid})"));
        }
        if private.exists() {
            // Its guest RAM mount (FUSE, served by the dead process) first.
            crate::guest_ram::detach_mounts_under(private);
            std::fs::remove_dir_all(private).map_err(|e| {
                ClientError::io(format!("removing the private directory {}", private.display()), e)
            })?;
            done.push(format!("removed its private directory {}", private.display()));
        }
    }
    if rec.memory_consumed && !ended {
        // Repeat the drop: the run may have died between recording the consumption and dropping the image.
        drop_memory_image(dir)?;
    }
    remove_if_present(&files.run_record())?;
    if ended && done.is_empty() {
        return Ok(None);
    }
    let mut msg = format!(
        "an earlier `{}` of {parcel} (pid {}) {}",
        rec.kind.command(),
        rec.isr_pid,
        if ended {
            "did not finish cleaning up"
        } else {
            "ended without stopping properly (killed or crashed)"
        }
    );
    if !done.is_empty() {
        msg.push_str(": ");
        msg.push_str(&done.join(", "));
    }
    if rec.memory_consumed && !ended {
        msg.push_str(
            "; it had resumed the saved memory image and did not store a new one, so the next resume boots cold \
             from the disk as the guest last flushed it (like after a power loss); `isr discard` returns to the \
             base version instead",
        );
    }
    Ok(Some(msg))
}

/// QEMUs (isr names them `process=isr-qemu`) whose command line names `path`: those of the run whose private
/// directory it is. Zombies have no command line and are not listed.
fn processes_naming(path: &Path) -> Vec<u32> {
    use std::os::unix::ffi::OsStrExt;
    let needle = path.as_os_str().as_bytes();
    let contains = |hay: &[u8], n: &[u8]| !n.is_empty() && hay.windows(n.len()).any(|w| w == n);
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    let mut pids = Vec::new();
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        if pid == me {
            continue;
        }
        if let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) {
            if contains(&cmdline, needle) && contains(&cmdline, QEMU_NAME_MARK) {
                pids.push(pid);
            }
        }
    }
    pids
}

/// SIGKILL `pid` and wait (a bounded while) until it has no command line any more (gone or a zombie).
fn kill_and_wait(pid: u32) {
    // SAFETY: kill(2) has no memory-safety preconditions; the pid was just checked to be a process naming our
    // private directory.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match std::fs::read(format!("/proc/{pid}/cmdline")) {
            Ok(c) if !c.is_empty() => std::thread::sleep(Duration::from_millis(10)),
            _ => return,
        }
    }
    tracing::warn!("process {pid} did not exit within 10 s of SIGKILL");
}

// ---- the private runtime directory ----------------------------------------------------------------

/// Where private directories of resumes go unless `--runtime-dir` / `$ISR_RUNTIME_DIR` says otherwise:
/// `/dev/shm` (tmpfs: plaintext never reaches a disk) when it is a directory, else `/tmp`.
pub fn default_runtime_dir() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_owned()
    } else {
        PathBuf::from("/tmp")
    }
}

/// The path of a new private directory for `parcel` in `runtime_dir` (not created yet).
pub fn private_dir_path(runtime_dir: &Path, parcel: &str) -> PathBuf {
    runtime_dir.join(format!("isr-{parcel}-{}", new_run_id()))
}

/// A private directory (0700) for plaintext; removed with everything in it when dropped.
#[derive(Debug)]
pub struct PrivateDir {
    path: PathBuf,
    removed: bool,
}

impl PrivateDir {
    /// Create `path` (it must not exist) with mode 0700.
    pub fn create(path: PathBuf) -> Result<PrivateDir, ClientError> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| ClientError::io(format!("creating the private directory {}", path.display()), e))?;
        Ok(PrivateDir { path, removed: false })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Remove it now, reporting a failure (dropping only logs one).
    pub fn remove(mut self) -> Result<(), ClientError> {
        self.removed = true;
        crate::guest_ram::detach_mounts_under(&self.path);
        match std::fs::remove_dir_all(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => {
                Err(ClientError::io(format!("removing the private directory {}", self.path.display()), e))
            }
        }
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        if !self.removed {
            crate::guest_ram::detach_mounts_under(&self.path);
            if let Err(e) = std::fs::remove_dir_all(&self.path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!("removing {}: {e}", self.path.display());
                }
            }
        }
    }
}

/// Bytes available to this user on the filesystem holding `dir`.
pub fn free_space(dir: &Path) -> Result<u64, ClientError> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| ClientError::Usage(format!("{} contains a NUL byte", dir.display())))?;
    // SAFETY: statvfs writes into the zeroed struct we pass and reads the NUL-terminated path we own.
    #[allow(unsafe_code)]
    let (r, st) = unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        (libc::statvfs(c.as_ptr(), &mut st), st)
    };
    if r != 0 {
        return Err(ClientError::io(
            format!("checking the free space of {}", dir.display()),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / 1048576.0)
}

/// Refuse to start when `runtime_dir` is not a directory or its filesystem has less than `needed` bytes
/// free; `what` says what the space is for.
pub fn check_runtime_space(runtime_dir: &Path, needed: u64, what: &str) -> Result<(), ClientError> {
    if !runtime_dir.is_dir() {
        return Err(ClientError::Usage(format!(
            "the runtime directory {} is not a directory: choose one with `isr resume --runtime-dir DIR` or \
             $ISR_RUNTIME_DIR",
            runtime_dir.display()
        )));
    }
    let free = free_space(runtime_dir)?;
    if free < needed {
        return Err(ClientError::Other(format!(
            "not enough space in {dir} for {what}: {need} needed, {free} free there. Choose a directory with more \
             room with `isr resume --runtime-dir DIR` or $ISR_RUNTIME_DIR (best a tmpfs, so the plaintext memory \
             never reaches a disk; in Docker, `--shm-size` enlarges /dev/shm)",
            dir = runtime_dir.display(),
            need = mib(needed),
            free = mib(free),
        )));
    }
    Ok(())
}

// ---- the console log --------------------------------------------------------------------------------

/// `HOME/logs/USER/PARCEL/console.log`, outside the parcel directory so that it survives a checkin; its
/// directories are made 0700 and the file 0600 (created empty when missing).
pub fn console_log(home_root: &Path, user: &str, parcel: &str) -> Result<PathBuf, ClientError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    let logs = home_root.join("logs");
    let dir = logs.join(user).join(parcel);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| ClientError::io(format!("creating {}", dir.display()), e))?;
    for d in [&logs, &logs.join(user), &dir] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| ClientError::io(format!("making {} private", d.display()), e))?;
    }
    let path = dir.join("console.log");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| ClientError::io(format!("opening {}", path.display()), e))?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(|e| ClientError::io(format!("making {} private", path.display()), e))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory_keyring(dir: &Path, which: &str) -> PathBuf {
        let files = ParcelFiles::new(dir);
        match which {
            "base" => files.base_keyring(ImageKind::Memory),
            _ => files.work_keyring(ImageKind::Memory),
        }
    }

    fn state(dir: &Path, memory_dropped: bool) {
        let st = serde_json::json!({"parcel": "p", "base_version": 1, "memory_dropped": memory_dropped});
        write_json(&dir.join("state.json"), &st).unwrap();
    }

    #[test]
    fn stale_record_is_cleaned_and_memory_dropped() {
        let home = tempfile::tempdir().unwrap();
        let dir = home.path().join("p");
        std::fs::create_dir_all(dir.join("keyrings")).unwrap();
        state(&dir, false);
        std::fs::write(memory_keyring(&dir, "base"), b"x").unwrap();
        std::fs::write(memory_keyring(&dir, "work"), b"x").unwrap();
        assert!(memory_image_would_resume(&dir).unwrap());
        let runtime = tempfile::tempdir().unwrap();
        let private = private_dir_path(runtime.path(), "p");
        {
            let mut run = Run::start(&dir, RunKind::Resume, Some(private.clone())).unwrap();
            let p = PrivateDir::create(private.clone()).unwrap();
            std::fs::write(p.path().join("memory"), b"plaintext").unwrap();
            run.consume_memory_image().unwrap();
            // as after kill -9: neither the private directory nor the record is removed
            std::mem::forget(p);
            std::mem::forget(run);
        }
        assert!(!memory_image_would_resume(&dir).unwrap());
        // the forgotten guard still holds run.lock in this process: nothing is cleaned while it runs
        clean_stale(&dir).unwrap();
        assert!(private.exists());
        // a record whose holder is gone (the lock file replaced: no process holds the new one)
        std::fs::remove_file(dir.join("run.lock")).unwrap();
        // and a crash between recording the consumption and dropping the image
        std::fs::write(memory_keyring(&dir, "work"), b"x").unwrap();
        clean_stale(&dir).unwrap();
        assert!(!private.exists(), "private directory left");
        assert!(read_record(&dir).unwrap().is_none());
        assert!(!memory_keyring(&dir, "work").exists());
        assert!(!memory_image_would_resume(&dir).unwrap());
    }

    #[test]
    fn a_dead_transient_run_is_cleaned_and_consumes_nothing() {
        // The records of a transient run live in a directory without a parcel's state.
        let records = tempfile::tempdir().unwrap();
        let runtime = tempfile::tempdir().unwrap();
        let area = private_dir_path(runtime.path(), "p");
        {
            let mut run = Run::start(records.path(), RunKind::Transient, Some(area.clone())).unwrap();
            let p = PrivateDir::create(area.clone()).unwrap();
            std::fs::create_dir_all(p.path().join("overlay/ab")).unwrap();
            std::fs::write(p.path().join("overlay/ab/chunk"), b"made by the guest").unwrap();
            // Nothing of a parcel is consumed (there is no state.json to change).
            run.consume_memory_image().unwrap();
            assert!(!run.record().memory_consumed);
            std::mem::forget(p);
            std::mem::forget(run);
        }
        std::fs::remove_file(records.path().join("run.lock")).unwrap();
        clean_stale(records.path()).unwrap();
        assert!(!area.exists(), "the transient run's working area is left");
        assert!(read_record(records.path()).unwrap().is_none());
        assert!(!records.path().join("state.json").exists());
    }

    #[test]
    fn finished_run_leaves_its_outcome() {
        let dir = tempfile::tempdir().unwrap();
        let run = Run::start(dir.path(), RunKind::Disk, None).unwrap();
        assert!(is_running(dir.path()));
        assert!(Run::start(dir.path(), RunKind::Disk, None).is_err(), "two runs at once");
        let id = run.record().run_id.clone();
        run.finish(RunEnd::Stopped, false, None).unwrap();
        assert!(!is_running(dir.path()));
        let o = read_outcome(dir.path()).unwrap().unwrap();
        assert_eq!(o.run_id, id);
        assert!(read_record(dir.path()).unwrap().is_none());
    }

    #[test]
    fn run_ends_are_stored_as_their_words() {
        for end in RunEnd::ALL {
            let json = serde_json::to_string(&end).unwrap();
            assert_eq!(json, format!("{:?}", end.as_str()));
            assert_eq!(serde_json::from_str::<RunEnd>(&json).unwrap(), end);
        }
        assert_eq!(serde_json::from_str::<RunEnd>("\"stopped\"").unwrap(), RunEnd::Stopped);
        assert_eq!(serde_json::from_str::<RunEnd>("\"exploded\"").unwrap(), RunEnd::Unknown);
    }

    #[test]
    fn space_check_names_the_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let err =
            check_runtime_space(dir.path(), u64::MAX / 2, "the guest's memory").unwrap_err().to_string();
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
        assert!(err.contains("needed") && err.contains("free") && err.contains("--runtime-dir"), "{err}");
        check_runtime_space(dir.path(), 1, "one byte").unwrap();
        let missing = dir.path().join("missing");
        assert!(matches!(check_runtime_space(&missing, 1, "x"), Err(ClientError::Usage(_))));
    }

    #[test]
    fn console_log_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let home = tempfile::tempdir().unwrap();
        let p = console_log(home.path(), "alice", "vm").unwrap();
        assert_eq!(p, home.path().join("logs/alice/vm/console.log"));
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(p.parent().unwrap()).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(std::fs::metadata(home.path().join("logs")).unwrap().permissions().mode() & 0o777, 0o700);
    }
}
