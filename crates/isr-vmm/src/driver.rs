//! The VMM driver interface: how QEMU is run for a [`crate::Vm`].
//!
//! Both drivers run the same QEMU with the same guest-visible machine and drive it over the same QMP
//! protocol (a memory image written under one resumes under the other): what differs is who starts the
//! QEMU process, how its end is noticed and how it is killed. So a driver ([`VmmDriver`]) launches a paused
//! QEMU with its QMP monitor on a given socket and hands back the process ([`VmmProcess`]); [`crate::Vm`]
//! does the life cycle on top (cold start, start from a memory image, suspend, power off, waiting for the
//! guest and its events) the same way for every driver.
//!
//! - [`QemuDriver`]: QEMU as a child of this process (`PR_SET_PDEATHSIG`: it dies with the thread that
//!   started it).
//! - [`crate::LibvirtDriver`]: QEMU run by a libvirt daemon as a transient domain (see [`crate::libvirt`]).

use std::collections::VecDeque;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

use crate::config::VmConfig;
use crate::error::VmmError;

/// A boxed future, for the object-safe driver traits.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

const STDERR_LINES: usize = 40;

/// Which driver runs the VM (`isr resume --vmm qemu|libvirt`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VmmKind {
    /// QEMU as a child process of isr.
    #[default]
    Qemu,
    /// QEMU run by libvirt (`qemu:///system`), driven with `virsh`.
    Libvirt,
}

impl VmmKind {
    pub fn as_str(self) -> &'static str {
        match self {
            VmmKind::Qemu => "qemu",
            VmmKind::Libvirt => "libvirt",
        }
    }

    /// The driver with its default settings.
    pub fn driver(self) -> Box<dyn VmmDriver> {
        match self {
            VmmKind::Qemu => Box::new(QemuDriver),
            VmmKind::Libvirt => Box::new(crate::libvirt::LibvirtDriver::default()),
        }
    }
}

impl std::str::FromStr for VmmKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "qemu" => Ok(VmmKind::Qemu),
            "libvirt" => Ok(VmmKind::Libvirt),
            other => Err(format!("unknown VMM driver {other:?} (qemu or libvirt)")),
        }
    }
}

impl std::fmt::Display for VmmKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Runs QEMU processes for [`crate::Vm`].
pub trait VmmDriver: Send + Sync + std::fmt::Debug {
    fn kind(&self) -> VmmKind;

    /// Makes sure the driver can start VMs, starting what it needs when it can (the libvirt driver starts a
    /// daemon when none answers), else an error that says what to install or start. Cheap when all is there;
    /// call it before anything else of a resume. Returns what it did for the user to know (e.g. that it
    /// started a daemon).
    fn prepare(&self) -> BoxFuture<'_, Result<Option<String>, VmmError>>;

    /// Starts QEMU for `config` with its guest paused (`-S`) and a QMP monitor listening on `qmp_socket`;
    /// with `incoming` it also waits for a memory image (`-incoming defer`).
    ///
    /// The process must not outlive the thread that calls this (see [`crate::Vm::start`]).
    fn launch<'a>(
        &'a self,
        config: &'a VmConfig,
        qmp_socket: &'a Path,
        incoming: bool,
    ) -> BoxFuture<'a, Result<Box<dyn VmmProcess>, VmmError>>;
}

/// How a QEMU process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessExit {
    /// The exit code, when known (`None`: killed by a signal, or not a child of this process).
    pub code: Option<i32>,
    /// For messages, e.g. `exit status: 1`.
    pub description: String,
}

/// One QEMU process started by a [`VmmDriver`].
pub trait VmmProcess: Send + std::fmt::Debug {
    /// QEMU's process id.
    fn pid(&self) -> Option<u32>;

    /// The libvirt domain running it (`None` for QEMU-direct).
    fn domain(&self) -> Option<crate::libvirt::DomainRef> {
        None
    }

    /// The QEMU id of the NIC (for QMP `set_link`).
    fn nic_id(&self) -> &str {
        crate::config::NIC_ID
    }

    /// Waits until QEMU has exited. Cancel-safe.
    fn wait(&mut self) -> BoxFuture<'_, Result<ProcessExit, VmmError>>;

    /// Whether QEMU has exited, without waiting.
    fn try_wait(&mut self) -> Result<Option<ProcessExit>, VmmError>;

    /// Ends QEMU at once (SIGKILL, or the domain destroyed) and waits for it.
    fn kill(&mut self) -> BoxFuture<'_, ()>;

    /// What QEMU last wrote to stderr; after it exited, waits (briefly) until all of it was read.
    fn stderr(&mut self) -> BoxFuture<'_, String>;

    /// The last lines QEMU wrote to stderr so far.
    fn stderr_tail(&self) -> String;
}

/// QEMU-direct: QEMU as a child of this process.
#[derive(Debug, Clone, Copy, Default)]
pub struct QemuDriver;

