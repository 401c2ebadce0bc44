//! The libvirt driver: QEMU run by a libvirt daemon (`qemu:///system`) as a transient domain, driven with
//! `virsh` as a subprocess (isr links no libvirt library).
//!
//! - The domain XML ([`domain_xml`]) describes the same guest-visible machine as QEMU-direct's command line
//!   ([`VmConfig::qemu_args`]): the same machine type, devices, properties and PCI addresses
//!   ([`crate::PciSlots`]), libvirt's own defaults (USB controller, memory balloon, ...) switched off. So a
//!   memory image saved under one driver resumes under the other.
//! - What libvirt does not offer (migration to isr's `file:` memory image with `mapped-ram`,
//!   `migrate-incoming`, `set_link`, the VNC password) goes over a second QMP monitor that the domain gets
//!   through `<qemu:commandline>` (`-qmp unix:…`, and `-incoming defer` for a resume): [`crate::Vm`] drives
//!   it exactly as it drives QEMU-direct. libvirt marks such a domain *tainted* (`custom-argv`); that is
//!   expected.
//! - The domain is created with `virsh create --paused --autodestroy` from a `virsh` shell that isr keeps
//!   running for the life of the VM: libvirt destroys an autodestroy domain when the connection that created
//!   it closes, and that `virsh` dies with isr (`PR_SET_PDEATHSIG`), so the domain never outlives isr, even
//!   after a `kill -9`.
//! - Security labels: QEMU runs with isr's own uid and gid and no relabelling (`<seclabel type='static'
//!   model='dac' relabel='no'>`), and with no MAC confinement (`type='none'` for AppArmor/SELinux when the
//!   daemon has them): it reads isr's private runtime directory (0700) and nothing is relabelled.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

use crate::config::{Accel, Display, Network, PciSlots, VmConfig, NIC_MAC};
use crate::driver::{push_line, resolve_binary, BoxFuture, ProcessExit, VmmDriver, VmmKind, VmmProcess};
use crate::error::VmmError;

/// The connection URI the driver uses unless told otherwise.
pub const DEFAULT_URI: &str = "qemu:///system";
/// libvirt's alias (and so QEMU id) of the NIC (user aliases start with `ua-`).
pub const NIC_ALIAS: &str = "ua-nic0";
/// How long the daemon may take to answer after isr started it.
const DAEMON_START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `virsh create` may take (long: a daemon probes QEMU's capabilities again now and then, which
/// takes a minute or more on a loaded machine).
const CREATE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long one other `virsh` command may take (`virsh capabilities` may probe QEMU likewise).
const VIRSH_TIMEOUT: Duration = Duration::from_secs(300);
const POLL: Duration = Duration::from_millis(50);
/// Where a system daemon's QEMU logs go (QEMU's stderr among them).
const SYSTEM_QEMU_LOGS: &str = "/var/log/libvirt/qemu";
/// virtlogd's socket of a system daemon: the QEMU driver needs it for QEMU's logs and the serial log.
const SYSTEM_VIRTLOGD_SOCKET: &str = "/run/libvirt/virtlogd-sock";

/// A libvirt domain: which daemon runs it and its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainRef {
    pub uri: String,
    pub name: String,
}

impl std::fmt::Display for DomainRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "libvirt domain {} ({})", self.name, self.uri)
    }
}

/// Runs VMs as transient libvirt domains through `virsh`.
#[derive(Debug)]
pub struct LibvirtDriver {
    /// The connection URI, default [`DEFAULT_URI`].
    pub uri: String,
    /// The `virsh` binary (looked up in `PATH` when relative).
    pub virsh: PathBuf,
    /// The daemon's security drivers, asked once ([`VmmDriver::prepare`] does).
    security_models: tokio::sync::OnceCell<Vec<String>>,
}

impl LibvirtDriver {
    pub fn new(uri: impl Into<String>, virsh: impl Into<PathBuf>) -> Self {
        LibvirtDriver { uri: uri.into(), virsh: virsh.into(), security_models: Default::default() }
    }
}

impl Default for LibvirtDriver {
    fn default() -> Self {
        LibvirtDriver::new(DEFAULT_URI, "virsh")
    }
}

fn libvirt_error(what: impl Into<String>, detail: impl Into<String>) -> VmmError {
    VmmError::Libvirt { what: what.into(), detail: detail.into() }
}

/// Output of one `virsh` command.
struct VirshOutput {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl LibvirtDriver {
    fn virsh_binary(&self) -> Result<PathBuf, VmmError> {
        resolve_binary(&self.virsh).ok_or_else(|| {
            libvirt_error(
                format!("{} not found", self.virsh.display()),
                "the libvirt driver drives libvirt with virsh: install libvirt-clients (Debian)",
            )
        })
    }

