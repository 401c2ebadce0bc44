//! A running QEMU process and its life cycle: cold boot or resume from a memory image, suspend to a memory
//! image, power off, wait for the guest to shut down.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::process::Command;

use crate::config::{Network, VmConfig};
use crate::driver::{ProcessExit, QemuDriver, VmmDriver, VmmProcess};
use crate::error::VmmError;
use crate::qmp::{QmpClient, QmpError};

/// Oldest QEMU with `file:` migration and the `mapped-ram` capability that this crate relies on.
pub const MIN_QEMU_MAJOR: u64 = 9;
/// How long QEMU may take to open its QMP socket.
const QMP_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long QEMU may take to exit after `quit`.
const QUIT_TIMEOUT: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(25);

/// How to start a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// Boot from power-off.
    Cold,
    /// Resume from a memory image written by [`Vm::suspend`] with the same machine description.
    Incoming { memory_image_path: PathBuf },
}

/// How QEMU ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmExit {
    /// QEMU's exit code (`None` when killed by a signal, or when QEMU was not isr's child: under libvirt).
    pub code: Option<i32>,
    /// The `reason` of QEMU's last SHUTDOWN event, when one was seen: `guest-shutdown` (the guest powered
    /// off), `guest-reset` (rebooted, with `-no-reboot`), `guest-panic`, `host-qmp-quit`, `host-signal`, ...
    pub reason: Option<String>,
}

impl VmExit {
    /// QEMU exited with status 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
    /// The guest itself shut down, rebooted or panicked.
    pub fn guest_initiated(&self) -> bool {
        self.reason.as_deref().is_some_and(|r| r.starts_with("guest-"))
    }
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.code {
            Some(c) => write!(f, "exit code {c}")?,
            None => write!(f, "no exit code")?,
        }
        if let Some(r) = &self.reason {
            write!(f, ", {r}")?;
        }
        Ok(())
    }
}

/// What [`Vm::suspend`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SuspendInfo {
    pub path: PathBuf,
    /// Apparent file size (RAM at fixed offsets plus device state).
    pub file_size: u64,
    /// Bytes the file really occupies on disk (zero pages are holes).
    pub allocated: u64,
    pub elapsed: Duration,
}

/// Makes the child spawned by `cmd` get SIGKILL when its parent goes (`PR_SET_PDEATHSIG`), so a QEMU never
/// outlives the process that runs it, even after a `kill -9` of that process.
///
/// The kernel sends the signal when the *thread* that forked the child ends, not the process: spawn from a
/// thread that lives as long as the child (a tokio runtime worker or the thread running `block_on`), never
/// from a `spawn_blocking` thread, which the runtime lets go after a while idle.
pub(crate) fn die_with_parent(cmd: &mut Command) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the forked child before exec and only makes async-signal-safe system calls
    // (prctl, getppid) without allocating: `from_raw_os_error` and `last_os_error` do not allocate.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl: then nobody would send the signal.
            if libc::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// A running QEMU. Dropping it kills QEMU (SIGKILL; a libvirt domain is destroyed); use [`Vm::suspend`] or
/// [`Vm::poweroff`] to stop it. QEMU also dies with the process (see [`Vm::start`]).
#[derive(Debug)]
pub struct Vm {
    process: Box<dyn VmmProcess>,
    qmp: QmpClient,
    shutdown_reason: Option<String>,
    exit: Option<VmExit>,
    qmp_socket: PathBuf,
    config: VmConfig,
    _run_dir: Option<tempfile::TempDir>,
}

impl Vm {
    /// Starts QEMU as a child of this process ([`QemuDriver`]). With [`Start::Incoming`] it loads the memory
    /// image and lets the guest continue; a bad image gives [`VmmError::MemoryImageRejected`] (QEMU is
    /// stopped then).
    ///
    /// QEMU gets SIGKILL when the thread calling this ends (`PR_SET_PDEATHSIG`): call it from a thread that
    /// lives as long as the VM (a tokio worker or `block_on` thread, not `spawn_blocking`).
    pub async fn start(config: VmConfig, start: Start) -> Result<Vm, VmmError> {
        Vm::start_with(&QemuDriver, config, start).await
    }