impl VmmDriver for QemuDriver {
    fn kind(&self) -> VmmKind {
        VmmKind::Qemu
    }

    fn prepare(&self) -> BoxFuture<'_, Result<Option<String>, VmmError>> {
        // A missing or too old QEMU is found when it starts, with its own error.
        Box::pin(async { Ok(None) })
    }

    fn launch<'a>(
        &'a self,
        config: &'a VmConfig,
        qmp_socket: &'a Path,
        incoming: bool,
    ) -> BoxFuture<'a, Result<Box<dyn VmmProcess>, VmmError>> {
        Box::pin(async move {
            let mut args = config.qemu_args(qmp_socket, incoming);
            if !incoming {
                // incoming already implies -S
                args.insert(0, "-S".into());
            }
            tracing::debug!("starting {} {:?}", config.qemu.display(), args);
            let mut cmd = Command::new(&config.qemu);
            cmd.args(&args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                // own process group: a Ctrl-C on the terminal reaches isr (which then suspends), not QEMU
                .process_group(0)
                .kill_on_drop(true);
            crate::vm::die_with_parent(&mut cmd);
            let mut child = cmd.spawn().map_err(|source| {
                if source.kind() == std::io::ErrorKind::NotFound {
                    VmmError::QemuNotFound { binary: config.qemu.clone() }
                } else {
                    VmmError::Spawn { binary: config.qemu.clone(), source }
                }
            })?;
            let tail = Arc::new(Mutex::new(VecDeque::new()));
            let task = child.stderr.take().map(|pipe| {
                let tail = tail.clone();
                tokio::spawn(async move {
                    let mut lines = BufReader::new(pipe).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        tracing::debug!("qemu: {line}");
                        push_line(&tail, line);
                    }
                })
            });
            Ok(Box::new(QemuProcess { child, tail, task }) as Box<dyn VmmProcess>)
        })
    }
}

/// Keeps the last [`STDERR_LINES`] lines.
pub(crate) fn push_line(tail: &Mutex<VecDeque<String>>, line: String) {
    let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
    if t.len() >= STDERR_LINES {
        t.pop_front();
    }
    t.push_back(line);
}

fn joined(tail: &Mutex<VecDeque<String>>) -> String {
    let t = tail.lock().unwrap_or_else(|e| e.into_inner());
    t.iter().map(String::as_str).collect::<Vec<_>>().join("\n")
}

#[derive(Debug)]
struct QemuProcess {
    child: Child,
    tail: Arc<Mutex<VecDeque<String>>>,
    task: Option<JoinHandle<()>>,
}

fn process_exit(status: std::process::ExitStatus) -> ProcessExit {
    ProcessExit { code: status.code(), description: status.to_string() }
}

impl VmmProcess for QemuProcess {
    fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    fn wait(&mut self) -> BoxFuture<'_, Result<ProcessExit, VmmError>> {
        Box::pin(async move {
            let status = self
                .child
                .wait()
                .await
                .map_err(|source| VmmError::Io { what: "waiting for QEMU".into(), source })?;
            Ok(process_exit(status))
        })
    }

    fn try_wait(&mut self) -> Result<Option<ProcessExit>, VmmError> {
        self.child
            .try_wait()
            .map(|s| s.map(process_exit))
            .map_err(|source| VmmError::Io { what: "waiting for QEMU".into(), source })
    }

    fn kill(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let _ = self.child.start_kill();
            let _ = self.child.wait().await;
        })
    }

    fn stderr(&mut self) -> BoxFuture<'_, String> {
        Box::pin(async move {
            if let Some(task) = self.task.take() {
                let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
            }
            joined(&self.tail)
        })
    }

    fn stderr_tail(&self) -> String {
        joined(&self.tail)
    }
}

/// `binary` as an absolute path: itself when it has a `/`, else the first match in `PATH`.
pub(crate) fn resolve_binary(binary: &Path) -> Option<PathBuf> {
    if binary.as_os_str().to_string_lossy().contains('/') {
        return std::path::absolute(binary).ok().filter(|p| p.exists());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(binary)).find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse_and_print() {
        assert_eq!("qemu".parse::<VmmKind>(), Ok(VmmKind::Qemu));
        assert_eq!("libvirt".parse::<VmmKind>(), Ok(VmmKind::Libvirt));
        assert!("xen".parse::<VmmKind>().is_err());
        assert_eq!(VmmKind::Libvirt.to_string(), "libvirt");
        assert_eq!(VmmKind::default(), VmmKind::Qemu);
        assert_eq!(VmmKind::Libvirt.driver().kind(), VmmKind::Libvirt);
    }

    #[test]
    fn binaries_resolve_in_path() {
        let sh = resolve_binary(Path::new("sh")).expect("sh in PATH");
        assert!(sh.is_absolute());
        assert_eq!(resolve_binary(Path::new("/nonexistent/qemu")), None);
        assert_eq!(resolve_binary(Path::new("isr-no-such-binary")), None);
    }
}
