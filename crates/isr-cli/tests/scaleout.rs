//! Scale-out: two `isr-server` processes on one PostgreSQL database and one S3 bucket behave as one server.
//! Real PostgreSQL and SeaweedFS, started by `scripts/services.sh` (nothing is mocked or skipped).

mod common;
use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

/// One deployment: a fresh database and bucket prefix on the shared test services.
struct Deployment {
    database: String,
    chunks: String,
}

fn deployment() -> Deployment {
    let svc = isr_testkit::services();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    Deployment { database: rt.block_on(svc.fresh_pg_database()), chunks: svc.fresh_s3_url() }
}

impl Deployment {
    fn server_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(server_bin());
        c.args(args)
            .args(["--database", &self.database, "--chunks", &self.chunks])
            .envs(isr_testkit::services().env())
            .env("ISR_PASSWORD", PASSWORD)
            .stdin(Stdio::null());
        c
    }

    fn serve(&self) -> (Child, String) {
        let mut child = self
            .server_cmd(&["serve", "--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let url = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("{line:?}")).to_owned();
        (child, url)
    }
}

fn client(url: &str) -> Client {
    Client {
        home: tempfile::tempdir().unwrap(),
        server: url.into(),
        user: "alice".into(),
        password: PASSWORD.into(),
        // The check-ins here count what they send: nothing goes in the background (crates/isr-server/tests/
        // held.rs covers chunks held across two servers on PostgreSQL + S3).
        env: vec![("ISR_UPLOAD_RATE".into(), "0".into())],
    }
}

#[test]
fn two_servers_on_postgres_and_s3_act_as_one() {
    let svc = deployment();
    let out = svc.server_cmd(&["user", "add", "alice"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (mut s1, url1) = svc.serve();
    let (mut s2, url2) = svc.serve();

    // Client A works through server 1, client B through server 2.
    let a = client(&url1);
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let original = make_image(&img, 32 << 20);
    a.ok(&["create", "p", "--disk", img.to_str().unwrap()]);
    a.ok(&["checkout", "p"]);
    let sock = dir.path().join("a.sock");
    let disk = a.disk("p", &sock);
    assert!(qemu_io(&sock, &["write -P 0x3c 5M 300k", "flush"]).0);
    stop_disk(disk);
    let out = a.ok(&["checkin", "p", "-m", "via server 1"]);
    // 300 KiB at 5 MiB: two identical whole chunks (deduplicated) and a partial one.
    assert_eq!(sent_chunks(&out), 2, "{out}");

    let b = client(&url2);
    b.ok(&["checkout", "p"]);
    let sock = dir.path().join("b.sock");
    let disk = b.disk("p", &sock);
    let (ok, text) = qemu_io(&sock, &["read -P 0x3c 5M 300k", "read -P 0 20M 1M"]);
    assert!(ok, "{text}");
    stop_disk(disk);
    // The lock taken through server 2 holds on server 1.
    let (code, err) = a.code(&["checkout", "p"]);
    assert_eq!(code, 3, "{err}");
    b.ok(&["checkin", "p"]);
    let exported = dir.path().join("x.img");
    a.ok(&["export", "p", "--output", exported.to_str().unwrap()]);
    assert_eq!(std::fs::read(&exported).unwrap()[..4 << 20], original[..]);

    // Two clients racing for the lock through different servers: exactly one wins, every time.
    let c1 = client(&url1);
    let c2 = client(&url2);
    for round in 0..100 {
        let mut p1 = c1.cmd(&["checkout", "p"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        let mut p2 = c2.cmd(&["checkout", "p"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        let (r1, r2) = (p1.wait().unwrap().code(), p2.wait().unwrap().code());
        let winners = [r1, r2].iter().filter(|r| **r == Some(0)).count();
        assert_eq!(winners, 1, "round {round}: exit codes {r1:?} {r2:?}");
        assert!(r1 == Some(3) || r2 == Some(3), "round {round}: the loser must exit 3: {r1:?} {r2:?}");
        let winner = if r1 == Some(0) { &c1 } else { &c2 };
        winner.ok(&["checkin", "p"]);
    }

    // Admin commands against the shared backends.
    let out = svc.server_cmd(&["check", "--full"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = svc.server_cmd(&["gc"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = svc.server_cmd(&["parcel", "list"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains('p'));
    a.ok(&["export", "p", "--output", exported.to_str().unwrap()]);

    let _ = s1.kill();
    let _ = s2.kill();
    let _ = s1.wait();
    let _ = s2.wait();
}
