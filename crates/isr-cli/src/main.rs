//! `isr`: the Internet Suspend/Resume client. Thin: parses the command line and calls `isr-client`.

use clap::{CommandFactory, Parser, Subcommand};
use isr_client::parcel::{is_running, Client, CreateOptions, LocalStateName};
use isr_client::run::RunEnd;
use isr_client::{home::Home, ClientError};
use isr_format::ChunkSize;
use std::path::PathBuf;
use std::process::ExitCode;

mod config;
mod console;
mod progress;

#[derive(Parser, Debug)]
#[command(name = "isr", version, about = "Internet Suspend/Resume client")]
struct Cli {
    /// Server URL, e.g. http://127.0.0.1:7850
    #[arg(long, env = "ISR_SERVER", global = true)]
    server: Option<String>,
    /// User name on the server
    #[arg(long, env = "ISR_USER", global = true)]
    user: Option<String>,
    /// All local state and cache of this client (default: ~/.isr)
    #[arg(long, env = "ISR_HOME", global = true)]
    home: Option<PathBuf>,
    /// Extra CA certificate (PEM) to trust, for a server with a self-signed certificate
    #[arg(long, env = "ISR_CA_CERT", global = true)]
    ca_cert: Option<PathBuf>,
    /// Configuration file (TOML) with defaults for the options that have an ISR_* variable
    /// [default: $XDG_CONFIG_HOME/isr/config.toml, else ~/.config/isr/config.toml]
    #[arg(long, env = "ISR_CONFIG", global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Directories of chunk files (a USB stick, another client's cache) asked before the server; every chunk
    /// is verified by its tag and a wrong one ignored. Repeat the option, or separate with ':' in the variable
    #[arg(long, env = "ISR_LOOKASIDE", global = true, value_name = "DIR", value_delimiter = ':')]
    lookaside: Vec<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Log in and store a session token (never the password)
    Auth,
    /// Create a parcel from a disk image and upload it as version 1
    Create {
        parcel: String,
        #[arg(long)]
        disk: PathBuf,
        #[arg(long, default_value_t = 1024)]
        memory: u32,
        #[arg(long, default_value_t = 1)]
        cpus: u32,
        #[arg(long)]
        kernel: Option<PathBuf>,
        #[arg(long)]
        initrd: Option<PathBuf>,
        #[arg(long)]
        append: Option<String>,
        #[arg(long, default_value = "128K")]
        chunk_size: String,
        #[arg(short = 'm', long = "message", default_value = "created")]
        message: String,
    },
    /// List parcels: head version, lock holder and since when, local state
    Ls {
        /// One line per parcel with its head, local state and lock
        #[arg(short = 'l')]
        long: bool,
        /// One JSON object: {"parcels": [...], "offline": ...}
        #[arg(long)]
        json: bool,
    },
    /// List the versions of a parcel
    Versions {
        parcel: String,
        /// One JSON object: {"parcel": ..., "versions": [...]}
        #[arg(long)]
        json: bool,
    },
    /// Show a parcel's state
    Stat {
        parcel: String,
        #[arg(long)]
        json: bool,
    },
    /// Run the parcel's VM (checking it out first when needed) until it is suspended or shut down
    Resume {
        parcel: String,
        #[arg(long, env = "ISR_DISPLAY", default_value = "gtk", value_parser = ["none", "gtk", "vnc"])]
        display: String,
        /// Never contact the server (the parcel must be fully hoarded)
        #[arg(long)]
        disconnected: bool,
        /// The VM's network: user-mode NAT or none; IT's policy `none` (isr-server parcel policy) wins
        #[arg(long, env = "ISR_NETWORK", default_value = "nat", value_parser = ["none", "nat"])]
        network: String,
        /// CPU acceleration: auto tries KVM and falls back to TCG
        #[arg(long, env = "ISR_ACCEL", default_value = "auto", value_parser = ["auto", "kvm", "tcg"])]
        accel: String,
        /// VNC display for --display vnc
        #[arg(long, default_value = "127.0.0.1:0")]
        vnc: String,
        /// Directory for the private plaintext directory (device state, kernel, initrd; and the guest RAM
        /// when it is loaded rather than served on demand) [default: /dev/shm, else /tmp]
        #[arg(long, env = "ISR_RUNTIME_DIR", value_name = "DIR")]
        runtime_dir: Option<PathBuf>,
        /// Run a version without taking the lock and without checking anything in; every change is dropped
        /// when it ends (works while another client holds the lock)
        #[arg(long)]
        transient: bool,
        /// The version a transient run runs [default: the head]
        #[arg(long, requires = "transient", value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        version: Option<u64>,
        /// Who runs QEMU: isr itself, or libvirt (qemu:///system, through virsh; a daemon is started when none
        /// answers). A parcel suspended under one resumes under the other
        #[arg(long, env = "ISR_VMM", default_value = "qemu", value_parser = ["qemu", "libvirt"])]
        vmm: String,
        /// Bound the background upload of changes while it runs (bytes/s: 20M, 512K, 1G); 0 turns the
        /// background upload off [default: no bound; it yields to the guest's own fetches]
        #[arg(long, env = "ISR_UPLOAD_RATE", value_name = "RATE", value_parser = upload_rate)]
        upload_rate: Option<u64>,
        /// Commit a crash-consistent version (the disk as of a flush, no memory image) this often while it
        /// runs (30m, 2h, 90s)
        #[arg(long, env = "ISR_SYNC_EVERY", value_name = "PERIOD", value_parser = isr_client::running::parse_period)]
        sync_every: Option<std::time::Duration>,
        /// Guest RAM under --vmm qemu: auto serves it on demand (FUSE) where /dev/fuse works, else loads it
        /// before the guest starts; loaded always loads it first
        #[arg(long, env = "ISR_RAM", default_value = "auto", value_parser = ["auto", "loaded"])]
        ram: String,
        /// Fetch in the background the memory and disk chunks the last run touched, in the order it first
        /// touched them (the guest's own fetches go first)
        #[arg(long, env = "ISR_PREFETCH", default_value = "on", value_parser = ["on", "off"])]
        prefetch: String,
    },
    /// Ask a running resume to save memory and stop
    Suspend { parcel: String },
    /// Stop the VM without saving memory; the next resume boots cold
    Poweroff { parcel: String },
    /// Live view of chunk states while the parcel runs
    Dirtometer {
        parcel: String,
        /// Seconds between updates
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
    },
    /// Take the lock and fetch what resume needs
    Checkout {
        parcel: String,
        #[arg(long)]
        version: Option<u64>,
    },
    /// Serve the parcel's disk over NBD on a Unix socket until SIGINT/SIGTERM
    Disk {
        parcel: String,
        #[arg(long)]
        nbd: PathBuf,
        /// Never contact the server (the parcel must be hoarded)
        #[arg(long)]
        disconnected: bool,
        /// Export read-only (allowed on a suspended parcel: its memory image stays valid)
        #[arg(long, conflicts_with = "force")]
        read_only: bool,
        /// Allow writes on a suspended parcel: drops its memory image, the next resume boots cold
        #[arg(long)]
        force: bool,
        /// Bound the background upload of changes while it runs (bytes/s: 20M, 512K, 1G); 0 turns the
        /// background upload off [default: no bound; it yields to the guest's own fetches]
        #[arg(long, env = "ISR_UPLOAD_RATE", value_name = "RATE", value_parser = upload_rate)]
        upload_rate: Option<u64>,
        /// Commit a crash-consistent version (the disk as of a flush, no memory image) this often while it
        /// runs (30m, 2h, 90s)
        #[arg(long, env = "ISR_SYNC_EVERY", value_name = "PERIOD", value_parser = isr_client::running::parse_period)]
        sync_every: Option<std::time::Duration>,
    },
    /// Upload changes as a new version and keep the lock
    Sync {
        parcel: String,
        #[arg(short = 'm', long = "message", default_value = "")]
        message: String,
    },
    /// Sync, then release the lock
    Checkin {
        parcel: String,
        #[arg(short = 'm', long = "message", default_value = "")]
        message: String,
        /// Keep the local changes as a new parcel NEWNAME instead (every chunk shared), e.g. after a lost lock
        #[arg(long = "as", value_name = "NEWNAME")]
        as_new: Option<String>,
    },
    /// Local web console: parcels, versions, the lifecycle's buttons, the VM's screen (127.0.0.1 only;
    /// prints a URL with a one-time token)
    Ui {
        /// Loopback address to listen on (port 0: a free one)
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
        /// Do not try to open the URL in a browser
        #[arg(long)]
        no_open: bool,
        /// CPU acceleration of the VMs it resumes
        #[arg(long, env = "ISR_ACCEL", default_value = "auto", value_parser = ["auto", "kvm", "tcg"])]
        accel: String,
        /// Who runs the QEMU of the VMs it resumes (as `isr resume --vmm`)
        #[arg(long, env = "ISR_VMM", default_value = "qemu", value_parser = ["qemu", "libvirt"])]
        vmm: String,
    },
    /// The running VM's serial console on this terminal, interactive (Ctrl-] detaches)
    Console { parcel: String },
    /// Change the password: every parcel's key is rewrapped, then the login (new password from
    /// $ISR_NEW_PASSWORD or a prompt)
    Passwd,
    /// Drop local changes: back to the base version
    Discard { parcel: String },
    /// Fetch every chunk of the parcel into the local cache
    Hoard { parcel: String },
    /// Make a new head version identical to VERSION
    Rollback { parcel: String, version: u64 },
    /// Break this parcel's lock held by another client
    Unlock {
        parcel: String,
        #[arg(long)]
        force: bool,
    },
    /// Validate the local cache (--full: every cached chunk against its tag and key)
    Check {
        parcel: String,
        #[arg(long)]
        full: bool,
        /// Fetch again (verified) every cached chunk that fails its check
        #[arg(long)]
        repair: bool,
    },
    /// Reconstruct the raw disk image of a version (default: the head)
    Export {
        parcel: String,
        #[arg(long)]
        version: Option<u64>,
        #[arg(long)]
        output: PathBuf,
    },
    /// Print the shell completion script for bash, zsh or fish
    Completions {
        #[arg(value_parser = ["bash", "zsh", "fish"])]
        shell: String,
    },
}