    /// [`Vm::start`] with QEMU run by `driver`.
    pub async fn start_with(driver: &dyn VmmDriver, config: VmConfig, start: Start) -> Result<Vm, VmmError> {
        let mut vm = Vm::start_paused_with(driver, config, start).await?;
        vm.cont().await?;
        Ok(vm)
    }

    /// Like [`Vm::start`], but the guest does not run yet (QEMU `-S`; with [`Start::Incoming`] the memory
    /// image is loaded): call [`Vm::cont`]. Lets the caller record that the image is in use before the
    /// guest changes anything.
    pub async fn start_paused(config: VmConfig, start: Start) -> Result<Vm, VmmError> {
        Vm::start_paused_with(&QemuDriver, config, start).await
    }

    /// [`Vm::start_paused`] with QEMU run by `driver`.
    pub async fn start_paused_with(
        driver: &dyn VmmDriver,
        config: VmConfig,
        start: Start,
    ) -> Result<Vm, VmmError> {
        let (run_dir, qmp_socket) = match &config.runtime_dir {
            Some(dir) => (None, dir.join("qmp.sock")),
            None => {
                let d = tempfile::Builder::new()
                    .prefix("isr-vmm-")
                    .tempdir()
                    .map_err(|source| VmmError::Io { what: "creating a runtime directory".into(), source })?;
                let sock = d.path().join("qmp.sock");
                (Some(d), sock)
            }
        };
        if config.runtime_dir.is_some() {
            // a socket left by an earlier QEMU in the same directory
            let _ = std::fs::remove_file(&qmp_socket);
        }
        let saved_with = match &start {
            Start::Incoming { memory_image_path } => check_image(memory_image_path, &config)?.capabilities,
            Start::Cold => Vec::new(),
        };
        let incoming = matches!(start, Start::Incoming { .. });
        let mut process = driver.launch(&config, &qmp_socket, incoming).await?;

        // connect to QMP as soon as QEMU has created the socket
        let deadline = Instant::now() + QMP_CONNECT_TIMEOUT;
        let qmp = loop {
            if let Ok(Some(exit)) = process.try_wait() {
                return Err(exited_error(exit, process.as_mut()).await);
            }
            match QmpClient::connect(&qmp_socket).await {
                Ok(q) => break q,
                Err(QmpError::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                    ) && Instant::now() < deadline =>
                {
                    tokio::time::sleep(POLL).await;
                }
                Err(e) => {
                    // a QMP connection that fails after QEMU created the socket usually means QEMU is exiting
                    if let Ok(Ok(exit)) = tokio::time::timeout(Duration::from_secs(2), process.wait()).await {
                        return Err(exited_error(exit, process.as_mut()).await);
                    }
                    process.kill().await;
                    return Err(match e {
                        QmpError::Io(e) if Instant::now() >= deadline => VmmError::Timeout(format!(
                            "connecting to QEMU's QMP socket {}: {e}",
                            qmp_socket.display()
                        )),
                        e => VmmError::Qmp(e),
                    });
                }
            }
        };
        let mut vm =
            Vm { process, qmp, shutdown_reason: None, exit: None, qmp_socket, config, _run_dir: run_dir };
        match vm.qmp.qemu_major() {
            Some(major) if major >= MIN_QEMU_MAJOR => {}
            _ => {
                let found = vm.qmp.version().get("qemu").map(Value::to_string).unwrap_or_default();
                let _ = vm.poweroff().await;
                return Err(VmmError::QemuTooOld { found, required: MIN_QEMU_MAJOR });
            }
        }
        if let Start::Incoming { memory_image_path } = start {
            if let Err(e) = vm.incoming(&memory_image_path, &saved_with).await {
                let _ = vm.poweroff().await;
                return Err(e);
            }
        }
        // After the memory image is loaded (it carries the link state it was saved with), before the guest
        // runs: the link is up exactly with NAT.
        if let Err(e) = vm.set_link().await {
            let _ = vm.poweroff().await;
            return Err(e);
        }
        Ok(vm)
    }

