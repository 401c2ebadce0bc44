//! The real `isr-server` binary: SIGKILL in the middle of a check-in, restart, check, finish the check-in;
//! graceful SIGTERM; exit codes of `check`. On every backend combination (PostgreSQL and S3 are real
//! services, see `isr_testkit`).

mod common;

use common::{version, Api, Backend};
use isr_format::keys::KdfParams;
use isr_format::{Tag, UserSecrets};
use isr_store::object_store::ObjectStoreExt;
use isr_store::S3ChunkStore;
use reqwest::StatusCode;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_isr-server");

/// One deployment of the real binary: its storage options and environment, and a way to damage a stored
/// chunk behind the server's back.
struct Deployment {
    /// Holds the data directory, SQLite file or chunk files for the test's lifetime.
    _dir: tempfile::TempDir,
    storage_args: Vec<String>,
    env: Vec<(String, String)>,
    /// The S3 chunk store (when chunks live in S3), else chunk files under `chunk_dir`.
    s3: Option<S3ChunkStore>,
    chunk_dir: PathBuf,
}

impl Deployment {
    async fn new(backend: Backend) -> Deployment {
        let dir = tempfile::tempdir().unwrap();
        let mut storage_args = Vec::new();
        let mut env = Vec::new();
        let chunk_dir = dir.path().join("chunks");
        let mut s3 = None;
        match backend {
            Backend::Embedded => storage_args.extend(["--data".into(), dir.path().display().to_string()]),
            Backend::SqliteS3 | Backend::PgFs | Backend::PgS3 => {
                let database = if backend == Backend::SqliteS3 {
                    format!("sqlite:{}", dir.path().join("meta.sqlite").display())
                } else {
                    isr_testkit::services().fresh_pg_database().await
                };
                let chunks = if backend == Backend::PgFs {
                    chunk_dir.display().to_string()
                } else {
                    let svc = isr_testkit::services();
                    let url = svc.fresh_s3_url();
                    s3 = Some(S3ChunkStore::from_url_with(&url, svc.s3_builder()).unwrap());
                    env.extend(svc.env().map(|(k, v)| (k.to_owned(), v.to_owned())));
                    url
                };
                storage_args.extend(["--database".into(), database, "--chunks".into(), chunks]);
            }
        }
        Deployment { _dir: dir, storage_args, env, s3, chunk_dir }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(args)
            .args(&self.storage_args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("ISR_PASSWORD", "correct horse")
            .env("RUST_LOG", "warn");
        c
    }

    fn admin(&self, args: &[&str]) -> std::process::Output {
        self.cmd(args).output().unwrap()
    }

    /// Starts `serve` on a free port; returns the child and its URL (from the one line it prints).
    fn serve(&self) -> (Child, String) {
        let mut child =
            self.cmd(&["serve", "--listen", "127.0.0.1:0"]).stdout(Stdio::piped()).spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let url = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
        assert!(url.starts_with("http://127.0.0.1:"), "{url}");
        assert!(!url.ends_with(":0"));
        (child, url.to_owned())
    }

    fn chunk_path(&self, t: &Tag) -> PathBuf {
        self.chunk_dir.join(&t.to_hex()[..2]).join(t.to_hex())
    }

    async fn remove_chunk(&self, t: &Tag) {
        match &self.s3 {
            Some(s3) => s3.object_store().delete(&s3.key_of(t)).await.unwrap(),
            None => std::fs::remove_file(self.chunk_path(t)).unwrap(),
        }
    }

    /// Flips one bit of a stored chunk.
    async fn corrupt_chunk(&self, t: &Tag) {
        match &self.s3 {
            Some(s3) => {
                let key = s3.key_of(t);
                let mut bytes = s3.object_store().get(&key).await.unwrap().bytes().await.unwrap().to_vec();
                bytes[40] ^= 1;
                s3.object_store().put(&key, bytes.into()).await.unwrap();
            }
            None => {
                let mut bytes = std::fs::read(self.chunk_path(t)).unwrap();
                bytes[40] ^= 1;
                std::fs::write(self.chunk_path(t), bytes).unwrap();
            }
        }
    }
}

macro_rules! on_every_backend {
    ($test:ident: $($module:ident => $backend:ident),*) => {
        $(
            mod $module {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Backend::$backend).await
                }
            }
        )*
    };
}