/// Print the completion script of `cmd` for `shell` (bash, zsh or fish) on stdout.
fn completions(cmd: clap::Command, shell: &str) -> Result<(), ClientError> {
    isr_clikit::completions(cmd, shell, &mut std::io::stdout()).map_err(|e| ClientError::Usage(e.to_string()))
}

fn password() -> Result<String, ClientError> {
    if let Ok(pw) = std::env::var("ISR_PASSWORD") {
        return Ok(pw);
    }
    rpassword::prompt_password("isr password: ")
        .map_err(|e| ClientError::Auth(format!("no password: set ISR_PASSWORD or run on a terminal ({e})")))
}

fn vmm_kind(vmm: &str) -> isr_vmm::VmmKind {
    // clap's value_parser allows only the known names
    vmm.parse().unwrap_or_default()
}

/// What is left to send after a run: the user may leave once the server has everything.
fn leave_note(parcel: &str, unsent: u64) -> String {
    if unsent == 0 {
        format!("every change of {parcel} is on the server: `isr checkin {parcel}` only commits it (safe to leave once it has)")
    } else {
        format!(
            "{} of changes to {parcel} are not on the server yet: `isr checkin {parcel}` sends them (leave once it has finished)",
            mib(unsent)
        )
    }
}

/// Tell (and record, for `isr ls -l` and `isr suspend`) what a run left to send; a failure to find out is
/// only reported.
async fn unsent_note(c: &mut Client, parcel: &str) {
    match c.pending_upload(parcel).await {
        Ok(n) => eprintln!("isr: {}", leave_note(parcel, n)),
        Err(e) => eprintln!("isr: could not tell what is left to send: {e}"),
    }
}

