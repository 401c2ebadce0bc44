//! Versions kept by policy: `isr-server prune` (one parcel, --all, --dry-run), the policy of the
//! configuration file applied by `serve` on its schedule, and the low-space threshold.

mod common;

use common::{version, Api, TestServer};
use isr_server::admin::{self, PruneSchedule};
use isr_store::meta::KeepPolicy;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_isr-server");

fn admin_cmd(s: &TestServer, args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).arg("--data").arg(s.dir.path()).env("RUST_LOG", "warn").output().unwrap()
}

fn text(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

async fn numbers(api: &Api, parcel: &str) -> Vec<u64> {
    let v = api.get(&format!("/api/v1/parcels/{parcel}/versions")).await.json();
    v.as_array().unwrap().iter().map(|v| v["version"].as_u64().unwrap()).collect()
}

/// `n` versions of `parcel`, each with 3 chunks of its own and 1 shared by all; returns their contents.
async fn versions(api: &Api, parcel: &str, seed: u64, n: u64) -> Vec<common::Version> {
    let lock = api.create(parcel, &format!("client-{parcel}")).await;
    let vs: Vec<_> = (0..n).map(|i| version(seed + i, 5, 1)).collect();
    for (i, v) in vs.iter().enumerate() {
        api.upload_version(parcel, &lock, i as u64, v).await;
    }
    vs
}

async fn wait_for_versions(api: &Api, parcel: &str, want: &[u64]) {
    let end = Instant::now() + Duration::from_secs(180);
    loop {
        let now = numbers(api, parcel).await;
        if now == want {
            return;
        }
        assert!(Instant::now() < end, "{parcel}: versions {now:?}, still not {want:?} after 3 minutes");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prune_by_policy_from_the_command_line_and_on_the_configured_schedule() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let va = versions(&alice, "p", 10, 4).await;
    versions(&bob, "q", 20, 3).await;

    // No rule: usage. Every rule 0: usage. A target that is not USER/PARCEL: usage.
    for args in [
        &["prune", "alice/p"][..],
        &["prune", "--all", "--keep-last", "0"],
        &["prune", "alice", "--keep-last", "1"],
    ] {
        let out = admin_cmd(&s, args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
    }

    // Dry run: lists what would go and why the rest stays; changes nothing.
    let out = admin_cmd(&s, &["prune", "alice/p", "--keep-last", "2", "--dry-run"]);
    assert!(out.status.success(), "{}", text(&out));
    let listing = String::from_utf8(out.stdout).unwrap();
    assert!(listing.contains("alice/p: would delete 2 of 4 versions (--keep-last 2)"), "{listing}");
    assert!(
        listing.lines().any(|l| l.trim_start().starts_with("4 ") && l.contains("keep    (last)")),
        "{listing}"
    );
    assert!(listing.lines().any(|l| l.trim_start().starts_with("1 ") && l.ends_with("delete")), "{listing}");
    assert_eq!(numbers(&alice, "p").await, vec![1, 2, 3, 4]);

    // Today's `--keep N` is --keep-last N; only the named parcel changes; gc runs after (its grace period
    // spares the young chunks the pruned versions leave).
    let out = admin_cmd(&s, &["prune", "alice/p", "--keep", "2"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("deleted 2 versions") && text(&out).contains("gc: 0 chunks deleted"),
        "{}",
        text(&out)
    );
    assert_eq!(numbers(&alice, "p").await, vec![3, 4]);
    assert_eq!(numbers(&bob, "q").await, vec![1, 2, 3]);
    assert_eq!(alice.get("/api/v1/parcels/p/versions/1/manifest").await.code(), "no_such_version");
    assert!(alice.missing(&va[0].tags()).await.is_empty(), "chunks younger than the grace stay");

    // The configuration file's policy, applied by `serve` every second, then gc (grace 0): every parcel goes
    // down to its head and the chunks only the pruned versions named are deleted.
    let cfg = s.dir.path().join("server.conf");
    std::fs::write(
        &cfg,
        format!(
            "data = {}\nprune_keep_last = 1\nprune_every_secs = 1\ngc_grace_secs = 0\n",
            s.dir.path().display()
        ),
    )
    .unwrap();
    let mut serve = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_versions(&alice, "p", &[4]).await;
    wait_for_versions(&bob, "q", &[3]).await;
    let end = Instant::now() + Duration::from_secs(180);
    while alice.missing(&va[2].tags()).await.len() < 3 {
        assert!(Instant::now() < end, "gc after the scheduled prune never deleted version 3's own chunks");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(alice.missing(&va[3].tags()).await.is_empty(), "the head's chunks stay");
    let _ = serve.kill();
    let _ = serve.wait();

    // With the policy in the file, `prune --all` without options applies it (nothing left to do).
    let out = admin_cmd(&s, &["prune", "--all", "--config", cfg.to_str().unwrap(), "--dry-run"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("alice/p: would delete 0 of 1 versions (--keep-last 1)"), "{}", text(&out));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn low_free_space_applies_the_policy_without_waiting_for_the_schedule() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    versions(&alice, "p", 30, 3).await;
    assert!(admin::free_space_percent(&s.storage).is_some_and(|f| f < 100.0));
    let mut schedule = PruneSchedule::new(KeepPolicy { last: 1, ..KeepPolicy::default() });
    // No periodic run at all: only the threshold (every filesystem has less than 100 % free) can trigger.
    schedule.low_space_percent = Some(100.0);
    schedule.check_every = Duration::from_millis(200);
    let task = admin::spawn_prune_schedule(s.storage.clone(), schedule.clone());
    wait_for_versions(&alice, "p", &[3]).await;
    task.abort();
    // A threshold below the free space never triggers.
    versions(&alice, "r", 40, 2).await;
    schedule.low_space_percent = Some(0.0);
    let task = admin::spawn_prune_schedule(s.storage.clone(), schedule);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(numbers(&alice, "r").await, vec![1, 2]);
    task.abort();
    s.stop().await;
}
