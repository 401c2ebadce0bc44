//! `isr-server`: the command line (see SPEC.md and docs/api.md).

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use isr_format::{ImageKind, RecoveryPublicKey};
use isr_server::admin::{self, split_target};
use isr_server::recovery::{self, RecoveryError};
use isr_server::{auth, AppState, Deployment, ServerSettings, Storage, StorageConfig};
use isr_store::meta::{KeepPolicy, LockRelease, NetworkPolicy};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(name = "isr-server", version, about = "Internet Suspend/Resume server")]
struct Cli {
    #[command(flatten)]
    storage: StorageArgs,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Debug, Clone)]
struct StorageArgs {
    /// Data directory: metadata in DIR/meta.sqlite, chunks in DIR/chunks/.
    #[arg(long, global = true, env = "ISR_DATA", value_name = "DIR")]
    data: Option<PathBuf>,
    /// Metadata database: sqlite:PATH, or postgres://USER@HOST:PORT/DB shared by several servers.
    #[arg(long, global = true, value_name = "URL")]
    database: Option<String>,
    /// Chunk store: a directory, file:PATH, or s3://BUCKET/PREFIX (endpoint, region and keys from the usual
    /// AWS_* variables, e.g. AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY).
    #[arg(long, global = true, value_name = "URL")]
    chunks: Option<String>,
    /// Configuration file of `key = value` lines (data, database, chunks, listen, tls_cert, tls_key,
    /// recovery_pubkey, gc_grace_secs, prune_keep_last/hourly/daily/weekly/monthly/yearly, prune_every_secs,
    /// prune_low_space_percent); command-line options win.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Serve the HTTP API.
    Serve {
        /// Address to listen on (port 0 picks a free one).
        #[arg(long, value_name = "ADDR:PORT")]
        listen: Option<String>,
        #[arg(long, value_name = "FILE", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        #[arg(long, value_name = "FILE", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// X25519 public key (64 hex) that clients seal parcel keyroots to for recovery.
        #[arg(long, value_name = "HEX")]
        recovery_pubkey: Option<String>,
    },
    /// Manage users.
    #[command(subcommand)]
    User(UserCmd),
    /// Inspect parcels.
    #[command(subcommand)]
    Parcel(ParcelCmd),
    /// Break the lock of USER/PARCEL.
    Unlock { target: String },
    /// Delete the versions a retention policy does not keep (restic `forget` semantics, UTC; the head always
    /// stays), then gc. Without --keep-* options the configuration file's prune_keep_* policy applies.
    Prune {
        /// USER/PARCEL (or --all).
        #[arg(required_unless_present = "all")]
        target: Option<String>,
        /// Every parcel of every user.
        #[arg(long, conflicts_with = "target")]
        all: bool,
        #[command(flatten)]
        keep: KeepArgs,
        /// List what would go and why the others stay; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Do not run gc after the prune.
        #[arg(long)]
        no_gc: bool,
    },
    /// Delete chunks that no version references.
    Gc {
        /// Leave unreferenced chunks younger than this alone (uploads of commits in progress).
        #[arg(long, value_name = "SECONDS")]
        grace: Option<u64>,
    },
    /// Usage figures per user and parcel: versions, bytes per check-in (p50/p95), check-ins per day (last 30
    /// days), storage unique vs shared with other parcels, dedup ratio.
    Stats {
        /// USER or USER/PARCEL (default: everyone).
        target: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Check that every referenced chunk is present (--full: and re-hash each); on S3, also compare the
    /// chunk index with a listing of the bucket (--repair: rebuild the index from it).
    Check {
        #[arg(long)]
        full: bool,
        /// Rebuild the chunk index (S3) from a listing of the store.
        #[arg(long)]
        repair: bool,
    },
    /// TLS certificates.
    #[command(subcommand)]
    Tls(TlsCmd),
    /// IT's recovery key.
    #[command(subcommand)]
    Recovery(RecoveryCmd),
    /// Write the raw disk (or memory) image of a version of USER/PARCEL, opened with the recovery key.
    Export {
        /// USER/PARCEL
        target: String,
        /// Default: the head.
        #[arg(long, value_name = "N")]
        version: Option<u64>,
        /// The deployment's recovery private key (from `recovery init`).
        #[arg(long, value_name = "FILE")]
        recovery_key: PathBuf,
        #[arg(long, value_name = "IMG")]
        output: PathBuf,
        /// The memory image instead of the disk.
        #[arg(long)]
        memory: bool,
    },
    /// Print the shell completion script for bash, zsh or fish.
    Completions {
        #[arg(value_parser = ["bash", "zsh", "fish"])]
        shell: String,
    },
}

#[derive(Subcommand, Debug)]
enum TlsCmd {
    /// Write a private CA (ca.pem, for `isr --ca-cert`) and a server certificate it signs (cert.pem,
    /// key.pem, for `serve --tls-cert/--tls-key`).
    Init {
        #[arg(long, value_name = "DIR")]
        output: PathBuf,
        /// A DNS name or IP address clients reach the server by (repeatable; default localhost, 127.0.0.1,
        /// ::1).
        #[arg(long = "name", value_name = "HOST")]
        names: Vec<String>,
    },
}

/// The --keep-* rules of `prune` (0 or absent: that rule is off).
#[derive(Args, Debug, Clone, Default)]
struct KeepArgs {
    /// Keep the newest N versions (`--keep N` is the same).
    #[arg(long, visible_alias = "keep", value_name = "N")]
    keep_last: Option<u32>,
    /// Keep the newest version of each of the last N hours (UTC) that have one.
    #[arg(long, value_name = "N")]
    keep_hourly: Option<u32>,
    /// ... of each of the last N days.
    #[arg(long, value_name = "N")]
    keep_daily: Option<u32>,
    /// ... of each of the last N ISO weeks.
    #[arg(long, value_name = "N")]
    keep_weekly: Option<u32>,
    /// ... of each of the last N months.
    #[arg(long, value_name = "N")]
    keep_monthly: Option<u32>,
    /// ... of each of the last N years.
    #[arg(long, value_name = "N")]
    keep_yearly: Option<u32>,
}

impl KeepArgs {
    fn any(&self) -> bool {
        [
            self.keep_last,
            self.keep_hourly,
            self.keep_daily,
            self.keep_weekly,
            self.keep_monthly,
            self.keep_yearly,
        ]
        .iter()
        .any(Option::is_some)
    }