/// `--upload-rate`: bytes per second (0 turns the background upload off).
fn upload_rate(s: &str) -> Result<u64, String> {
    if s.trim() == "0" {
        return Ok(0);
    }
    isr_client::trickle::parse_rate(s)
}

fn accel_choice(accel: &str) -> isr_client::resume::AccelChoice {
    use isr_client::resume::AccelChoice;
    match accel {
        "kvm" => AccelChoice::Kvm,
        "tcg" => AccelChoice::Tcg,
        _ => AccelChoice::Auto,
    }
}

fn new_password() -> Result<String, ClientError> {
    if let Ok(pw) = std::env::var("ISR_NEW_PASSWORD") {
        return Ok(pw);
    }
    let err = |e: std::io::Error| {
        ClientError::Usage(format!("no new password: set ISR_NEW_PASSWORD or run on a terminal ({e})"))
    };
    let a = rpassword::prompt_password("new isr password: ").map_err(err)?;
    let b = rpassword::prompt_password("again: ").map_err(err)?;
    if a != b {
        return Err(ClientError::Usage("the two new passwords differ".into()));
    }
    Ok(a)
}

fn default_home() -> PathBuf {
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/tmp")).join(".isr")
}

fn default_user() -> Option<String> {
    std::env::var("USER").ok().or_else(|| std::env::var("LOGNAME").ok())
}