    /// Sets the NIC's link to what [`VmConfig::network`] says.
    async fn set_link(&mut self) -> Result<(), VmmError> {
        if !self.config.nic {
            return Ok(());
        }
        let up = self.config.network == Network::Nat;
        match self.qmp.execute("set_link", Some(json!({"name": self.process.nic_id(), "up": up}))).await {
            Ok(_) => Ok(()),
            Err(e) => Err(self.died_or(e.into()).await),
        }
    }

    /// Lets the guest of a VM started with [`Vm::start_paused`] run.
    pub async fn cont(&mut self) -> Result<(), VmmError> {
        match self.qmp.execute("cont", None).await {
            Ok(_) => Ok(()),
            Err(e) => {
                let e = self.died_or(e.into()).await;
                let _ = self.poweroff().await;
                Err(e)
            }
        }
    }

    /// Loads the memory image at `path`, with the migration capabilities it was saved with.
    async fn incoming(&mut self, path: &Path, saved_with: &[String]) -> Result<(), VmmError> {
        let rejected = |reason: String| VmmError::MemoryImageRejected { path: path.to_owned(), reason };
        let has = |cap: &str| saved_with.iter().any(|c| c == cap);
        self.set_migration_caps(has(MAPPED_RAM), has(IGNORE_SHARED)).await?;
        let uri = file_uri(path);
        match self.qmp.execute("migrate-incoming", Some(json!({"uri": uri, "exit-on-error": false}))).await {
            Ok(_) => {}
            Err(QmpError::Command { desc, .. }) => return Err(rejected(desc)),
            Err(e) => return Err(self.died_or(e.into()).await),
        }
        match self.wait_migration().await {
            Ok(()) => {}
            Err(MigrationEnd::Failed(reason)) => return Err(rejected(reason)),
            Err(MigrationEnd::Other(e)) => {
                return Err(match self.died_or(e).await {
                    VmmError::QemuExited { stderr, .. } => {
                        rejected(format!("QEMU exited: {}", stderr.trim()))
                    }
                    e => e,
                })
            }
        }
        Ok(())
    }

    /// The capabilities a memory image is saved with and must be loaded with (both sides must agree):
    /// - `mapped-ram`: RAM pages at fixed offsets of a sparse file (zero pages are holes). multifd is optional
    ///   for mapped-ram and not used (one channel is fast enough for a stopped guest and keeps the file layout
    ///   independent of thread counts).
    /// - `x-ignore-shared`: RAM that is a shared file ([`VmConfig::shared_ram`]) is not saved at all: the
    ///   image is the device state only.
    async fn set_migration_caps(&mut self, mapped_ram: bool, ignore_shared: bool) -> Result<(), VmmError> {
        let caps = json!({"capabilities": [
            {"capability": MAPPED_RAM, "state": mapped_ram},
            {"capability": IGNORE_SHARED, "state": ignore_shared},
        ]});
        match self.qmp.execute("migrate-set-capabilities", Some(caps)).await {
            Ok(_) => Ok(()),
            Err(e) => Err(self.died_or(e.into()).await),
        }
    }

    /// Polls `query-migrate` until it completes.
    async fn wait_migration(&mut self) -> Result<(), MigrationEnd> {
        loop {
            let info =
                self.qmp.execute("query-migrate", None).await.map_err(|e| MigrationEnd::Other(e.into()))?;
            match info.get("status").and_then(Value::as_str).unwrap_or("none") {
                "completed" => return Ok(()),
                "failed" | "cancelled" | "cancelling" => {
                    let desc = info.get("error-desc").and_then(Value::as_str).unwrap_or("migration failed");
                    return Err(MigrationEnd::Failed(desc.to_owned()));
                }
                _ => tokio::time::sleep(POLL).await,
            }
        }
    }