    fn policy(&self) -> KeepPolicy {
        KeepPolicy {
            last: self.keep_last.unwrap_or(0),
            hourly: self.keep_hourly.unwrap_or(0),
            daily: self.keep_daily.unwrap_or(0),
            weekly: self.keep_weekly.unwrap_or(0),
            monthly: self.keep_monthly.unwrap_or(0),
            yearly: self.keep_yearly.unwrap_or(0),
        }
    }
}

/// The configuration file's prune policy (`prune_keep_last`, ...), if it has any rule.
fn config_policy(file: &HashMap<String, String>) -> Result<Option<KeepPolicy>, Exit> {
    let get = |k: &str| -> Result<u32, Exit> {
        match file.get(k) {
            Some(v) => v.parse().map_err(|_| usage(format!("{k} must be a whole number, not {v:?}"))),
            None => Ok(0),
        }
    };
    let policy = KeepPolicy {
        last: get("prune_keep_last")?,
        hourly: get("prune_keep_hourly")?,
        daily: get("prune_keep_daily")?,
        weekly: get("prune_keep_weekly")?,
        monthly: get("prune_keep_monthly")?,
        yearly: get("prune_keep_yearly")?,
    };
    Ok((!policy.is_empty()).then_some(policy))
}

/// The configuration file's gc grace period.
fn config_grace(file: &HashMap<String, String>) -> Result<Duration, Exit> {
    Ok(Duration::from_secs(match file.get("gc_grace_secs") {
        Some(g) => g.parse().map_err(|_| usage("gc_grace_secs must be a number of seconds"))?,
        None => admin::DEFAULT_GC_GRACE.as_secs(),
    }))
}

/// `serve`'s prune schedule from the configuration file: the policy plus `prune_every_secs` and/or
/// `prune_low_space_percent`. A schedule without a policy, or a policy rule without a schedule, is refused.
fn config_schedule(file: &HashMap<String, String>) -> Result<Option<admin::PruneSchedule>, Exit> {
    let policy = config_policy(file)?;
    let every = match file.get("prune_every_secs") {
        Some(v) => match v.parse::<u64>() {
            Ok(n) if n > 0 => Some(Duration::from_secs(n)),
            _ => {
                return Err(usage(format!(
                    "prune_every_secs must be a positive number of seconds, not {v:?}"
                )))
            }
        },
        None => None,
    };
    let low = match file.get("prune_low_space_percent") {
        Some(v) => match v.parse::<f64>() {
            Ok(n) if (0.0..=100.0).contains(&n) => Some(n),
            _ => {
                return Err(usage(format!("prune_low_space_percent must be a percentage (0-100), not {v:?}")))
            }
        },
        None => None,
    };
    match (policy, every.is_some() || low.is_some()) {
        (None, false) => Ok(None),
        (None, true) => Err(usage("prune_every_secs / prune_low_space_percent need a prune_keep_* policy")),
        // A policy alone is the default of `isr-server prune`, applied by hand.
        (Some(_), false) => Ok(None),
        (Some(policy), true) => {
            let mut s = admin::PruneSchedule::new(policy);
            s.every = every;
            s.low_space_percent = low;
            s.gc_grace = config_grace(file)?;
            Ok(Some(s))
        }
    }
}

#[derive(Subcommand, Debug)]
enum RecoveryCmd {
    /// Create the deployment's recovery key pair: the private key into FILE (0600; keep it offline), the
    /// public key printed and, with --config, written into the configuration file as recovery_pubkey.
    Init {
        #[arg(long, value_name = "FILE")]
        output: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum UserCmd {
    /// Add a user (password from $ISR_PASSWORD or a prompt); creates the deployment if there is none.
    Add {
        name: String,
    },
    List,
    /// Remove a user with all their parcels (chunks go at the next gc).
    Remove {
        name: String,
    },
    /// Set a new password. Without --recovery-key the user's parcels stay sealed with the old one until they
    /// run `isr passwd`; with it, every parcel's keyroot is rewrapped under the new password now.
    Passwd {
        name: String,
        /// The deployment's recovery private key (from `recovery init`): unseal and rewrap every parcel key.
        #[arg(long, value_name = "FILE")]
        recovery_key: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum ParcelCmd {
    /// List parcels (of one user, or of all).
    List { user: Option<String> },
    /// IT's network policy of a parcel, enforced by the client at every resume (`none` wins over the
    /// user's `--network nat`). Without --network: print the current policy.
    Policy {
        /// USER/PARCEL
        target: String,
        #[arg(long, value_enum)]
        network: Option<PolicyArg>,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum PolicyArg {
    /// No working network for the parcel's VM, whatever the user asks for.
    None,
    /// User-mode NAT allowed (the user may still choose none).
    Nat,
}

/// A failure with its exit code.
struct Exit(u8, anyhow::Error);

fn usage(msg: impl std::fmt::Display) -> Exit {
    Exit(2, anyhow!("{msg}"))
}

impl<E: Into<anyhow::Error>> From<E> for Exit {
    fn from(e: E) -> Self {
        Exit(1, e.into())
    }
}

fn read_config(path: &PathBuf) -> Result<HashMap<String, String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
    let mut out = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with('[') {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| anyhow!("{}:{}: expected key = value", path.display(), i + 1))?;
        let v = v.trim().trim_matches('"');
        let k = k.trim().replace('-', "_");
        const KEYS: &[&str] = &[
            "data",
            "database",
            "chunks",
            "listen",
            "tls_cert",
            "tls_key",
            "recovery_pubkey",
            "gc_grace_secs",
            "prune_keep_last",
            "prune_keep_hourly",
            "prune_keep_daily",
            "prune_keep_weekly",
            "prune_keep_monthly",
            "prune_keep_yearly",
            "prune_every_secs",
            "prune_low_space_percent",
        ];
        if !KEYS.contains(&k.as_str()) {
            bail!("{}:{}: unknown key {k:?} (known: {})", path.display(), i + 1, KEYS.join(", "));
        }
        out.insert(k, v.to_owned());
    }
    Ok(out)
}

fn password(prompt: &str) -> Result<String> {
    if let Ok(p) = std::env::var("ISR_PASSWORD") {
        return Ok(p);
    }
    let p = rpassword::prompt_password(prompt).context("reading the password from the terminal")?;
    if p.is_empty() {
        bail!("empty password");
    }
    let again = rpassword::prompt_password("Again: ").context("reading the password from the terminal")?;
    if again != p {
        bail!("passwords do not match");
    }
    Ok(p)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("signal received: shutting down");
}

/// `serve`'s usage figures for `/metrics`: computed at startup, then every ten minutes.
fn spawn_usage_figures(state: AppState) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match isr_server::stats::usage(state.storage(), None, None, isr_server::now_unix()).await {
                Ok(r) => state.metrics().set_usage(r),
                Err(e) => tracing::warn!(error = %e, "computing the usage figures failed"),
            }
            tokio::time::sleep(Duration::from_secs(600)).await;
        }
    })
}

/// The exit code of a recovery failure (SPEC.md's codes).
fn recovery_exit(e: RecoveryError) -> Exit {
    let code = match &e {
        RecoveryError::KeyFile { .. } | RecoveryError::Usage(_) => 2,
        RecoveryError::WrongKey { .. } => 4,
        RecoveryError::Integrity(_) => 5,
        _ => 1,
    };
    Exit(code, e.into())
}

/// `recovery init`: the key file first (refusing to overwrite one), then the public half into the
/// configuration file, if one is given (refusing one that already names a recovery key, checked first).
fn recovery_init(output: &Path, config: Option<&Path>) -> Result<(), Exit> {
    if let Some(cfg) = config {
        let keys = read_config(&cfg.to_path_buf()).map_err(|e| Exit(2, e))?;
        if let Some(old) = keys.get("recovery_pubkey") {
            return Err(usage(format!(
                "{} already configures the recovery key {old}: parcels are sealed to it, so replacing it needs \
                 care (remove its recovery_pubkey line first if that is what you want)",
                cfg.display()
            )));
        }
    }
    let key = recovery::init(output).map_err(recovery_exit)?;
    let public = key.public_key().to_hex();
    if let Some(cfg) = config {
        let mut text = std::fs::read_to_string(cfg).with_context(|| format!("reading {}", cfg.display()))?;
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&format!(
            "# the deployment's recovery public key (isr-server recovery init, {})\nrecovery_pubkey = {public}\n",
            isr_server::rfc3339(isr_server::now_unix())
        ));
        let tmp = cfg.with_extension("isr-partial");
        let mode = std::fs::metadata(cfg).map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()));
        std::fs::write(&tmp, text)
            .and_then(|()| match mode {
                Ok(m) => std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(m)),
                Err(_) => Ok(()),
            })
            .and_then(|()| std::fs::rename(&tmp, cfg))
            .with_context(|| format!("writing recovery_pubkey into {}", cfg.display()))?;
        eprintln!(
            "wrote the private key to {} (keep it offline) and recovery_pubkey into {} (`serve --config {}` \
             announces it to clients, which seal the key of every parcel they create to it)",
            output.display(),
            cfg.display(),
            cfg.display()
        );
    } else {
        eprintln!(
            "wrote the private key to {} (keep it offline); give the public key to `serve --recovery-pubkey` or \
             put `recovery_pubkey = {public}` into the configuration file",
            output.display()
        );
    }
    println!("{public}");
    Ok(())
}