    async fn virsh(&self, args: &[&str]) -> Result<VirshOutput, VmmError> {
        let virsh = self.virsh_binary()?;
        let mut cmd = Command::new(&virsh);
        cmd.arg("-q").arg("-c").arg(&self.uri).args(args).stdin(Stdio::null()).kill_on_drop(true);
        let out = tokio::time::timeout(VIRSH_TIMEOUT, cmd.output())
            .await
            .map_err(|_| VmmError::Timeout(format!("waiting for virsh {}", args.join(" "))))?
            .map_err(|source| VmmError::Io { what: format!("running {}", virsh.display()), source })?;
        Ok(VirshOutput {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }

    /// Whether a daemon answers at the URI (`Err` with virsh's words when not).
    async fn answers(&self) -> Result<Result<(), String>, VmmError> {
        let out = self.virsh(&["uri"]).await?;
        Ok(if out.ok { Ok(()) } else { Err(out.stderr) })
    }

    /// The security drivers of the daemon (`none`, `dac`, `apparmor`, `selinux`), from its capabilities.
    async fn security_models(&self) -> Result<&[String], VmmError> {
        let models = self
            .security_models
            .get_or_try_init(|| async {
                let out = self.virsh(&["capabilities"]).await?;
                if !out.ok {
                    return Err(libvirt_error("reading the host capabilities", out.stderr));
                }
                Ok(security_models(&out.stdout))
            })
            .await?;
        Ok(models)
    }

    /// Starts virtlogd and the QEMU driver's daemon of a local system URI (daemonized: they outlive isr, like
    /// a daemon started by the init system). Returns what was started.
    async fn start_daemon(&self, why: &str) -> Result<String, VmmError> {
        let how = "start one as root: `systemctl start libvirtd` (or virtqemud), or without systemd \
                   `virtlogd -d && libvirtd -d`";
        if self.uri != DEFAULT_URI {
            return Err(libvirt_error(format!("no libvirt daemon answers at {}", self.uri), why.to_owned()));
        }
        let find = |name: &str| {
            ["/usr/sbin", "/usr/local/sbin", "/sbin"]
                .iter()
                .map(|d| Path::new(d).join(name))
                .find(|p| p.is_file())
                .or_else(|| resolve_binary(Path::new(name)))
        };
        // The modular QEMU daemon where it is installed, else the monolithic one.
        let Some(daemon) = find("virtqemud").or_else(|| find("libvirtd")) else {
            return Err(libvirt_error(
                format!("no libvirt daemon answers at {} ({why}) and none is installed", self.uri),
                format!("install libvirt-daemon-system and libvirt-daemon-driver-qemu (Debian), then {how}"),
            ));
        };
        let mut started = Vec::new();
        if !virtlogd_runs() {
            if let Some(virtlogd) = find("virtlogd") {
                run_daemonizing(&virtlogd).await?;
                started.push(virtlogd.display().to_string());
            }
        }
        run_daemonizing(&daemon).await?;
        started.push(daemon.display().to_string());
        let deadline = Instant::now() + DAEMON_START_TIMEOUT;
        loop {
            match self.answers().await? {
                Ok(()) => break,
                Err(e) if Instant::now() > deadline => {
                    return Err(libvirt_error(
                        format!("started {} but no daemon answers at {}", started.join(" and "), self.uri),
                        format!("{e}; {how}"),
                    ))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        Ok(format!("started {} (no libvirt daemon answered at {})", started.join(" and "), self.uri))
    }
}

/// Runs `daemon -d` (it forks into the background and the command returns). With a clean environment: a
/// daemon outlives isr and must not keep isr's variables (`ISR_PASSWORD` among them).
async fn run_daemonizing(daemon: &Path) -> Result<(), VmmError> {
    let status = Command::new(daemon)
        .arg("-d")
        .env_clear()
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .map_err(|source| VmmError::Io { what: format!("starting {}", daemon.display()), source })?;
    if !status.success() {
        return Err(libvirt_error(
            format!("starting {} failed ({status})", daemon.display()),
            "see its log in /var/log/libvirt/ (starting a system daemon needs root)",
        ));
    }
    Ok(())
}

/// Whether virtlogd of the system daemon accepts connections (its socket file may be left by a killed one).
fn virtlogd_runs() -> bool {
    std::os::unix::net::UnixStream::connect(SYSTEM_VIRTLOGD_SOCKET).is_ok()
}

impl VmmDriver for LibvirtDriver {
    fn kind(&self) -> VmmKind {
        VmmKind::Libvirt
    }

    fn prepare(&self) -> BoxFuture<'_, Result<Option<String>, VmmError>> {
        Box::pin(async move {
            self.virsh_binary()?;
            let note = match self.answers().await? {
                Ok(()) if self.uri == DEFAULT_URI && !virtlogd_runs() => {
                    // A daemon without its log daemon cannot start QEMU.
                    match ["/usr/sbin/virtlogd", "/usr/local/sbin/virtlogd"]
                        .iter()
                        .map(Path::new)
                        .find(|p| p.is_file())
                    {
                        Some(virtlogd) => {
                            run_daemonizing(virtlogd).await?;
                            Some(format!("started {} (it was not running)", virtlogd.display()))
                        }
                        None => None,
                    }
                }
                Ok(()) => None,
                Err(why) => Some(self.start_daemon(&why).await?),
            };
            // Asked here, before the resume takes its lock: the first question after a daemon (re)starts makes
            // it probe QEMU, which takes a while.
            self.security_models().await?;
            Ok(note)
        })
    }

    fn launch<'a>(
        &'a self,
        config: &'a VmConfig,
        qmp_socket: &'a Path,
        incoming: bool,
    ) -> BoxFuture<'a, Result<Box<dyn VmmProcess>, VmmError>> {
        Box::pin(async move {
            let virsh = self.virsh_binary()?;
            let emulator = resolve_binary(&config.qemu)
                .ok_or_else(|| VmmError::QemuNotFound { binary: config.qemu.clone() })?;
            let run_dir = qmp_socket.parent().unwrap_or(Path::new("/"));
            let owner = {
                use std::os::unix::fs::MetadataExt;
                let m = std::fs::metadata(run_dir).map_err(|source| VmmError::Io {
                    what: format!("reading {}", run_dir.display()),
                    source,
                })?;
                (m.uid(), m.gid())
            };
            let name = domain_name(config.name.as_deref());
            if self.uri == DEFAULT_URI {
                remove_old_logs(Path::new(SYSTEM_QEMU_LOGS), config.name.as_deref().unwrap_or("isr"));
            }
            let settings = DomainSettings {
                name: &name,
                emulator: &emulator,
                qmp_socket,
                incoming,
                owner,
                security_models: self.security_models().await?,
                vnc_password: &random_hex(4)?,
            };
            let xml = domain_xml(config, &settings)?;
            let xml_path = run_dir.join("domain.xml");
            std::fs::write(&xml_path, &xml)
                .map_err(|source| VmmError::Io { what: format!("writing {}", xml_path.display()), source })?;
            let xml_arg = xml_path.to_str().filter(|p| !p.contains('\'')).ok_or_else(|| {
                libvirt_error("creating the domain", format!("unusable path {}", xml_path.display()))
            })?;
            tracing::debug!("creating libvirt domain {name} on {}:\n{xml}", self.uri);

            // The shell that creates the domain and holds the connection: the domain lives as long as it.
            let mut cmd = Command::new(&virsh);
            cmd.arg("-q")
                .arg("-c")
                .arg(&self.uri)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .process_group(0)
                .kill_on_drop(true);
            crate::vm::die_with_parent(&mut cmd);
            let mut shell =
                cmd.spawn().map_err(|source| VmmError::Spawn { binary: virsh.clone(), source })?;
            let tail = Arc::new(Mutex::new(VecDeque::new()));
            if let Some(pipe) = shell.stderr.take() {
                let tail = tail.clone();
                tokio::spawn(async move {
                    let mut lines = BufReader::new(pipe).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        tracing::debug!("virsh: {line}");
                        push_line(&tail, line);
                    }
                });
            }
            let domain = DomainRef { uri: self.uri.clone(), name: name.clone() };
            let mut process = LibvirtProcess {
                domain,
                virsh,
                shell,
                tail,
                pid: None,
                log: (self.uri == DEFAULT_URI)
                    .then(|| Path::new(SYSTEM_QEMU_LOGS).join(format!("{name}.log"))),
            };
            let created = process.create(xml_arg).await;
            match created {
                Ok(()) => Ok(Box::new(process) as Box<dyn VmmProcess>),
                Err(e) => {
                    process.kill().await;
                    Err(e)
                }
            }
        })
    }
}

/// The security driver models named in `virsh capabilities` output.
fn security_models(capabilities: &str) -> Vec<String> {
    let mut models = Vec::new();
    for part in capabilities.split("<secmodel>").skip(1) {
        if let Some(m) = part.split("<model>").nth(1).and_then(|m| m.split("</model>").next()) {
            models.push(m.trim().to_owned());
        }
    }
    models
}

/// A domain name unique per process and VM: `BASE-PID`, then `BASE-PID-2`, ...
fn domain_name(base: Option<&str>) -> String {
    static COUNT: AtomicU32 = AtomicU32::new(0);
    let n = COUNT.fetch_add(1, Ordering::Relaxed);
    let base = base.unwrap_or("isr");
    let pid = std::process::id();
    if n == 0 {
        format!("{base}-{pid}")
    } else {
        format!("{base}-{pid}-{}", n + 1)
    }
}

fn random_hex(bytes: usize) -> Result<String, VmmError> {
    use std::io::Read;
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(|source| VmmError::Io { what: "reading /dev/urandom".into(), source })?;
    Ok(buf.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    }))
}