    /// Saves the guest's memory and device state to `memory_image_path` and stops QEMU. With
    /// [`VmConfig::shared_ram`] only the device state is saved: the RAM is in its file, complete once QEMU
    /// has exited (the caller writes back what the guest dirtied, e.g. with an fsync of the file).
    ///
    /// The image is written to `PATH.partial`, synced, then renamed over `PATH`, so `PATH` is either the
    /// previous image or the new complete one. On failure the guest is resumed and keeps running, and
    /// [`VmmError::SuspendFailed`] is returned.
    pub async fn suspend(&mut self, memory_image_path: &Path) -> Result<SuspendInfo, VmmError> {
        let whole = self.config.shared_ram.is_none();
        self.save(memory_image_path, whole).await
    }

    /// Like [`Vm::suspend`], but the image holds the RAM too even when it is a shared file: a whole memory
    /// image, which loads into a VM with QEMU's own RAM (e.g. under libvirt).
    pub async fn save_whole(&mut self, memory_image_path: &Path) -> Result<SuspendInfo, VmmError> {
        self.save(memory_image_path, true).await
    }

    async fn save(&mut self, memory_image_path: &Path, whole: bool) -> Result<SuspendInfo, VmmError> {
        self.ensure_running()?;
        let started = Instant::now();
        let mut partial = memory_image_path.as_os_str().to_owned();
        partial.push(".partial");
        let partial = PathBuf::from(partial);
        let failed = |reason: String| VmmError::SuspendFailed { path: memory_image_path.to_owned(), reason };
        match std::fs::remove_file(&partial) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(failed(format!("removing {}: {e}", partial.display()))),
        }
        self.set_migration_caps(whole, !whole).await?;
        if let Err(e) = self.qmp.execute("stop", None).await {
            return Err(self.died_or(e.into()).await);
        }
        let result = match self.qmp.execute("migrate", Some(json!({"uri": file_uri(&partial)}))).await {
            Ok(_) => self.wait_migration().await,
            Err(QmpError::Command { desc, .. }) => Err(MigrationEnd::Failed(desc)),
            Err(e) => Err(MigrationEnd::Other(e.into())),
        };
        match result {
            Ok(()) => {}
            Err(MigrationEnd::Failed(reason)) => {
                let _ = std::fs::remove_file(&partial);
                // keep the guest alive: nothing is lost
                let _ = self.qmp.execute("cont", None).await;
                return Err(failed(reason));
            }
            Err(MigrationEnd::Other(e)) => {
                let _ = std::fs::remove_file(&partial);
                return Err(self.died_or(e).await);
            }
        }
        let finish = || -> std::io::Result<(u64, u64)> {
            use std::os::unix::fs::MetadataExt;
            let f = std::fs::File::open(&partial)?;
            f.sync_all()?;
            let meta = f.metadata()?;
            std::fs::rename(&partial, memory_image_path)?;
            if let Some(dir) = memory_image_path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok((meta.len(), meta.blocks() * 512))
        };
        let (file_size, allocated) = match finish() {
            Ok(v) => v,
            Err(e) => {
                let _ = std::fs::remove_file(&partial);
                let _ = self.qmp.execute("cont", None).await;
                return Err(failed(e.to_string()));
            }
        };
        // the image is safe: QEMU may go (it flushed the disk when the migration completed)
        self.quit().await?;
        Ok(SuspendInfo {
            path: memory_image_path.to_owned(),
            file_size,
            allocated,
            elapsed: started.elapsed(),
        })
    }

    /// Stops QEMU without saving memory (like pulling the plug; the disk has what the guest flushed).
    pub async fn poweroff(&mut self) -> Result<VmExit, VmmError> {
        if let Some(exit) = &self.exit {
            return Ok(exit.clone());
        }
        self.quit().await
    }

    async fn quit(&mut self) -> Result<VmExit, VmmError> {
        // QEMU may close the socket before (or instead of) answering `quit`
        let _ = tokio::time::timeout(QUIT_TIMEOUT, self.qmp.execute("quit", None)).await;
        let exit = match tokio::time::timeout(QUIT_TIMEOUT, self.wait_inner()).await {
            Ok(r) => r?,
            Err(_) => {
                tracing::warn!("QEMU did not exit after quit; killing it");
                self.process.kill().await;
                self.wait_inner().await?
            }
        };
        Ok(exit)
    }

    /// Waits until QEMU exits: the guest powered off, rebooted (`-no-reboot`) or panicked, or QEMU was
    /// stopped some other way. Cancel-safe (usable in `tokio::select!` with a signal).
    pub async fn wait(&mut self) -> Result<VmExit, VmmError> {
        self.wait_inner().await
    }

    async fn wait_inner(&mut self) -> Result<VmExit, VmmError> {
        if let Some(exit) = &self.exit {
            return Ok(exit.clone());
        }
        let mut qmp_open = true;
        let status = loop {
            tokio::select! {
                biased;
                ev = self.qmp.next_event(), if qmp_open => match ev {
                    Ok(ev) if ev.name == "SHUTDOWN" => {
                        self.shutdown_reason = ev.data.get("reason").and_then(Value::as_str).map(str::to_owned);
                    }
                    Ok(ev) => tracing::debug!("QMP event {}", ev.name),
                    Err(_) => qmp_open = false,
                },
                status = self.process.wait() => break status?,
            }
        };
        // QEMU has exited: what it wrote to QMP before (e.g. SHUTDOWN) may still be unread
        if qmp_open {
            let drain = async {
                while let Ok(ev) = self.qmp.next_event().await {
                    if ev.name == "SHUTDOWN" {
                        self.shutdown_reason =
                            ev.data.get("reason").and_then(Value::as_str).map(str::to_owned);
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
        }
        let exit = VmExit { code: status.code, reason: self.shutdown_reason.clone() };
        self.exit = Some(exit.clone());
        Ok(exit)
    }

    /// QEMU's process id.
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// The libvirt domain running this VM (`None` under QEMU-direct): record it to destroy it after a crash.
    pub fn domain(&self) -> Option<crate::libvirt::DomainRef> {
        self.process.domain()
    }

    /// The configuration QEMU was started with.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Set the VNC password of a VM started with `Display::Vnc` on a network address (at most 8 characters
    /// count: that is the VNC protocol's limit).
    pub async fn set_vnc_password(&mut self, password: &str) -> Result<(), VmmError> {
        self.qmp()
            .execute("change-vnc-password", Some(serde_json::json!({"password": password})))
            .await
            .map(|_| ())
            .map_err(VmmError::from)
    }

    /// Where QEMU's VNC server listens (`query-vnc`), e.g. `127.0.0.1:5900`.
    pub async fn vnc_address(&mut self) -> Result<Option<String>, VmmError> {
        let v = self.qmp().execute("query-vnc", None).await?;
        Ok(match (v.get("host").and_then(|h| h.as_str()), v.get("service").and_then(|s| s.as_str())) {
            (Some(h), Some(s)) => Some(format!("{h}:{s}")),
            _ => None,
        })
    }

    /// The QMP socket (in [`VmConfig::runtime_dir`], else in a private directory removed when the `Vm` is
    /// dropped).
    pub fn qmp_socket(&self) -> &Path {
        &self.qmp_socket
    }

    /// The QMP connection, for other commands (e.g. `query-status`).
    pub fn qmp(&mut self) -> &mut QmpClient {
        &mut self.qmp
    }

    /// The concrete machine type behind an alias like `pc`, e.g. `pc-i440fx-10.0`: store it with the memory
    /// image to resume it under a newer QEMU.
    pub async fn machine_type(&mut self) -> Result<String, VmmError> {
        let v = self.qmp.execute("qom-get", Some(json!({"path": "/machine", "property": "type"}))).await?;
        let t = v.as_str().unwrap_or_default();
        Ok(t.strip_suffix("-machine").unwrap_or(t).to_owned())
    }

    /// The last lines QEMU wrote to stderr.
    pub fn stderr_tail(&self) -> String {
        self.process.stderr_tail()
    }

    fn ensure_running(&mut self) -> Result<(), VmmError> {
        if self.exit.is_some() || matches!(self.process.try_wait(), Ok(Some(_))) {
            return Err(VmmError::NotRunning);
        }
        Ok(())
    }

    /// If QEMU died, an error with its exit status and stderr; else `e`.
    async fn died_or(&mut self, e: VmmError) -> VmmError {
        // give a dying QEMU a moment to be reaped
        let status = match tokio::time::timeout(Duration::from_millis(500), self.process.wait()).await {
            Ok(Ok(status)) => status,
            _ => return e,
        };
        self.exit = Some(VmExit { code: status.code, reason: self.shutdown_reason.clone() });
        exited_error(status, self.process.as_mut()).await
    }
}

enum MigrationEnd {
    /// QEMU reported the migration failed (with its error description).
    Failed(String),
    Other(VmmError),
}

/// Refuses an image that is unreadable, not a QEMU memory image, or of a VM with another memory size (which
/// QEMU 10 would load without complaint when the image uses mapped-ram).
/// An image saved with `x-ignore-shared` (device state only) needs the RAM file it was saved beside.
fn check_image(path: &Path, config: &VmConfig) -> Result<crate::image::MemoryImageInfo, VmmError> {
    let rejected = |reason: String| VmmError::MemoryImageRejected { path: path.to_owned(), reason };
    let info = crate::image::inspect_memory_image(path).map_err(|e| rejected(e.to_string()))?;
    let want = u64::from(config.memory_mib) << 20;
    match info.ram_bytes {
        Some(have) if have != want => {
            return Err(rejected(format!(
                "it was saved from a VM with {} MiB of memory, this VM has {} MiB",
                have >> 20,
                config.memory_mib
            )))
        }
        _ => {}
    }
    if info.devices_only() && config.shared_ram.is_none() {
        return Err(rejected(
            "it holds the device state only (its RAM was a shared file), and this VM has no shared RAM file"
                .into(),
        ));
    }
    Ok(info)
}

const MAPPED_RAM: &str = "mapped-ram";
const IGNORE_SHARED: &str = "x-ignore-shared";

fn file_uri(path: &Path) -> String {
    format!("file:{}", path.display())
}

async fn exited_error(exit: ProcessExit, process: &mut dyn VmmProcess) -> VmmError {
    VmmError::QemuExited { status: exit.description, stderr: process.stderr().await }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Stdio;

    /// State letter of /proc/PID/stat (`Z` for a zombie), `None` once the process is gone.
    fn proc_state(pid: u32) -> Option<char> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit(')').next()?.trim().chars().next()
    }

    #[test]
    fn child_dies_with_the_thread_that_spawned_it() {
        let spawner = std::thread::spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let mut cmd = Command::new("sleep");
                cmd.arg("600").stdin(Stdio::null());
                die_with_parent(&mut cmd);
                let child = cmd.spawn().expect("spawning sleep");
                let pid = child.id().unwrap();
                // neither killed nor waited for: only PR_SET_PDEATHSIG can end it
                std::mem::forget(child);
                pid
            })
        });
        let pid = spawner.join().unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        while matches!(proc_state(pid), Some(s) if s != 'Z') {
            assert!(Instant::now() < deadline, "sleep (pid {pid}) outlived the thread that spawned it");
            std::thread::sleep(Duration::from_millis(20));
        }
        // reap it
        // SAFETY: waitpid on our own child's pid with a valid status pointer.
        #[allow(unsafe_code)]
        unsafe {
            let mut status = 0;
            libc::waitpid(pid as libc::pid_t, &mut status, 0);
        }
    }
}