/// Who `isr-server unlock` is, for the holder whose lock it breaks.
const ADMIN_BREAKER: &str = "the administrator (isr-server unlock)";

async fn run(cli: Cli) -> Result<(), Exit> {
    use clap::CommandFactory;
    if let Cmd::Completions { shell } = &cli.cmd {
        isr_clikit::completions(Cli::command(), shell, &mut std::io::stdout())
            .map_err(|e| usage(e.to_string()))?;
        return Ok(());
    }
    if let Cmd::Tls(TlsCmd::Init { output, names }) = &cli.cmd {
        let files = isr_server::tls::init(output, names)?;
        eprintln!(
            "wrote {} (the CA: clients trust it with `isr --ca-cert {}`), {} and {} (serve --tls-cert {} --tls-key {})",
            files.ca_cert.display(),
            files.ca_cert.display(),
            files.cert.display(),
            files.key.display(),
            files.cert.display(),
            files.key.display()
        );
        return Ok(());
    }
    if let Cmd::Recovery(RecoveryCmd::Init { output }) = &cli.cmd {
        return recovery_init(output, cli.storage.config.as_deref());
    }
    let file = match &cli.storage.config {
        // A configuration file that cannot be used is bad usage, like a bad option.
        Some(p) => read_config(p).map_err(|e| Exit(2, e))?,
        None => HashMap::new(),
    };
    let cfg = StorageConfig {
        data: cli.storage.data.clone().or_else(|| file.get("data").map(PathBuf::from)),
        database: cli.storage.database.clone().or_else(|| file.get("database").cloned()),
        chunks: cli.storage.chunks.clone().or_else(|| file.get("chunks").cloned()),
    };
    // Only `user add` may create a deployment; everything else refuses storage that holds none.
    let mode = match cli.cmd {
        Cmd::User(UserCmd::Add { .. }) => Deployment::Create,
        _ => Deployment::MustExist,
    };
    let storage = Storage::open(&cfg, mode).await.map_err(|e| match e {
        // No storage given at all, or storage that holds no deployment: bad usage.
        isr_server::ServerError::Config(_) | isr_server::ServerError::NoDeployment(_) => Exit(2, e.into()),
        other => Exit(1, other.into()),
    })?;
    match cli.cmd {
        Cmd::Serve { listen, tls_cert, tls_key, recovery_pubkey } => {
            let listen =
                listen.or_else(|| file.get("listen").cloned()).unwrap_or_else(|| "127.0.0.1:7850".into());
            let tls_cert = tls_cert.or_else(|| file.get("tls_cert").map(PathBuf::from));
            let tls_key = tls_key.or_else(|| file.get("tls_key").map(PathBuf::from));
            let tls = match (tls_cert, tls_key) {
                (Some(c), Some(k)) => Some(isr_server::load_tls(&c, &k)?),
                (None, None) => None,
                _ => return Err(usage("--tls-cert and --tls-key go together")),
            };
            let recovery_pubkey = match recovery_pubkey.or_else(|| file.get("recovery_pubkey").cloned()) {
                Some(h) => Some(
                    RecoveryPublicKey::from_hex(&h).map_err(|e| usage(format!("--recovery-pubkey: {e}")))?,
                ),
                None => None,
            };
            let schedule = config_schedule(&file)?;
            let listener = tokio::net::TcpListener::bind(&listen)
                .await
                .with_context(|| format!("listening on {listen}"))?;
            let addr = listener.local_addr()?;
            let state =
                AppState::new(storage, ServerSettings { recovery_pubkey, ..ServerSettings::default() });
            let pruner = schedule.map(|s| {
                if s.low_space_percent.is_some() && state.storage().chunks.fs_root().is_none() {
                    tracing::warn!("prune_low_space_percent does not apply to an S3 chunk store (no free-space figure)");
                }
                tracing::info!(policy = %s.policy, every = ?s.every, low_space_percent = ?s.low_space_percent, "prune schedule");
                admin::spawn_prune_schedule(state.storage().clone(), s)
            });
            println!("listening on {}://{addr}", if tls.is_some() { "https" } else { "http" });
            tracing::info!(%addr, tls = tls.is_some(), "serving");
            let figures = spawn_usage_figures(state.clone());
            let served = isr_server::run(listener, state, tls, shutdown_signal()).await;
            figures.abort();
            if let Some(p) = pruner {
                p.abort();
            }
            served?;
        }
        Cmd::User(UserCmd::Add { name }) => {
            let pw = password(&format!("Password for {name}: "))?;
            let n = name.clone();
            let secret =
                tokio::task::spawn_blocking(move || auth::login_secret_from_password(&n, &pw)).await??;
            admin::add_user(&storage, &name, &secret).await?;
            eprintln!("user {name} added");
        }
        Cmd::User(UserCmd::Passwd { name, recovery_key: Some(key_file) }) => {
            let key = recovery::load(&key_file).map_err(recovery_exit)?;
            if storage.meta.user(&name).await?.is_none() {
                return Err(Exit(1, anyhow!("no such user: {name}")));
            }
            let pw = password(&format!("New password for {name}: "))?;
            let r = recovery::reset_password(&storage, &name, pw, &key).await.map_err(recovery_exit)?;
            for p in &r.rewrapped {
                println!("{p}: key rewrapped under the new password");
            }
            for p in &r.unsealed {
                println!("{p}: no recovery seal, left as it was (it still opens with the previous password)");
            }
            eprintln!("password of {name} changed; {} parcel keys rewrapped", r.rewrapped.len());
            if !r.unsealed.is_empty() {
                return Err(Exit(
                    1,
                    anyhow!(
                        "{} parcels of {name} have no recovery seal and still open only with the previous \
                         password: {}",
                        r.unsealed.len(),
                        r.unsealed.join(", ")
                    ),
                ));
            }
        }
        Cmd::Export { target, version, recovery_key, output, memory } => {
            let (u, p) = split_target(&target).ok_or_else(|| usage("expected USER/PARCEL"))?;
            let key = recovery::load(&recovery_key).map_err(recovery_exit)?;
            let kind = if memory { ImageKind::Memory } else { ImageKind::Disk };
            let r = recovery::export(&storage, u, p, version, kind, &key, &output)
                .await
                .map_err(recovery_exit)?;
            eprintln!(
                "{target} version {}: {} image of {} bytes written to {}",
                r.version,
                kind.name(),
                r.bytes,
                output.display()
            );
        }
        Cmd::User(UserCmd::Passwd { name, recovery_key: None }) => {
            if storage.meta.user(&name).await?.is_none() {
                return Err(Exit(1, anyhow!("no such user: {name}")));
            }
            let pw = password(&format!("New password for {name}: "))?;
            let n = name.clone();
            let secret =
                tokio::task::spawn_blocking(move || auth::login_secret_from_password(&n, &pw)).await??;
            admin::set_password(&storage, &name, &secret).await?;
            eprintln!(
                "password of {name} changed. Their parcels are still sealed with their previous password: tell \
                 {name} to run `isr passwd` with ISR_PASSWORD set to the previous password and ISR_NEW_PASSWORD \
                 to the new one (it rewraps every parcel's key and sets the new password), or rerun this \
                 with --recovery-key FILE (the deployment's recovery key rewraps them now)."
            );
        }
        Cmd::User(UserCmd::List) => {
            for u in storage.meta.list_users().await? {
                println!("{}\t{}", u.name, isr_server::rfc3339(u.created_unix));
            }
        }
        Cmd::User(UserCmd::Remove { name }) => {
            storage.meta.remove_user(&name).await?;
            eprintln!("user {name} removed (run gc to free their chunks)");
        }
        Cmd::Parcel(ParcelCmd::List { user }) => {
            let list = storage.meta.list_parcels(user.as_deref()).await?;
            println!("{:<16} {:<24} {:>6}  LOCK", "USER", "PARCEL", "HEAD");
            for p in list {
                let lock = match &p.lock {
                    Some(l) => format!("{} since {}", l.holder, isr_server::rfc3339(l.since_unix)),
                    None => "-".into(),
                };
                println!("{:<16} {:<24} {:>6}  {lock}", p.user, p.name, p.head);
            }
        }
        Cmd::Parcel(ParcelCmd::Policy { target, network }) => {
            let (u, p) = split_target(&target).ok_or_else(|| usage("expected USER/PARCEL"))?;
            match network {
                Some(arg) => {
                    let policy = match arg {
                        PolicyArg::None => NetworkPolicy::None,
                        PolicyArg::Nat => NetworkPolicy::Nat,
                    };
                    storage.meta.set_network_policy(u, p, Some(policy)).await?;
                    eprintln!("{target}: network policy {policy} (applies from the next resume)");
                }
                None => {
                    let current = storage.meta.parcel(u, p).await?.network_policy;
                    println!("{}", current.map_or("unset", NetworkPolicy::as_str));
                }
            }
        }
        Cmd::Unlock { target } => {
            let (u, p) = split_target(&target).ok_or_else(|| usage("expected USER/PARCEL"))?;
            let how = LockRelease::Force { by: ADMIN_BREAKER.into(), now_unix: isr_server::now_unix() };
            storage.meta.release_lock(u, p, how).await?;
            eprintln!("{target} unlocked");
        }
        Cmd::Prune { target, all: _, keep, dry_run, no_gc } => {
            let target = match &target {
                Some(t) => Some(split_target(t).ok_or_else(|| usage("expected USER/PARCEL"))?),
                None => None,
            };
            let policy = if keep.any() {
                keep.policy()
            } else {
                config_policy(&file)?.ok_or_else(|| {
                    usage("no prune policy: give --keep-last/-hourly/-daily/-weekly/-monthly/-yearly N (or prune_keep_* in the configuration file)")
                })?
            };
            if policy.is_empty() {
                return Err(usage(
                    "every --keep-* rule is 0: give at least one N ≥ 1 (the head is never pruned)",
                ));
            }
            let pruned = admin::prune_policy(&storage, target, &policy, dry_run).await?;
            let verb = if dry_run { "would delete" } else { "deleted" };
            for p in &pruned {
                let going = p.decisions.iter().filter(|d| !d.kept()).count();
                println!(
                    "{}/{}: {verb} {going} of {} versions ({policy})",
                    p.user,
                    p.parcel,
                    p.decisions.len()
                );
                for d in &p.decisions {
                    let why = if d.kept() {
                        format!("keep    ({})", d.reasons.join(", "))
                    } else {
                        "delete".into()
                    };
                    println!("  {:>6}  {}  {why}", d.version, isr_server::rfc3339(d.created_unix));
                }
            }
            if !dry_run {
                let (v, k) = pruned
                    .iter()
                    .fold((0, 0), |(v, k), p| (v + p.stats.versions_deleted, k + p.stats.keyrings_deleted));
                eprintln!("prune: deleted {v} versions and {k} keyrings");
                if !no_gc {
                    let grace = config_grace(&file)?;
                    let r = admin::gc(&storage, grace).await?;
                    eprintln!(
                        "gc: {} chunks deleted ({} bytes), {} unreferenced but younger than {} s kept, {} held by a lock kept",
                        r.deleted,
                        r.bytes_freed,
                        r.spared_young,
                        grace.as_secs(),
                        r.spared_held
                    );
                }
            }
        }
        Cmd::Gc { grace } => {
            let grace = match grace {
                Some(g) => g,
                None => config_grace(&file)?.as_secs(),
            };
            let r = admin::gc(&storage, Duration::from_secs(grace)).await?;
            eprintln!(
                "gc: {} chunks stored, {} referenced, {} deleted ({} bytes), {} unreferenced but younger than {grace} s kept, {} held by a lock kept, {} abandoned keyrings purged",
                r.stored, r.referenced, r.deleted, r.bytes_freed, r.spared_young, r.spared_held, r.keyrings_purged
            );
        }
        Cmd::Stats { target, json } => {
            let (u, p) = match target.as_deref() {
                None => (None, None),
                Some(t) if t.contains('/') => {
                    let (u, p) = split_target(t).ok_or_else(|| usage("expected USER or USER/PARCEL"))?;
                    (Some(u), Some(p))
                }
                Some(u) => (Some(u), None),
            };
            if let Some(u) = u {
                if storage.meta.user(u).await?.is_none() {
                    return Err(Exit(1, anyhow!("no such user: {u}")));
                }
            }
            let r = isr_server::stats::usage(&storage, u, p, isr_server::now_unix()).await?;
            if let (Some(u), Some(p)) = (u, p) {
                if r.parcels.is_empty() {
                    return Err(Exit(1, anyhow!("no such parcel: {u}/{p}")));
                }
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "{:<16} {:<24} {:>8} {:>12} {:>12} {:>9} {:>12} {:>12} {:>6}",
                    "USER",
                    "PARCEL",
                    "VERSIONS",
                    "CHECKIN_P50",
                    "CHECKIN_P95",
                    "PER_DAY",
                    "UNIQUE",
                    "SHARED",
                    "DEDUP"
                );
                for x in &r.parcels {
                    println!(
                        "{:<16} {:<24} {:>8} {:>12} {:>12} {:>9.2} {:>12} {:>12} {:>6.2}",
                        x.user,
                        x.parcel,
                        x.versions,
                        x.checkin_bytes_p50,
                        x.checkin_bytes_p95,
                        x.checkins_per_day,
                        x.unique_bytes,
                        x.shared_bytes,
                        x.dedup_ratio
                    );
                }
                eprintln!(
                    "deployment: {} chunks ({} bytes) referenced, {} bytes counting every version in full, dedup \
                     ratio {:.2}; bytes are stored (compressed, encrypted) chunk bytes; PER_DAY is over the last 30 days",
                    r.referenced_chunks, r.referenced_bytes, r.logical_bytes, r.dedup_ratio
                );
            }
        }
        // Need no storage: handled above.
        Cmd::Tls(_) | Cmd::Completions { .. } | Cmd::Recovery(_) => {}
        Cmd::Check { full, repair } => {
            let r = admin::check(&storage, full).await?;
            for p in &r.problems {
                println!("{p}");
            }
            let index = storage.chunks.check_index(repair).await?;
            let mut stale = 0;
            if let Some(ix) = &index {
                let fixed = if ix.repaired { " (removed)" } else { "" };
                for t in &ix.stale {
                    println!("chunk index says present, store lacks chunk {t}{fixed}");
                }
                stale = if ix.repaired { 0 } else { ix.stale.len() };
                eprintln!(
                    "chunk index: {} rows, {} chunks listed, {} without a present row{}",
                    ix.rows,
                    ix.listed,
                    ix.unindexed.len(),
                    if ix.repaired {
                        " (indexed now)"
                    } else {
                        " (reported missing until uploaded again or check --repair)"
                    }
                );
            }
            if !r.problems.is_empty() || stale > 0 {
                return Err(Exit(
                    5,
                    anyhow!(
                        "check failed: {} problems in {} keyrings / {} chunks",
                        r.problems.len() + stale,
                        r.keyrings,
                        r.chunks
                    ),
                ));
            }
            eprintln!(
                "check{}: {} keyrings, {} chunks: all good",
                if full { " --full" } else { "" },
                r.keyrings,
                r.chunks
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    use std::io::IsTerminal;
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "man") {
        use clap::CommandFactory;
        return isr_clikit::man_main(Cli::command(), &args[2..]);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colour escapes only for a terminal, never in a log file.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("isr-server: error: starting the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Exit(code, e)) => {
            eprintln!("isr-server: error: {e:#}");
            ExitCode::from(code)
        }
    }
}