/// QEMUs whose command line names libvirt domain `name` (`-name guest=NAME,...`).
fn qemu_pid_of(name: &str) -> Option<u32> {
    let needle = format!("guest={name},");
    let needle = needle.as_bytes();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        if let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) {
            if cmdline.windows(needle.len()).any(|w| w == needle) {
                return Some(pid);
            }
        }
    }
    None
}

/// Removes the QEMU logs libvirt keeps of earlier runs named `BASE-PID[-N]` (libvirt writes a domain's log
/// until after its QEMU is gone, so a run cannot remove its own): one log per VM, the last run's, stays for
/// a look after a failure.
fn remove_old_logs(dir: &Path, base: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let file = e.file_name();
        let Some(rest) =
            file.to_str().and_then(|f| f.strip_prefix(base)?.strip_prefix('-')?.strip_suffix(".log"))
        else {
            continue;
        };
        let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|p| !alive(p)) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Whether process `pid` still runs (a zombie does not).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit(')').next().and_then(|s| s.trim().chars().next()).is_some_and(|c| c != 'Z'),
        Err(_) => false,
    }
}

/// Destroys `domain` if it still exists (cleanup after a dead run); blocking. `Ok(true)` when it did.
pub fn destroy_domain_blocking(domain: &DomainRef, virsh: &Path) -> std::io::Result<bool> {
    let out = std::process::Command::new(virsh)
        .arg("-q")
        .arg("-c")
        .arg(&domain.uri)
        .arg("destroy")
        .arg(&domain.name)
        .stdin(Stdio::null())
        .output()?;
    Ok(out.status.success())
}

/// A QEMU run by libvirt.
#[derive(Debug)]
struct LibvirtProcess {
    domain: DomainRef,
    virsh: PathBuf,
    /// The `virsh` shell that created the domain with `--autodestroy`: killing it destroys the domain.
    shell: Child,
    /// What that shell wrote to stderr.
    tail: Arc<Mutex<VecDeque<String>>>,
    pid: Option<u32>,
    /// The QEMU log libvirt keeps for the domain (QEMU's stderr is in it).
    log: Option<PathBuf>,
}

