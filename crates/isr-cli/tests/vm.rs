//! The whole ISR story under TCG: resume a real guest, suspend, check in, resume on another client.

mod common;
use common::guest::*;
use common::*;
use std::process::Stdio;
use std::time::Duration;

fn sent_bytes_mib(out: &str) -> f64 {
    let inside = out.split('(').nth(1).unwrap_or_else(|| panic!("no byte count in {out:?}"));
    inside.split_whitespace().next().unwrap().parse().unwrap()
}

/// "N of M memory chunks changed" from a resume's summary.
fn memory_chunks_changed(out: &str) -> (u64, u64) {
    let before = out.split(" memory chunks changed").next().unwrap_or_else(|| panic!("no summary in {out}"));
    let words: Vec<&str> = before.split_whitespace().collect();
    let n = words.len();
    assert!(n >= 3 && words[n - 2] == "of", "odd summary: {out}");
    (words[n - 3].parse().unwrap(), words[n - 1].parse().unwrap())
}

#[test]
fn suspend_on_one_client_resume_on_another_continues_the_counter() {
    let out = guest();
    let server = Server::start();
    let a = Client::new(&server, "alice");
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::copy(out.join("disk.img"), &disk).unwrap();
    a.ok(&[
        "create",
        "vm",
        "--disk",
        disk.to_str().unwrap(),
        "--memory",
        "256",
        "--kernel",
        out.join("vmlinuz").to_str().unwrap(),
        "--initrd",
        out.join("initrd.img").to_str().unwrap(),
        "--append",
        "console=ttyS0 quiet panic=-1 init_on_free=1",
    ]);

    // Client A boots it and lets it count.
    let run = resume(&a, "vm");
    let console_a = console_of(&a, "vm");
    wait_for(|| counters(&console_a).len() >= 3, Duration::from_secs(120), "the guest's counter on client A");
    assert_eq!(a.stat("vm")["state"], "running");
    // A sync while it runs: a crash-consistent version of the disk (no memory image), the VM going on.
    let synced = a.ok(&["sync", "vm", "-m", "while running"]);
    assert!(synced.contains("synced vm as version 2"), "{synced}");
    let v2 = dir.path().join("v2.img");
    a.ok(&["export", "vm", "--version", "2", "--output", v2.to_str().unwrap()]);
    let fsck = std::process::Command::new("e2fsck").args(["-fy"]).arg(&v2).output().unwrap();
    assert!(
        fsck.status.code().unwrap_or(8) < 4,
        "e2fsck of version 2: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    let counted = counters(&console_a).len();
    wait_for(|| counters(&console_a).len() > counted, Duration::from_secs(120), "the counter after the sync");
    a.ok(&["suspend", "vm"]);
    let text = finish(run);
    assert!(text.contains("suspended"), "{text}");
    // Its RAM was a file served on demand (FUSE) from the memory runtime image.
    assert!(text.contains("guest RAM of vm: on demand (FUSE"), "{text}");
    let before = counters(&console_a);
    let last = *before.last().unwrap();
    assert_eq!(before, (before[0]..=last).collect::<Vec<_>>(), "counter skipped on A");
    assert_eq!(a.stat("vm")["state"], "modified");
    assert_eq!(a.stat("vm")["memory_image"], true);
    let first_checkin = a.ok(&["checkin", "vm", "-m", "suspended on A"]);

    // Client B resumes where A stopped: the counter goes on from memory, no reboot.
    let b = Client::new(&server, "alice");
    let run = resume(&b, "vm");
    let console_b = console_of(&b, "vm");
    wait_for(|| counters(&console_b).len() >= 3, Duration::from_secs(120), "the guest's counter on client B");
    let after = counters(&console_b);
    assert_eq!(after[0], last + 1, "first counter on B must follow A's last ({last}): {after:?}");
    let log_b = std::fs::read_to_string(&console_b).unwrap();
    assert!(!log_b.contains("isr-boot"), "the guest rebooted on B:\n{log_b}");

    // Memory dedup: after a few idle seconds the second suspend sends far less than the memory size.
    std::thread::sleep(Duration::from_secs(3));
    b.ok(&["suspend", "vm"]);
    let text = finish(run);
    // ... and encodes only what changed since the memory image it resumed from (its runtime image has the rest).
    // B fetched in the background, in the order A's run first touched them, the chunks B did not have.
    assert!(text.contains("in the order its last run touched them"), "{text}");
    let (changed, total) = memory_chunks_changed(&text);
    println!("second suspend: {changed} of {total} memory chunks changed");
    assert!(total >= 2048 && changed < total / 2, "{changed} of {total} memory chunks encoded: {text}");

    // Disconnected: with every chunk hoarded, resume works with no server at all.
    b.ok(&["hoard", "vm"]);
    let before_disconnected = *counters(&console_b).last().unwrap();
    let printed_before = counters(&console_b).len();
    let mut offline = Client {
        home: b.home,
        server: "http://127.0.0.1:9".into(),
        user: b.user.clone(),
        password: b.password.clone(),
        env: Vec::new(),
    };
    let run = offline
        // RAM loaded before start (the fallback where FUSE is missing): the same memory image.
        .cmd(&["resume", "vm", "--display", "none", "--disconnected", "--ram", "loaded"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(
        || counters(&console_b).len() >= printed_before + 4,
        Duration::from_secs(120),
        "the counter while disconnected",
    );
    offline.ok(&["suspend", "vm"]);
    let text = finish(run);
    assert!(text.contains("guest RAM of vm: loaded before start (--ram loaded)"), "{text}");
    let all = counters(&console_b);
    let resumed_at = all.iter().position(|&c| c == before_disconnected).unwrap() + 1;
    assert_eq!(all[resumed_at], before_disconnected + 1, "disconnected resume did not continue: {all:?}");
    offline.server = server.url.clone();
    let b = offline;

    let final_counters = counters(&console_b);
    let second_checkin = b.ok(&["checkin", "vm", "-m", "suspended on B"]);
    let (first_mib, second_mib) = (sent_bytes_mib(&first_checkin), sent_bytes_mib(&second_checkin));
    println!("memory 256 MiB; first checkin sent {first_mib} MiB, second {second_mib} MiB");
    assert!(second_mib < 64.0, "second checkin sent {second_mib} MiB of a 256 MiB guest");
    assert!(second_mib < first_mib, "{first_mib} vs {second_mib}");

    // The disk holds one contiguous run of counters, up to at least what B printed.
    let exported = dir.path().join("final.img");
    b.ok(&["export", "vm", "--output", exported.to_str().unwrap()]);
    let fsck = std::process::Command::new("e2fsck").args(["-fy"]).arg(&exported).output().unwrap();
    assert!(fsck.status.code().unwrap_or(8) < 4, "e2fsck: {}", String::from_utf8_lossy(&fsck.stdout));
    let cat =
        std::process::Command::new("debugfs").args(["-R", "cat /counter"]).arg(&exported).output().unwrap();
    let on_disk: Vec<u64> =
        String::from_utf8_lossy(&cat.stdout).lines().filter_map(|l| l.trim().parse().ok()).collect();
    assert!(!on_disk.is_empty(), "no counter file on the disk");
    assert_eq!(
        on_disk,
        (1..=on_disk.len() as u64).collect::<Vec<_>>(),
        "counter file is not one contiguous run"
    );
    assert!(
        *on_disk.last().unwrap() >= *final_counters.last().unwrap() - 1,
        "{on_disk:?} vs {final_counters:?}"
    );
}