fn when(unix: i64) -> String {
    let age = isr_client::home::now_unix() - unix;
    match age {
        a if a < 120 => format!("{a}s ago"),
        a if a < 7200 => format!("{}m ago", a / 60),
        a if a < 172800 => format!("{}h ago", a / 3600),
        a => format!("{}d ago", a / 86400),
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / 1048576.0)
}

/// Where a run's chunks came from, for its closing line.
fn fetched_summary(f: &isr_client::source::SourceCounts) -> String {
    let mut s = format!("{} chunks ({}) from the server", f.remote_chunks, mib(f.remote_bytes));
    if f.lookaside_chunks > 0 || f.lookaside_rejected > 0 {
        s.push_str(&format!(", {} ({}) from lookaside", f.lookaside_chunks, mib(f.lookaside_bytes)));
    }
    if f.lookaside_rejected > 0 {
        s.push_str(&format!(", {} lookaside files failed their tag (ignored)", f.lookaside_rejected));
    }
    s
}

async fn run(cli: Cli) -> Result<(), ClientError> {
    if let Command::Completions { shell } = &cli.command {
        return completions(Cli::command(), shell);
    }
    let home = Home::open(cli.home.clone().unwrap_or_else(default_home))?;
    let user = cli
        .user
        .clone()
        .or_else(default_user)
        .ok_or_else(|| ClientError::Usage("no user: use --user or ISR_USER".into()))?;
    let ca_pem = match &cli.ca_cert {
        Some(p) => {
            Some(std::fs::read(p).map_err(|e| ClientError::io(format!("reading {}", p.display()), e))?)
        }
        None => None,
    };
    let mut c = Client::new(home, user, cli.server.clone(), ca_pem.clone(), Box::new(password));
    c.set_progress(std::sync::Arc::new(progress::Terminal));
    c.set_lookaside(cli.lookaside.clone());
    match cli.command {
        Command::Auth => {
            c.login().await?;
            println!("logged in as {}", c.user);
        }
        Command::Create { parcel, disk, memory, cpus, kernel, initrd, append, chunk_size, message } => {
            let chunk_size = ChunkSize::parse(&chunk_size).map_err(|e| ClientError::Usage(e.to_string()))?;
            let opts = CreateOptions {
                memory_mib: memory,
                cpus,
                kernel,
                initrd,
                append,
                chunk_size,
                comment: message,
            };
            let start = std::time::Instant::now();
            let (v, t) = c.create(&parcel, &disk, &opts).await?;
            let secs = start.elapsed().as_secs_f64();
            println!(
                "created {parcel} version {v}: {} image, sent {} chunks ({}) in {secs:.1}s ({:.0} MB/s)",
                mib(t.image_bytes),
                t.chunks,
                mib(t.bytes),
                t.image_bytes as f64 / 1e6 / secs.max(1e-9)
            );
        }
        Command::Ls { long, json } => {
            let listing = c.list().await?;
            if let Some(why) = &listing.offline {
                eprintln!("isr: offline ({why}): showing the parcels checked out here, as last known");
            }
            if json {
                let parcels: Vec<_> = listing
                    .parcels
                    .iter()
                    .map(|(p, state)| {
                        serde_json::json!({
                            "name": p.name,
                            "head": p.head,
                            "created_unix": p.created_unix,
                            "lock": p.lock,
                            "state": state,
                        })
                    })
                    .collect();
                println!("{}", serde_json::json!({ "parcels": parcels, "offline": listing.offline }));
                return Ok(());
            }
            if long {
                println!("{:<24} {:<10} {:<12} {:<10} LOCK", "PARCEL", "HEAD", "STATE", "UNSENT");
            }
            for (p, state) in listing.parcels {
                if long {
                    let lock = p
                        .lock
                        .map(|l| format!("locked by {} since {}", l.holder, when(l.since_unix)))
                        .unwrap_or_else(|| "unlocked".into());
                    // As last recorded by a process holding the parcel's key (the running one, stat, a run's end).
                    let unsent = match state {
                        LocalStateName::Absent => "-".to_owned(),
                        LocalStateName::Unmodified => mib(0),
                        _ => {
                            let files = isr_client::parcel_files::ParcelFiles::new(
                                c.home.parcel_dir(&c.user, &p.name),
                            );
                            isr_client::running::UnsentRecord::read(&files)
                                .map_or("?".to_owned(), |r| mib(r.bytes))
                        }
                    };
                    println!("{:<24} {:<10} {:<12} {:<10} {}", p.name, p.head, state, unsent, lock);
                } else {
                    println!("{}", p.name);
                }
            }
        }
        Command::Ui { listen, no_open, accel, vmm } => {
            if !listen.ip().is_loopback() {
                return Err(ClientError::Usage(format!(
                    "the web console listens on loopback only, not on {listen}"
                )));
            }
            let password = password()?;
            let runtime = tempfile::Builder::new()
                .prefix("isr-ui-")
                .tempdir()
                .map_err(|e| ClientError::io("creating the console's private directory", e))?;
            let resume = isr_client::resume::ResumeOptions {
                display: isr_vmm::Display::None,
                network: isr_vmm::Network::Nat,
                disconnected: false,
                accel: accel_choice(&accel),
                qemu: std::env::var_os("ISR_QEMU").map(PathBuf::from),
                runtime_dir: std::env::var_os("ISR_RUNTIME_DIR").map(PathBuf::from),
                vmm: vmm_kind(&vmm),
                upkeep: Default::default(),
                ram: Default::default(),
                prefetch: true,
            };
            let settings = isr_ui::UiSettings {
                home: c.home.root().to_owned(),
                user: c.user.clone(),
                server: cli.server.clone(),
                ca_pem: ca_pem.clone(),
                lookaside: cli.lookaside.clone(),
                password,
                runtime_dir: runtime.path().to_owned(),
                resume,
            };
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .map_err(|e| ClientError::io(format!("listening on {listen}"), e))?;
            let addr = listener.local_addr().map_err(|e| ClientError::io("local address", e))?;
            let token = isr_ui::new_token();
            let url = format!("http://{addr}/?token={token}");
            println!("isr ui: open {url}");
            use std::io::Write as _;
            let _ = std::io::stdout().flush();
            if !no_open
                && (std::env::var_os("DISPLAY").is_some() || std::env::var_os("WAYLAND_DISPLAY").is_some())
            {
                let _ = std::process::Command::new("xdg-open")
                    .arg(&url)
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn();
            }
            isr_ui::serve(listener, settings, token, shutdown_signal())
                .await
                .map_err(|e| ClientError::Other(e.to_string()))?;
        }
        Command::Console { parcel } => {
            let sock = c.console_socket(&parcel)?;
            console::attach(&parcel, &sock).await?;
        }
        Command::Passwd => {
            let new = new_password()?;
            let change = c.change_password(&new).await?;
            println!(
                "password changed: {} parcel keys rewrapped{}",
                change.rewrapped,
                if change.already > 0 {
                    format!(", {} already used the new password", change.already)
                } else {
                    String::new()
                }
            );
        }
        Command::Versions { parcel, json } => {
            let versions = c.versions(&parcel).await?;
            if json {
                println!("{}", serde_json::json!({ "parcel": parcel, "versions": versions }));
                return Ok(());
            }
            println!("{:<7} {:<12} {:<30} {:>12}  COMMENT", "VERSION", "CREATED", "CLIENT", "UPLOADED");
            for v in versions {
                println!(
                    "{:<7} {:<12} {:<30} {:>12}  {}",
                    v.version,
                    when(v.created_unix),
                    v.client,
                    mib(v.bytes_uploaded),
                    v.comment
                );
            }
        }
        Command::Stat { parcel, json } => {
            let s = c.stat(&parcel).await?;
            if json {
                println!("{}", serde_json::to_string(&s).expect("serializable"));
            } else {
                println!("parcel:  {}", s.parcel);
                println!("state:   {}", s.state);
                if s.state != LocalStateName::Absent && s.offline.is_none() {
                    println!("unsent:  {}", mib(s.pending_upload_bytes));
                }
                match (&s.offline, s.head_version) {
                    (Some(why), _) => println!("head:    unknown (offline: {why})"),
                    (None, v) => println!("head:    {}", v.map(|v| v.to_string()).unwrap_or_default()),
                }
                if let Some(b) = s.base_version {
                    println!("base:    {b}");
                    println!(
                        "chunks:  {} cached, {} dirty, {} total",
                        s.chunks.cached, s.chunks.dirty, s.chunks.total
                    );
                }
                match s.lock {
                    Some(l) => println!("lock:    {} since {}", l.holder, when(l.since_unix)),
                    None if s.offline.is_some() => println!("lock:    unknown (offline)"),
                    None => println!("lock:    none"),
                }
                match (s.network_policy, &s.offline) {
                    (Some(p), None) => println!("network: IT's policy {}", p.as_str()),
                    (Some(p), Some(_)) => println!("network: IT's policy {} (as last seen)", p.as_str()),
                    (None, _) => println!("network: IT's policy unknown (offline, never seen here)"),
                }
            }
        }
        Command::Resume {
            parcel,
            display,
            disconnected,
            network,
            accel,
            vnc,
            runtime_dir,
            transient,
            version,
            vmm,
            upload_rate,
            sync_every,
            ram,
            prefetch,
        } => {
            use isr_client::resume::{ResumeOptions, StopRequest};
            let display = match display.as_str() {
                "none" => isr_vmm::Display::None,
                "vnc" => isr_vmm::Display::Vnc { listen: vnc },
                _ => isr_vmm::Display::Gtk,
            };
            let accel = accel_choice(&accel);
            let opts = ResumeOptions {
                display,
                network: if network == "none" { isr_vmm::Network::None } else { isr_vmm::Network::Nat },
                disconnected,
                accel,
                qemu: std::env::var_os("ISR_QEMU").map(PathBuf::from),
                runtime_dir,
                vmm: vmm_kind(&vmm),
                upkeep: isr_client::running::UpkeepOptions { upload_rate, sync_every },
                ram: ram.parse().map_err(ClientError::Usage)?,
                prefetch: prefetch == "on",
            };
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            // Handlers installed before the resume starts (and writes the record `isr suspend` reads): a
            // signal arriving early is queued, never the default action that kills the process.
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
            let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
            let mut usr1 = signal(SignalKind::user_defined1()).expect("SIGUSR1 handler");
            tokio::spawn(async move {
                loop {
                    let req = tokio::select! {
                        _ = term.recv() => StopRequest::Suspend,
                        _ = int.recv() => StopRequest::Suspend,
                        _ = usr1.recv() => StopRequest::Poweroff,
                    };
                    if tx.send(req).await.is_err() {
                        break;
                    }
                }
            });
            if transient {
                let t = c.resume_transient(&parcel, version, &opts, rx).await?;
                println!(
                    "{parcel}: transient run of version {} ended ({}); every change dropped, nothing checked in{}",
                    t.version,
                    t.report.outcome,
                    t.locked_by.map(|h| format!(" (the lock stays with {h})")).unwrap_or_default()
                );
                return Ok(());
            }
            let r = c.resume(&parcel, &opts, rx).await?;
            println!(
                "{parcel}: {} ({}); prepare {:.2}s, start/restore {:.2}s, stop {:.2}s, memory image {}, {} of {} memory chunks changed, fetched {}",
                r.outcome,
                r.accel,
                r.prepare.as_secs_f64(),
                r.restore.as_secs_f64(),
                r.suspend.as_secs_f64(),
                mib(r.memory_image_bytes),
                r.memory_chunks_changed,
                r.memory_chunks,
                fetched_summary(&r.fetched)
            );
            if r.outcome == RunEnd::Suspended && !disconnected {
                unsent_note(&mut c, &parcel).await;
            }
        }
        Command::Suspend { parcel } => {
            use isr_client::resume::StopRequest;
            match c.stop_running(&parcel, StopRequest::Suspend, std::time::Duration::from_secs(600)).await? {
                Some(o) if o.outcome == RunEnd::TransientEnded => {
                    println!("stopped the transient run of {parcel}: nothing saved")
                }
                Some(_) => {
                    println!("suspended {parcel}");
                    let dir = c.home.parcel_dir(&c.user, &parcel);
                    let files = isr_client::parcel_files::ParcelFiles::new(dir);
                    if let Some(r) = isr_client::running::UnsentRecord::read(&files) {
                        eprintln!("isr: {}", leave_note(&parcel, r.bytes));
                    }
                }
                None => return Err(ClientError::Other(format!("{parcel} is not running on this client"))),
            }
        }
        Command::Poweroff { parcel } => {
            use isr_client::resume::StopRequest;
            match c.stop_running(&parcel, StopRequest::Poweroff, std::time::Duration::from_secs(120)).await? {
                Some(o) => match o.outcome {
                    RunEnd::TransientEnded => {
                        println!("stopped the transient run of {parcel}: nothing saved")
                    }
                    RunEnd::PoweredOff => println!("powered off {parcel}"),
                    other => println!("{parcel} stopped ({other}); the next resume boots cold"),
                },
                None => {
                    let o = c.open(&parcel)?;
                    c.drop_memory(&o)?;
                    println!("{parcel} will boot cold at the next resume");
                }
            }
        }
        Command::Dirtometer { parcel, interval } => {
            let interval = std::time::Duration::from_secs_f64(interval.max(0.1));
            let dir = c.home.parcel_dir(&c.user, &parcel);
            loop {
                let o = c.open(&parcel)?;
                let (cached, dirty, total) = c.local_chunk_counts(&o).await?;
                let running = is_running(&dir);
                println!(
                    "{parcel}: {} | {total} chunks: {cached} cached, {dirty} dirty (flushed), {} not yet fetched",
                    if running { "running" } else { "stopped" },
                    total - cached
                );
                if !running {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = tokio::signal::ctrl_c() => break,
                }
            }
        }
        Command::Checkout { parcel, version } => {
            let co = c.checkout(&parcel, version).await?;
            if let Some(note) = &co.note {
                eprintln!("isr: {note}");
            }
            println!("checked out {parcel} at version {}", co.state.base_version);
        }
        Command::Disk { parcel, nbd, disconnected, read_only, force, upload_rate, sync_every } => {
            use isr_client::resume::DiskOptions;
            let upkeep = isr_client::running::UpkeepOptions { upload_rate, sync_every };
            let export = c.open_disk(&parcel, DiskOptions { disconnected, read_only, force, upkeep }).await?;
            if let Some(note) = &export.note {
                eprintln!("isr: {note}");
            }
            let listener = export.bind(&nbd)?;
            println!(
                "serving {parcel} ({} bytes{}) on nbd+unix:///?socket={}",
                export.image.len(),
                if read_only { ", read-only" } else { "" },
                nbd.display()
            );
            let fetched = export.serve(&mut c, listener, &nbd, shutdown_signal()).await?;
            eprintln!("stopped; fetched {}", fetched_summary(&fetched));
            if !disconnected && !read_only {
                unsent_note(&mut c, &parcel).await;
            }
        }
        Command::Sync { parcel, message } => match c.sync(&parcel, &message).await? {
            Some((v, t)) => {
                println!("synced {parcel} as version {v}: sent {} chunks ({})", t.chunks, mib(t.bytes))
            }
            None => println!("{parcel} has no local changes"),
        },
        Command::Checkin { parcel, message, as_new: Some(new_name) } => {
            let (v, t) = c.checkin_as(&parcel, &new_name, &message).await?;
            println!(
                "kept the changes to {parcel} as {new_name} version {v}: sent {} chunks ({}); {parcel} left this client",
                t.chunks,
                mib(t.bytes)
            );
        }
        Command::Checkin { parcel, message, as_new: None } => {
            let out = c.checkin(&parcel, &message).await?;
            if let Some(note) = &out.note {
                eprintln!("isr: {note}");
            }
            match out.synced {
                Some((v, t)) => {
                    println!(
                        "checked in {parcel} as version {v}: sent {} chunks ({})",
                        t.chunks,
                        mib(t.bytes)
                    )
                }
                None if out.note.is_some() => println!("{parcel} left this client"),
                None => println!("checked in {parcel}: no changes, lock released"),
            }
        }
        Command::Discard { parcel } => {
            c.discard(&parcel)?;
            println!("discarded local changes to {parcel}");
        }
        Command::Hoard { parcel } => {
            let t = c.hoard(&parcel).await?;
            println!("hoarded {parcel}: fetched {} chunks ({})", t.chunks, mib(t.bytes));
        }
        Command::Rollback { parcel, version } => {
            let v = c.rollback(&parcel, version).await?;
            println!("{parcel} version {v} has the content of version {version}");
        }
        Command::Unlock { parcel, force } => {
            if !force {
                return Err(ClientError::Usage(
                    "unlock breaks another client's lock: confirm with --force".into(),
                ));
            }
            match c.unlock_force(&parcel).await? {
                Some(l) => {
                    println!("unlocked {parcel} (it was locked by {} since {})", l.holder, when(l.since_unix))
                }
                None => println!("{parcel} was not locked"),
            }
        }
        Command::Check { parcel, full, repair } => {
            let report = c.check(&parcel, full, repair).await?;
            for r in &report.repaired {
                eprintln!("repaired: {r}");
            }
            if !report.problems.is_empty() {
                for p in &report.problems {
                    eprintln!("{p}");
                }
                return Err(ClientError::Integrity(format!(
                    "{} problems in the local cache of {parcel}{}",
                    report.problems.len(),
                    if repair { "" } else { " (`isr check --repair` fetches good copies from the server)" }
                )));
            }
            let dir = c.home.parcel_dir(&c.user, &parcel);
            println!(
                "{parcel}: local cache is consistent{}",
                if is_running(&dir) { " (running)" } else { "" }
            );
        }
        Command::Export { parcel, version, output } => {
            let n = c.export(&parcel, version, &output).await?;
            println!("exported {} to {}", mib(n), output.display());
        }
        // Handled before the home is opened.
        Command::Completions { .. } => {}
    }
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "man") {
        return isr_clikit::man_main(Cli::command(), &args[2..]);
    }
    // The configuration file fills in the ISR_* variables that are not set, before anything reads them.
    if let Err(e) = config::apply(&Cli::command()) {
        eprintln!("isr: {e}");
        return ExitCode::from(e.exit_code() as u8);
    }
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ISR_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("isr: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}