impl LibvirtProcess {
    /// `virsh create --paused --autodestroy` in the shell; finds the QEMU's pid.
    async fn create(&mut self, xml_path: &str) -> Result<(), VmmError> {
        const DONE: &str = "isr-create-done";
        let stdin = self.shell.stdin.as_mut().ok_or_else(|| libvirt_error("virsh", "no stdin"))?;
        let script = format!("create --paused --autodestroy '{xml_path}'\necho {DONE}\n");
        stdin
            .write_all(script.as_bytes())
            .await
            .map_err(|source| VmmError::Io { what: "writing to virsh".into(), source })?;
        stdin.flush().await.map_err(|source| VmmError::Io { what: "writing to virsh".into(), source })?;
        let stdout = self.shell.stdout.take().ok_or_else(|| libvirt_error("virsh", "no stdout"))?;
        let mut lines = BufReader::new(stdout).lines();
        let reading = async {
            while let Some(line) = lines.next_line().await? {
                tracing::debug!("virsh: {line}");
                if line.contains(DONE) {
                    return Ok(true);
                }
            }
            Ok::<bool, std::io::Error>(false)
        };
        let finished = tokio::time::timeout(CREATE_TIMEOUT, reading)
            .await
            .map_err(|_| VmmError::Timeout(format!("creating {}", self.domain)))?
            .map_err(|source| VmmError::Io { what: "reading from virsh".into(), source })?;
        // Keep reading (and discarding) the shell's output, so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        // `virsh -q` says nothing when the domain was created: its QEMU is there (an error is on stderr,
        // which may arrive a moment after stdout).
        let deadline = Instant::now() + Duration::from_secs(5);
        while finished && Instant::now() < deadline {
            if let Some(pid) = qemu_pid_of(&self.domain.name) {
                self.pid = Some(pid);
                return Ok(());
            }
            if self.stderr_of_shell().contains("error") {
                break;
            }
            tokio::time::sleep(POLL).await;
        }
        let mut detail = self.stderr_of_shell();
        let qemu = self.qemu_log_tail();
        if !qemu.is_empty() {
            detail.push('\n');
            detail.push_str(&qemu);
        }
        if detail.is_empty() {
            detail = "virsh created no QEMU".into();
        }
        Err(libvirt_error(format!("creating {}", self.domain), detail))
    }

    fn stderr_of_shell(&self) -> String {
        let t = self.tail.lock().unwrap_or_else(|e| e.into_inner());
        t.iter().map(String::as_str).collect::<Vec<_>>().join("\n")
    }

    /// What QEMU wrote of this run to the domain's log: the lines after libvirt's command line.
    fn qemu_log_tail(&self) -> String {
        let Some(text) = self.log.as_ref().and_then(|p| std::fs::read_to_string(p).ok()) else {
            return String::new();
        };
        let run = text.rsplit_once("starting up").map_or(text.as_str(), |(_, r)| r);
        let mut out: VecDeque<&str> = VecDeque::new();
        let mut in_cmdline = false;
        for line in run.lines().skip(1) {
            if line.starts_with("LC_ALL=") {
                in_cmdline = true;
            }
            if in_cmdline {
                in_cmdline = line.ends_with('\\');
                continue;
            }
            if out.len() >= 40 {
                out.pop_front();
            }
            out.push_back(line);
        }
        out.into_iter().collect::<Vec<_>>().join("\n")
    }

    fn gone(&self) -> bool {
        self.pid.is_none_or(|pid| !alive(pid))
    }

    fn exit(&self) -> ProcessExit {
        ProcessExit { code: None, description: format!("the QEMU of {} ended", self.domain) }
    }
}

impl VmmProcess for LibvirtProcess {
    fn pid(&self) -> Option<u32> {
        self.pid
    }

    fn domain(&self) -> Option<DomainRef> {
        Some(self.domain.clone())
    }

    fn nic_id(&self) -> &str {
        NIC_ALIAS
    }

    fn wait(&mut self) -> BoxFuture<'_, Result<ProcessExit, VmmError>> {
        Box::pin(async move {
            // Not isr's child: its end is seen in /proc (libvirt reaps it).
            while !self.gone() {
                tokio::time::sleep(POLL).await;
            }
            Ok(self.exit())
        })
    }

    fn try_wait(&mut self) -> Result<Option<ProcessExit>, VmmError> {
        Ok(self.gone().then(|| self.exit()))
    }

    fn kill(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if !self.gone() {
                let destroy = Command::new(&self.virsh)
                    .arg("-q")
                    .arg("-c")
                    .arg(&self.domain.uri)
                    .arg("destroy")
                    .arg(&self.domain.name)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .kill_on_drop(true)
                    .status();
                let _ = tokio::time::timeout(VIRSH_TIMEOUT, destroy).await;
            }
            // closing the creating connection destroys the domain too (autodestroy)
            let _ = self.shell.start_kill();
            let _ = self.shell.wait().await;
            let deadline = Instant::now() + VIRSH_TIMEOUT;
            while !self.gone() && Instant::now() < deadline {
                tokio::time::sleep(POLL).await;
            }
        })
    }

    fn stderr(&mut self) -> BoxFuture<'_, String> {
        Box::pin(async move { self.stderr_tail() })
    }

    fn stderr_tail(&self) -> String {
        let mut s = self.qemu_log_tail();
        let shell = self.stderr_of_shell();
        if !shell.is_empty() {
            if !s.is_empty() {
                s.push('\n');
            }
            s.push_str(&shell);
        }
        s
    }
}