on_every_backend!(sigkill_mid_checkin_leaves_the_head_and_the_retry_finishes:
    embedded => Embedded, sqlite_s3 => SqliteS3, pg_fs => PgFs, pg_s3 => PgS3);
on_every_backend!(sigkill_between_the_puts_and_the_commit_then_the_checkin_completes:
    between_embedded => Embedded, between_pg_s3 => PgS3);
on_every_backend!(network_policy_is_set_by_the_administrator_and_served_to_the_owner:
    policy_embedded => Embedded, policy_pg_fs => PgFs);

/// `isr-server parcel policy USER/P --network none|nat` stores IT's policy; `GET /api/v1/parcels/P` returns
/// it (null while unset), only to the parcel's owner; bad targets and values are refused.
async fn network_policy_is_set_by_the_administrator_and_served_to_the_owner(backend: Backend) {
    let d = Deployment::new(backend).await;
    for user in ["alice", "bob"] {
        let out = d.admin(&["user", "add", user]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let secret = |u: &str| UserSecrets::derive(u, "correct horse", KdfParams::DEFAULT).unwrap().login;
    let (mut server, url) = d.serve();
    let mut alice = Api::new(&url);
    alice.login("alice", &secret("alice")).await;
    let mut bob = Api::new(&url);
    bob.login("bob", &secret("bob")).await;
    alice.create("p", "laptop").await;
    alice.create("q", "laptop").await;
    let policy_of = |api: &Api, p: &'static str| {
        let api = api.clone();
        async move { api.get(&format!("/api/v1/parcels/{p}")).await.json()["network_policy"].clone() }
    };
    assert_eq!(policy_of(&alice, "p").await, serde_json::Value::Null);
    let show = |target: &str| {
        let out = d.admin(&["parcel", "policy", target]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(show("alice/p"), "unset");

    let out = d.admin(&["parcel", "policy", "alice/p", "--network", "none"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("network policy none"));
    assert_eq!(policy_of(&alice, "p").await, "none");
    assert_eq!(policy_of(&alice, "q").await, serde_json::Value::Null, "only the parcel named");
    assert_eq!(show("alice/p"), "none");
    // Another user sees no such parcel, policy or not.
    assert_eq!(bob.get("/api/v1/parcels/p").await.code(), "no_such_parcel");

    let out = d.admin(&["parcel", "policy", "alice/p", "--network", "nat"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(policy_of(&alice, "p").await, "nat");

    // Refusals: an unknown value or a malformed target is bad usage; a missing parcel names itself. The
    // stored policy is unchanged by each.
    for (args, code) in [
        (vec!["parcel", "policy", "alice/p", "--network", "bridged"], 2),
        (vec!["parcel", "policy", "alice", "--network", "none"], 2),
        (vec!["parcel", "policy", "alice/nope", "--network", "none"], 1),
        (vec!["parcel", "policy", "carol/p", "--network", "none"], 1),
    ] {
        let out = d.admin(&args);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        if code == 1 {
            assert!(String::from_utf8_lossy(&out.stderr).contains("no such parcel"), "{args:?}");
        }
    }
    assert_eq!(policy_of(&alice, "p").await, "nat");
    server.kill().unwrap();
    server.wait().unwrap();
}

async fn sigkill_mid_checkin_leaves_the_head_and_the_retry_finishes(backend: Backend) {
    let d = Deployment::new(backend).await;
    let out = d.admin(&["user", "add", "alice"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listed = d.admin(&["user", "list"]);
    assert!(String::from_utf8_lossy(&listed.stdout).starts_with("alice\t"));
    let secret = UserSecrets::derive("alice", "correct horse", KdfParams::DEFAULT).unwrap().login;

    let (mut server, url) = d.serve();
    let mut api = Api::new(&url);
    api.login("alice", &secret).await;
    let lock = api.create("p", "laptop").await;
    let v1 = version(1, 8, 0);
    assert_eq!(api.upload_version("p", &lock, 0, &v1).await, 1);

    // Check-in of version 2: keyring, then chunks; the server dies part-way through the chunks.
    let v2 = version(2, 600, 0);
    assert_eq!(api.put_keyring("p", &lock, &v2).await.status, StatusCode::CREATED);
    let needed = api.missing(&v2.tags()).await;
    assert_eq!(needed.len(), v2.chunks.len());
    let (confirmed_part, rest) = needed.split_at(needed.len() / 3);
    for t in confirmed_part {
        let c = &v2.chunks.iter().find(|(x, _)| x == t).unwrap().1;
        assert_eq!(api.put_chunk(t, c).await.status, StatusCode::CREATED);
    }
    // The rest in flight, 8 at a time, while the server is killed; the last chunk is held back until after
    // the kill, so the check-in is unfinished however fast the uploads go.
    let confirmed = std::sync::Arc::new(std::sync::Mutex::new(confirmed_part.to_vec()));
    let (in_flight, _held_back) = rest.split_at(rest.len() - 1);
    let uploads = {
        let (api, rest, v2, confirmed) = (api.clone(), in_flight.to_vec(), v2.clone(), confirmed.clone());
        tokio::spawn(async move {
            use futures::StreamExt;
            futures::stream::iter(rest)
                .for_each_concurrent(8, |t| {
                    let (api, v2, confirmed) = (api.clone(), v2.clone(), confirmed.clone());
                    async move {
                        let c = v2.chunks.iter().find(|(x, _)| *x == t).unwrap().1.clone();
                        let r = api
                            .http
                            .put(format!("{}/api/v1/chunks/{t}", api.url))
                            .bearer_auth(api.token.as_ref().unwrap())
                            .body(c)
                            .send()
                            .await;
                        if r.is_ok_and(|r| r.status() == StatusCode::CREATED) {
                            confirmed.lock().unwrap().push(t);
                        }
                    }
                })
                .await;
        })
    };
    // Kill once some of them have landed (a generous deadline, not a duration the test depends on).
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    while confirmed.lock().unwrap().len() < confirmed_part.len() + 16 {
        assert!(std::time::Instant::now() < deadline, "uploads did not progress");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.kill().unwrap(); // SIGKILL
    server.wait().unwrap();
    uploads.await.unwrap();
    let confirmed = confirmed.lock().unwrap().clone();
    assert!(confirmed.len() < needed.len());

    // After the crash: metadata intact, head unchanged, every referenced chunk present.
    let out = d.admin(&["check", "--full"]);
    assert!(out.status.success(), "check after crash: {}", String::from_utf8_lossy(&out.stdout));
    let (mut server, url) = d.serve();
    api.url = url;
    let p = api.get("/api/v1/parcels/p").await.json();
    assert_eq!(p["head"], 1);
    assert_eq!(p["lock"]["holder"], "host-laptop");
    // The token survived too (it lives in the database). chunks/missing reports exactly what did not arrive:
    // never the confirmed uploads, always those never sent; the ones in flight may have landed or not.
    let missing = api.missing(&v2.tags()).await;
    for t in &confirmed {
        assert!(!missing.contains(t), "confirmed chunk {t} reported missing");
    }
    assert!(!missing.is_empty());
    assert!(missing.len() <= needed.len() - confirmed.len());
    // Retry: upload only what is missing, commit.
    let before = isr_server_bytes_in(&api).await;
    for t in &missing {
        let c = &v2.chunks.iter().find(|(x, _)| x == t).unwrap().1;
        assert_eq!(api.put_chunk(t, c).await.status, StatusCode::CREATED);
    }
    let a = api.commit("p", &lock, 1, &v2).await;
    assert_eq!(a.status, StatusCode::CREATED, "{:?}", a.body);
    assert_eq!(a.json()["version"], 2);
    let sent: u64 =
        missing.iter().map(|t| v2.chunks.iter().find(|(x, _)| x == t).unwrap().1.len() as u64).sum();
    assert!(isr_server_bytes_in(&api).await - before >= sent);
    let m = api.get("/api/v1/parcels/p/versions/head/manifest").await;
    assert_eq!(&m.body[..], &v2.manifest[..]);

    // Graceful stop on SIGTERM: exit 0.
    assert!(Command::new("kill").arg("-TERM").arg(server.id().to_string()).status().unwrap().success());
    let status = server.wait().unwrap();
    assert_eq!(status.code(), Some(0));

    // check: all good, then a missing and a corrupt chunk make it exit 5 naming them.
    assert!(d.admin(&["check"]).status.success());
    let parcels = String::from_utf8(d.admin(&["parcel", "list"]).stdout).unwrap();
    assert!(parcels.contains("alice") && parcels.contains("host-laptop"), "{parcels}");
    let gone = v2.chunks[0].0;
    d.remove_chunk(&gone).await;
    let out = d.admin(&["check"]);
    assert_eq!(out.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&gone.to_hex()));
    let bad = v2.chunks[1].0;
    d.corrupt_chunk(&bad).await;
    assert!(d.admin(&["check"]).status.code() == Some(5));
    let out = d.admin(&["check", "--full"]);
    assert_eq!(out.status.code(), Some(5));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("corrupt chunk {bad}")), "{text}");

    // Admin commands: unlock, prune, usage errors, unsupported backends.
    assert!(d.admin(&["unlock", "alice/p"]).status.success());
    assert!(!String::from_utf8(d.admin(&["parcel", "list", "alice"]).stdout)
        .unwrap()
        .contains("host-laptop"));
    assert!(d.admin(&["prune", "alice/p", "--keep", "1"]).status.success());
    assert_eq!(d.admin(&["prune", "alice/p", "--keep", "0"]).status.code(), Some(2));
    assert_eq!(d.admin(&["prune", "nobody", "--keep", "1"]).status.code(), Some(2));
    assert_eq!(d.admin(&["frobnicate"]).status.code(), Some(2));
    let out = Command::new(BIN)
        .args(["gc", "--database", "postgres://isr@127.0.0.1:9/isr", "--chunks", "s3://b/p"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("database"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = d.admin(&["gc", "--grace", "0"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Every chunk PUT (none synced yet on chunk files: durability comes with the commit), then SIGKILL before the
/// commit: after a restart `missing` still reports none of them (a killed process loses nothing the kernel
/// has), the commit succeeds and makes them durable, and `check --full` finds every chunk intact.
async fn sigkill_between_the_puts_and_the_commit_then_the_checkin_completes(backend: Backend) {
    let d = Deployment::new(backend).await;
    assert!(d.admin(&["user", "add", "alice"]).status.success());
    let secret = UserSecrets::derive("alice", "correct horse", KdfParams::DEFAULT).unwrap().login;
    let (mut server, url) = d.serve();
    let mut api = Api::new(&url);
    api.login("alice", &secret).await;
    let lock = api.create("p", "laptop").await;
    let v1 = version(5, 64, 0);
    assert_eq!(api.put_keyring("p", &lock, &v1).await.status, StatusCode::CREATED);
    for (t, c) in &v1.chunks {
        assert_eq!(api.put_chunk(t, c).await.status, StatusCode::CREATED);
    }
    server.kill().unwrap(); // SIGKILL
    server.wait().unwrap();

    let (mut server, url) = d.serve();
    api.url = url;
    assert_eq!(api.missing(&v1.tags()).await, Vec::<Tag>::new(), "every acknowledged chunk is still there");
    let a = api.commit("p", &lock, 0, &v1).await;
    assert_eq!(a.status, StatusCode::CREATED, "{:?}", a.body);
    assert_eq!(a.json()["version"], 1);
    let m = api.get("/api/v1/parcels/p/versions/head/manifest").await;
    assert_eq!(&m.body[..], &v1.manifest[..]);
    server.kill().unwrap();
    server.wait().unwrap();
    let out = d.admin(&["check", "--full"]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn isr_server_bytes_in(api: &Api) -> u64 {
    let m = String::from_utf8(api.get("/metrics").await.body.to_vec()).unwrap();
    m.lines().find_map(|l| l.strip_prefix("isr_bytes_in_total ")).unwrap().parse().unwrap()
}

fn mode_of(p: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn run(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env_remove("ISR_DATA")
        .env("ISR_PASSWORD", "correct horse")
        .env("RUST_LOG", "info")
        .output()
        .unwrap()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Only `user add` makes a deployment; every other subcommand refuses storage that holds none, creating
/// nothing. What `user add` and `serve` write is private, and the log has no colour escapes.
#[tokio::test]
async fn only_user_add_makes_a_deployment_and_its_files_are_private() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let d = data.display().to_string();
    let db = format!("sqlite:{}", dir.path().join("db/meta.sqlite").display());
    let chunks = dir.path().join("chunks").display().to_string();
    let commands: &[&[&str]] = &[
        &["serve", "--listen", "127.0.0.1:0"],
        &["user", "list"],
        &["user", "passwd", "alice"],
        &["user", "remove", "alice"],
        &["parcel", "list"],
        &["check"],
        &["gc"],
        &["prune", "alice/p", "--keep", "1"],
        &["unlock", "alice/p"],
        &["parcel", "policy", "alice/p", "--network", "none"],
    ];
    for cmd in commands {
        for storage in
            [vec!["--data", d.as_str()], vec!["--database", db.as_str(), "--chunks", chunks.as_str()]]
        {
            let out = run(&[*cmd, storage.as_slice()].concat());
            assert_eq!(out.status.code(), Some(2), "{cmd:?} {storage:?}: {}", stderr(&out));
            assert!(stderr(&out).contains("isr-server user add"), "{cmd:?}: {}", stderr(&out));
        }
        assert!(!data.exists() && !dir.path().join("db").exists() && !dir.path().join("chunks").exists());
    }
    // A PostgreSQL database no `user add` initialised is refused too.
    let pg = isr_testkit::services().fresh_pg_database().await;
    let out = run(&["parcel", "list", "--database", &pg, "--chunks", &chunks]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("never initialised"), "{}", stderr(&out));

    let out = run(&["user", "add", "alice", "--data", &d]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(mode_of(&data), 0o700);
    assert_eq!(mode_of(&data.join("meta.sqlite")), 0o600);
    assert_eq!((mode_of(&data.join("chunks")), mode_of(&data.join("chunks/tmp"))), (0o700, 0o700));

    // serve: what it writes is private too; its log to a pipe has no escape codes.
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data", &d])
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let url = line.trim().strip_prefix("listening on ").unwrap().to_owned();
    let mut api = Api::new(&url);
    api.login("alice", &UserSecrets::derive("alice", "correct horse", KdfParams::DEFAULT).unwrap().login)
        .await;
    let lock = api.create("p", "laptop").await;
    let v = version(1, 3, 0);
    assert_eq!(api.upload_version("p", &lock, 0, &v).await, 1);
    let (t, _) = &v.chunks[0];
    let chunk = data.join("chunks").join(&t.to_hex()[..2]).join(t.to_hex());
    assert_eq!((mode_of(chunk.parent().unwrap()), mode_of(&chunk)), (0o700, 0o600));
    for suffix in ["-wal", "-shm"] {
        let p = data.join(format!("meta.sqlite{suffix}"));
        if p.exists() {
            assert_eq!(mode_of(&p), 0o600, "{}", p.display());
        }
    }

    // The administrator breaks the lock: the holder is told it was the administrator.
    let out = run(&["unlock", "alice/p", "--data", &d]);
    assert!(out.status.success(), "{}", stderr(&out));
    let a = api.confirm("p", &lock).await;
    assert_eq!(a.code(), "lock_broken");
    assert_eq!(a.json()["broken_by"], "the administrator (isr-server unlock)");

    // An administrator's password reset says what the user must do.
    let out = run(&["user", "passwd", "alice", "--data", &d]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stderr(&out);
    for needle in ["isr passwd", "ISR_PASSWORD", "ISR_NEW_PASSWORD", "previous password"] {
        assert!(text.contains(needle), "{needle}: {text}");
    }

    assert!(Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap().success());
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("INFO"), "{log}");
    assert!(!log.contains('\x1b'), "escape codes in the log: {log:?}");
}

/// `tls init` needs no storage, writes the three files, and refuses to overwrite them.
#[test]
fn tls_init_writes_a_ca_and_a_server_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("tls");
    let o = out_dir.display().to_string();
    let out = run(&["tls", "init", "--output", &o, "--name", "isr.example", "--name", "10.0.0.7"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("--ca-cert"), "{}", stderr(&out));
    for f in ["ca.pem", "cert.pem", "key.pem"] {
        assert!(out_dir.join(f).is_file(), "{f}");
    }
    assert_eq!(mode_of(&out_dir.join("key.pem")), 0o600);
    // cert.pem holds the server certificate and the CA's; ca.pem is the CA alone.
    let ca = std::fs::read_to_string(out_dir.join("ca.pem")).unwrap();
    let chain = std::fs::read_to_string(out_dir.join("cert.pem")).unwrap();
    assert_eq!(ca.matches("BEGIN CERTIFICATE").count(), 1);
    assert_eq!(chain.matches("BEGIN CERTIFICATE").count(), 2);
    assert!(chain.ends_with(&ca));
    let again = run(&["tls", "init", "--output", &o]);
    assert_eq!(again.status.code(), Some(1));
    assert!(stderr(&again).contains("already exists"), "{}", stderr(&again));
}