/// What the domain XML needs beyond the [`VmConfig`].
#[derive(Debug, Clone)]
pub struct DomainSettings<'a> {
    pub name: &'a str,
    /// The QEMU binary, absolute.
    pub emulator: &'a Path,
    /// The extra QMP monitor isr drives.
    pub qmp_socket: &'a Path,
    /// Wait for a memory image (`-incoming defer`).
    pub incoming: bool,
    /// Uid and gid QEMU runs as.
    pub owner: (u32, u32),
    /// The daemon's security drivers ([`LibvirtDriver`] asks for them).
    pub security_models: &'a [String],
    /// The initial VNC password (on a network address; replaced over QMP when the VM runs).
    pub vnc_password: &'a str,
}

/// Escapes text for XML content and attribute values (quoted with `'`).
fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '\'' => o.push_str("&apos;"),
            '"' => o.push_str("&quot;"),
            c => o.push(c),
        }
    }
    o
}

fn path_str(p: &Path) -> Result<String, VmmError> {
    p.to_str()
        .map(esc)
        .ok_or_else(|| libvirt_error("writing the domain XML", format!("not UTF-8: {}", p.display())))
}

fn pci(slot: u8) -> String {
    format!("<address type='pci' domain='0x0000' bus='0x00' slot='{slot:#04x}' function='0x0'/>")
}

/// The domain XML for `config`: the machine of [`VmConfig::qemu_args`] (same machine type, devices,
/// properties and PCI addresses), and the extra QMP monitor isr drives. Pure: no I/O.
pub fn domain_xml(config: &VmConfig, s: &DomainSettings<'_>) -> Result<String, VmmError> {
    if config.shared_ram.is_some() {
        // libvirt makes the RAM backend itself (`pc.ram`), so it cannot be isr's file.
        return Err(VmmError::Unsupported(
            "guest RAM as a shared file (RAM on demand) under libvirt: libvirt makes the RAM itself".into(),
        ));
    }
    let slots = PciSlots::of(config);
    let mut x = String::new();
    let kind = match config.accel {
        Accel::Kvm => "kvm",
        Accel::Tcg => "qemu",
    };
    let w = &mut x;
    let _ = writeln!(w, "<domain type='{kind}' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>");
    let _ = writeln!(w, "  <name>{}</name>", esc(s.name));
    let _ = writeln!(w, "  <memory unit='MiB'>{}</memory>", config.memory_mib);
    let _ = writeln!(w, "  <vcpu placement='static'>{}</vcpu>", config.cpus);
    let _ = writeln!(w, "  <os>");
    let _ = writeln!(w, "    <type arch='x86_64' machine='{}'>hvm</type>", esc(&config.machine));
    if let Some(k) = &config.kernel {
        let _ = writeln!(w, "    <kernel>{}</kernel>", path_str(k)?);
    }
    if let Some(i) = &config.initrd {
        let _ = writeln!(w, "    <initrd>{}</initrd>", path_str(i)?);
    }
    if let Some(a) = &config.append {
        let _ = writeln!(w, "    <cmdline>{}</cmdline>", esc(a));
    }
    let _ = writeln!(w, "  </os>");
    // ACPI as QEMU's pc has it (libvirt would turn it off without the element)
    let _ = writeln!(w, "  <features><acpi/></features>");
    if let Some(cpu) = &config.cpu {
        let _ = writeln!(
            w,
            "  <cpu mode='custom' match='exact' check='none'><model fallback='forbid'>{}</model></cpu>",
            esc(cpu)
        );
    }
    let _ = writeln!(w, "  <clock offset='utc'/>");
    // QEMU-direct's -no-reboot: whatever ends the guest ends the VM
    for event in ["on_poweroff", "on_reboot", "on_crash"] {
        let _ = writeln!(w, "  <{event}>destroy</{event}>");
    }
    let _ = writeln!(w, "  <devices>");
    let _ = writeln!(w, "    <emulator>{}</emulator>", path_str(s.emulator)?);
    let _ = writeln!(w, "    <controller type='pci' index='0' model='pci-root'/>");
    match slots.xhci {
        Some(slot) => {
            let _ = writeln!(
                w,
                "    <controller type='usb' index='0' model='qemu-xhci'>{}</controller>",
                pci(slot)
            );
        }
        None => {
            let _ = writeln!(w, "    <controller type='usb' index='0' model='none'/>");
        }
    }
    if let Some(slot) = slots.virtio_serial {
        let _ = writeln!(w, "    <controller type='virtio-serial' index='0'>{}</controller>", pci(slot));
    }
    // the disk: NBD over isr's Unix socket, raw, virtio-blk
    let _ = writeln!(w, "    <disk type='network' device='disk'>");
    let _ = writeln!(w, "      <driver name='qemu' type='raw'/>");
    let export = config.disk_export.as_deref().map(|e| format!(" name='{}'", esc(e))).unwrap_or_default();
    let _ = writeln!(w, "      <source protocol='nbd'{export}>");
    let _ = writeln!(w, "        <host transport='unix' socket='{}'/>", path_str(&config.disk_nbd_socket)?);
    let _ = writeln!(w, "        <reconnect delay='5'/>");
    let _ = writeln!(w, "      </source>");
    let _ = writeln!(w, "      <target dev='vda' bus='virtio'/>");
    let _ = writeln!(w, "      <boot order='1'/>");
    let _ = writeln!(w, "      {}", pci(slots.disk));
    let _ = writeln!(w, "    </disk>");
    if let Some(slot) = slots.nic {
        // user-mode networking; without network the link is down from the start (and set again over QMP
        // after a memory image loads). libvirt has no `restrict=on` for it: the link alone cuts the network.
        let _ = writeln!(w, "    <interface type='user'>");
        let _ = writeln!(w, "      <mac address='{NIC_MAC}'/>");
        let _ = writeln!(w, "      <model type='virtio'/>");
        let _ = writeln!(w, "      <rom enabled='no'/>");
        if config.network == Network::None {
            let _ = writeln!(w, "      <link state='down'/>");
        }
        let _ = writeln!(w, "      <alias name='{NIC_ALIAS}'/>");
        let _ = writeln!(w, "      {}", pci(slot));
        let _ = writeln!(w, "    </interface>");
    }
    // serial port 0, as QEMU-direct's console0
    match (&config.console_log, &config.console_socket) {
        (Some(log), Some(sock)) => {
            let _ = writeln!(
                w,
                "    <serial type='unix'><source mode='bind' path='{}'/><log file='{}' append='on'/>\
                 <target port='0'/></serial>",
                path_str(sock)?,
                path_str(log)?
            );
        }
        (Some(log), None) => {
            let _ = writeln!(
                w,
                "    <serial type='file'><source path='{}' append='on'/><target port='0'/></serial>",
                path_str(log)?
            );
        }
        (None, _) => {
            let _ = writeln!(w, "    <serial type='null'><target port='0'/></serial>");
        }
    }
    if config.vga {
        let _ =
            writeln!(w, "    <input type='tablet' bus='usb'><address type='usb' bus='0' port='1'/></input>");
    }
    match &config.display {
        Display::None => {}
        Display::Gtk => return Err(VmmError::Unsupported(
            "the libvirt driver has no GTK display: use --display vnc (then a VNC viewer or `isr ui`) or \
                 --display none"
                .into(),
        )),
        Display::Vnc { listen } => {
            if let Some(path) = listen.strip_prefix("unix:") {
                let _ = writeln!(w, "    <graphics type='vnc' socket='{}'/>", esc(path));
            } else {
                let (host, display) = listen
                    .rsplit_once(':')
                    .and_then(|(h, d)| {
                        Some((h.trim_start_matches('[').trim_end_matches(']'), d.parse::<u16>().ok()?))
                    })
                    .filter(|(_, d)| *d <= 59635)
                    .ok_or_else(|| {
                        VmmError::Unsupported(format!("VNC display {listen:?}: want HOST:DISPLAY"))
                    })?;
                let _ = writeln!(
                    w,
                    "    <graphics type='vnc' port='{}' autoport='no' listen='{}' passwd='{}'/>",
                    5900 + display,
                    esc(host),
                    esc(s.vnc_password)
                );
            }
        }
    }
    match slots.vga {
        Some(slot) => {
            let _ = writeln!(
                w,
                "    <video><model type='vga' vram='16384' heads='1' primary='yes'/>{}</video>",
                pci(slot)
            );
        }
        None => {
            let _ = writeln!(w, "    <video><model type='none'/></video>");
        }
    }
    let _ = writeln!(w, "    <memballoon model='none'/>");
    let _ = writeln!(w, "  </devices>");
    let _ = writeln!(
        w,
        "  <seclabel type='static' model='dac' relabel='no'><label>+{}:+{}</label></seclabel>",
        s.owner.0, s.owner.1
    );
    for model in s.security_models.iter().filter(|m| *m != "dac" && *m != "none") {
        let _ = writeln!(w, "  <seclabel type='none' model='{}'/>", esc(model));
    }
    let _ = writeln!(w, "  <qemu:commandline>");
    let mut qmp = String::from("unix:");
    qmp.push_str(&path_str(s.qmp_socket)?.replace(',', ",,"));
    qmp.push_str(",server=on,wait=off");
    // QEMU-direct's process name too (`-name` options merge): `ps` shows it as isr-qemu, and the stale-run
    // cleanup finds it by the same mark
    let mut args = vec!["-name".to_owned(), "process=isr-qemu".to_owned(), "-qmp".to_owned(), qmp];
    if config.agent_channel {
        // The guest agent's port, as QEMU-direct's, on the controller above, outside libvirt's view: a
        // `<channel>` named org.qemu.guest_agent.0 would be libvirt's own agent connection, and the socket
        // admits one client at a time (isr's GuestAgent).
        let chardev = match &config.agent_socket {
            Some(sock) => {
                format!("socket,id=qga0,server=on,wait=off,path={}", path_str(sock)?.replace(',', ",,"))
            }
            None => "null,id=qga0".to_owned(),
        };
        args.extend([
            "-chardev".to_owned(),
            chardev,
            "-device".to_owned(),
            // JSON like libvirt's own -device options: QEMU creates the key=value ones before all JSON ones,
            // and so before the controller
            esc(r#"{"driver":"virtserialport","bus":"virtio-serial0.0","nr":1,"chardev":"qga0","name":"org.qemu.guest_agent.0"}"#),
        ]);
    }
    if s.incoming {
        args.extend(["-incoming".to_owned(), "defer".to_owned()]);
    }
    for a in &config.extra_args {
        args.push(esc(&a.to_string_lossy()));
    }
    for a in args {
        let _ = writeln!(w, "    <qemu:arg value='{a}'/>");
    }
    let _ = writeln!(w, "  </qemu:commandline>");
    let _ = writeln!(w, "</domain>");
    Ok(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings<'a>(models: &'a [String]) -> DomainSettings<'a> {
        DomainSettings {
            name: "isr-alice-vm-42",
            emulator: Path::new("/usr/bin/qemu-system-x86_64"),
            qmp_socket: Path::new("/dev/shm/isr-vm-1/qmp.sock"),
            incoming: false,
            owner: (0, 0),
            security_models: models,
            vnc_password: "0123abcd",
        }
    }

    /// Device model 2 as isr resume configures it.
    fn desktop() -> VmConfig {
        let mut c = VmConfig::new(256, "/dev/shm/isr-vm-1/disk.sock");
        c.machine = "pc-i440fx-10.0".into();
        c.vga = true;
        c.agent_channel = true;
        c.nic = true;
        c.agent_socket = Some("/dev/shm/isr-vm-1/qga.sock".into());
        c.kernel = Some("/dev/shm/isr-vm-1/kernel".into());
        c.initrd = Some("/dev/shm/isr-vm-1/initrd".into());
        c.append = Some("console=ttyS0 quiet <&>".into());
        c.console_log = Some("/home/a/.isr/logs/alice/vm/console.log".into());
        c.console_socket = Some("/dev/shm/isr-vm-1/console.sock".into());
        c
    }

    /// The line of `xml` that contains `what`.
    fn line<'a>(xml: &'a str, what: &str) -> &'a str {
        xml.lines().find(|l| l.contains(what)).unwrap_or_else(|| panic!("no {what:?} in\n{xml}"))
    }

    #[test]
    fn device_model_2_has_qemu_directs_devices_at_its_addresses() {
        let models = ["none".to_owned(), "dac".to_owned()];
        let xml = domain_xml(&desktop(), &settings(&models)).unwrap();
        assert!(xml.starts_with("<domain type='qemu' "), "TCG is domain type qemu:\n{xml}");
        assert!(xml.contains("<name>isr-alice-vm-42</name>"));
        assert!(xml.contains("<memory unit='MiB'>256</memory>"));
        assert!(xml.contains("<vcpu placement='static'>1</vcpu>"));
        assert!(xml.contains("machine='pc-i440fx-10.0'"));
        assert!(xml.contains("<cmdline>console=ttyS0 quiet &lt;&amp;&gt;</cmdline>"), "escaped:\n{xml}");
        assert!(xml.contains("<features><acpi/></features>"));
        assert!(!xml.contains("<cpu"), "no -cpu: QEMU's default model, as QEMU-direct");
        // the addresses QEMU-direct's devices have (PciSlots): VGA 2, xHCI 3, virtio-serial 4, disk 5, NIC 6
        assert!(line(&xml, "<video>").contains("slot='0x02'"));
        assert!(line(&xml, "model='qemu-xhci'").contains("slot='0x03'"));
        assert!(line(&xml, "type='virtio-serial'").contains("slot='0x04'"));
        let disk = &xml[xml.find("<disk").unwrap()..xml.find("</disk>").unwrap()];
        assert!(disk.contains("slot='0x05'"), "{disk}");
        assert!(disk.contains("<host transport='unix' socket='/dev/shm/isr-vm-1/disk.sock'/>"), "{disk}");
        assert!(disk.contains("<driver name='qemu' type='raw'/>"), "{disk}");
        assert!(disk.contains("<target dev='vda' bus='virtio'/>"), "{disk}");
        assert!(disk.contains("<boot order='1'/>"), "{disk}");
        let nic = &xml[xml.find("<interface").unwrap()..xml.find("</interface>").unwrap()];
        assert!(nic.contains("slot='0x06'"), "{nic}");
        assert!(nic.contains("<mac address='52:54:00:12:34:56'/>"), "{nic}");
        assert!(nic.contains("<model type='virtio'/>"), "{nic}");
        assert!(nic.contains("<rom enabled='no'/>"), "romfile= as QEMU-direct: {nic}");
        assert!(!nic.contains("<link state='down'/>"), "NAT: link up: {nic}");
        assert!(nic.contains("<alias name='ua-nic0'/>"), "{nic}");
        assert!(line(&xml, "<input type='tablet'").contains("port='1'"));
        assert!(line(&xml, "<video>").contains("<model type='vga' vram='16384' heads='1' primary='yes'/>"));
        // libvirt's defaults QEMU-direct lacks are off
        assert!(xml.contains("<memballoon model='none'/>"));
        assert_eq!(xml.matches("<controller type='usb'").count(), 1);
        // serial console to the same log and socket; the agent channel on its socket
        assert!(line(&xml, "<serial").contains(
            "<source mode='bind' path='/dev/shm/isr-vm-1/console.sock'/>\
             <log file='/home/a/.isr/logs/alice/vm/console.log' append='on'/><target port='0'/>"
        ));
        assert!(!xml.contains("<channel"), "libvirt would hold the agent channel itself");
        assert!(xml.contains(
            "<qemu:arg value='socket,id=qga0,server=on,wait=off,path=/dev/shm/isr-vm-1/qga.sock'/>"
        ));
        assert!(xml.contains(
            "<qemu:arg value='{&quot;driver&quot;:&quot;virtserialport&quot;,&quot;bus&quot;:&quot;virtio-serial0.0&quot;,\
             &quot;nr&quot;:1,&quot;chardev&quot;:&quot;qga0&quot;,&quot;name&quot;:&quot;org.qemu.guest_agent.0&quot;}'/>"
        ));
        // headless: no graphics
        assert!(!xml.contains("<graphics"));
        // QEMU runs as isr's user, nothing relabelled
        assert!(
            xml.contains("<seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>")
        );
        assert!(
            !xml.contains("<seclabel type='none'"),
            "no MAC driver on this daemon: nothing to switch off"
        );
        // isr's QMP monitor; a cold start does not wait for a memory image
        assert!(xml.contains("<qemu:arg value='-name'/>\n    <qemu:arg value='process=isr-qemu'/>"));
        assert!(xml.contains("<qemu:arg value='-qmp'/>"));
        assert!(xml.contains("<qemu:arg value='unix:/dev/shm/isr-vm-1/qmp.sock,server=on,wait=off'/>"));
        assert!(!xml.contains("-incoming"));
    }

    #[test]
    fn incoming_network_none_vnc_and_confinement() {
        let models = ["apparmor".to_owned(), "dac".to_owned()];
        let mut c = desktop();
        c.network = Network::None;
        c.display = Display::Vnc { listen: "127.0.0.1:3".into() };
        c.accel = Accel::Kvm;
        c.cpu = Some("qemu64".into());
        let mut s = settings(&models);
        s.incoming = true;
        s.owner = (1000, 1001);
        let xml = domain_xml(&c, &s).unwrap();
        assert!(xml.starts_with("<domain type='kvm' "));
        assert!(xml.contains("<model fallback='forbid'>qemu64</model>"));
        assert!(xml.contains("<link state='down'/>"));
        assert!(xml.contains(
            "<graphics type='vnc' port='5903' autoport='no' listen='127.0.0.1' passwd='0123abcd'/>"
        ));
        assert!(xml.contains("<label>+1000:+1001</label>"));
        assert!(xml.contains("<seclabel type='none' model='apparmor'/>"));
        assert!(xml.contains("<qemu:arg value='-incoming'/>\n    <qemu:arg value='defer'/>"));
        // the devices do not depend on the network or the display
        let plain = domain_xml(&desktop(), &settings(&models)).unwrap();
        let slots =
            |x: &str| x.lines().filter(|l| l.contains("<address")).map(str::to_owned).collect::<Vec<_>>();
        assert_eq!(slots(&xml), slots(&plain));
        c.display = Display::Vnc { listen: "unix:/run/x/vnc.sock".into() };
        assert!(domain_xml(&c, &s).unwrap().contains("<graphics type='vnc' socket='/run/x/vnc.sock'/>"));
        c.display = Display::Gtk;
        assert!(matches!(domain_xml(&c, &s), Err(VmmError::Unsupported(_))));
    }

    #[test]
    fn serial_only_device_model_has_nothing_else() {
        let mut c = VmConfig::new(128, "/r/d.sock");
        c.disk_export = Some("exp'1".into());
        let xml = domain_xml(&c, &settings(&[])).unwrap();
        let disk = &xml[xml.find("<disk").unwrap()..xml.find("</disk>").unwrap()];
        assert!(disk.contains("slot='0x02'"), "the disk takes slot 2 as in QEMU-direct: {disk}");
        assert!(disk.contains("<source protocol='nbd' name='exp&apos;1'>"), "{disk}");
        assert!(xml.contains("<controller type='usb' index='0' model='none'/>"));
        assert!(xml.contains("<video><model type='none'/></video>"));
        assert!(xml.contains("<serial type='null'><target port='0'/></serial>"));
        for absent in ["<interface", "<channel", "<input", "virtio-serial", "<kernel>", "<graphics", "qga0"] {
            assert!(!xml.contains(absent), "{absent} in\n{xml}");
        }
        assert!(xml.contains("machine='pc'"));
    }

    #[test]
    fn capabilities_name_security_models() {
        let caps =
            "<host><secmodel>\n<model>none</model>\n<doi>0</doi>\n</secmodel><secmodel>\n<model>dac</model>\
                    <baselabel type='kvm'>+64055:+64055</baselabel></secmodel></host>";
        assert_eq!(security_models(caps), ["none", "dac"]);
        assert!(security_models("<host/>").is_empty());
    }

    #[test]
    fn old_logs_of_the_same_vm_go() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::process::id();
        // a pid far above pid_max: no such process
        let dead = 4_000_000_000u32;
        let names = [
            format!("isr-alice-vm-{dead}.log"),
            format!("isr-alice-vm-{dead}-2.log"),
            format!("isr-alice-vm-{me}.log"),
            format!("isr-alice-vm2-{dead}.log"),
            format!("isr-bob-vm-{dead}.log"),
            "isr-alice-vm-x.log".to_owned(),
        ];
        for n in &names {
            std::fs::write(dir.path().join(n), b"").unwrap();
        }
        remove_old_logs(dir.path(), "isr-alice-vm");
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        let mut want = names[2..].to_vec();
        want.sort();
        assert_eq!(left, want, "only the dead runs of isr-alice-vm go");
    }

    #[test]
    fn domain_names_are_unique_in_a_process() {
        let a = domain_name(Some("isr-alice-vm"));
        let b = domain_name(Some("isr-alice-vm"));
        assert_ne!(a, b);
        assert!(a.starts_with(&format!("isr-alice-vm-{}", std::process::id())), "{a}");
    }
}
