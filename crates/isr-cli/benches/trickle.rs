//! Trickle reintegration: a session writes new random data through the running parcel (`isr disk` + qemu-io,
//! flushed), then the user leaves: stop (the suspend of a disk export) and `checkin`. Measured in the same run:
//!
//! - **trickle**: the background upload on (the default); the session waits until `isr stat` reports nothing
//!   pending, then stops and checks in. Timed: stop returning to checkin done, and the bytes checkin sends.
//! - **today's path** (`--upload-rate 0`): nothing sent while running; the same stop and checkin.
//!
//! Goal (issue "Trickle reintegration"): with trickle, stop-to-checkin-done ≤ 3 s on loopback and checkin sends
//! ≤ 5% of the changed bytes. `ISR_BENCH_TRICKLE_MIB` sets the data written (default 400).

#[path = "common/mod.rs"]
mod common;
use common::*;
use std::path::Path;
use std::time::{Duration, Instant};

const IMAGE_MIB: u64 = 1024;

struct Outcome {
    write: Duration,
    drain: Duration,
    stop: Duration,
    checkin: Duration,
    sent: u64,
}

fn sent_bytes(out: &str) -> u64 {
    let mib = out.split('(').nth(1).and_then(|s| s.split(" MiB").next()).unwrap_or("0");
    (mib.parse::<f64>().unwrap_or(0.0) * MIB as f64) as u64
}

fn pending(c: &Client, parcel: &str) -> u64 {
    let out = c.ok(&["stat", parcel, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["pending_upload_bytes"].as_u64().unwrap()
}

/// `mib` MiB of random data never seen before, as 8 MiB files (qemu-io's `write -s` fills each write from
/// the start of its file).
fn data_files(dir: &Path, seed: &str, mib: u64) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut xof = blake3::Hasher::new().update(seed.as_bytes()).finalize_xof();
    let mut buf = vec![0u8; (8 * MIB) as usize];
    for k in 0..mib.div_ceil(8) {
        xof.fill(&mut buf);
        let path = dir.join(format!("{seed}-{k}.bin"));
        std::fs::write(&path, &buf).unwrap();
        out.push(path);
    }
    out
}

fn session(c: &Client, parcel: &str, data: &[std::path::PathBuf], trickle: bool, sock: &Path) -> Outcome {
    c.ok(&["checkout", parcel]);
    let _ = std::fs::remove_file(sock);
    let mut args = vec!["disk", parcel, "--nbd", sock.to_str().unwrap()];
    if !trickle {
        args.extend(["--upload-rate", "0"]);
    }
    let child =
        c.cmd(&args).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
    wait_for(|| sock.exists(), Duration::from_secs(60), "the isr disk socket");
    let t = Instant::now();
    // 8 MiB writes from the random file, a flush every 64 MiB (as a guest's writeback would).
    let mut cmds = Vec::new();
    for (k, file) in data.iter().enumerate() {
        cmds.push(format!("write -s {} {} 8M", file.display(), (64 + 8 * k as u64) * MIB));
        if (k + 1) % 8 == 0 {
            cmds.push("flush".into());
        }
    }
    cmds.push("flush".into());
    let mut q = std::process::Command::new("qemu-io");
    q.args(["-f", "raw"]);
    for cmd in &cmds {
        q.arg("-c").arg(cmd);
    }
    q.arg(format!("nbd+unix:///?socket={}", sock.display()));
    run(&mut q, "qemu-io writes");
    let write = t.elapsed();
    let t = Instant::now();
    if trickle {
        wait_for(|| pending(c, parcel) == 0, Duration::from_secs(1800), "nothing pending");
    }
    let drain = t.elapsed();
    let t = Instant::now();
    stop(child);
    let stop_time = t.elapsed();
    let t = Instant::now();
    let out = c.ok(&["checkin", parcel]);
    let checkin = t.elapsed();
    Outcome { write, drain, stop: stop_time, checkin, sent: sent_bytes(&out) }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("trickle: benchmark");
        return;
    }
    require_tool("qemu-io", "install qemu-utils (make deps)");
    let mib: u64 = std::env::var("ISR_BENCH_TRICKLE_MIB").ok().and_then(|s| s.parse().ok()).unwrap_or(400);
    println!("{}", load_note());
    let dir = scratch();
    let server = Server::start(&dir.path().join("server"));
    let c = Client::new(&server, &dir.path().join("home"));
    let img = dir.path().join("disk.raw");
    make_mixed_image(&img, IMAGE_MIB * MIB, "trickle bench");
    c.ok(&["create", "t", "--disk", img.to_str().unwrap()]);
    let sock = dir.path().join("nbd.sock");
    let mut rows = Vec::new();
    // Each session writes data never seen before (random, another seed each time): nothing dedups.
    for (k, trickle) in [(0, false), (1, true), (2, false), (3, true)] {
        let data = data_files(dir.path(), &format!("session{k}"), mib);
        let o = session(&c, "t", &data, trickle, &sock);
        for f in data {
            let _ = std::fs::remove_file(f);
        }
        rows.push(vec![
            if trickle { "trickle (default)" } else { "today's path (--upload-rate 0)" }.to_string(),
            format!("{}", mib.div_ceil(8) * 8),
            format!("{:.1}", o.write.as_secs_f64()),
            if trickle { format!("{:.1}", o.drain.as_secs_f64()) } else { "-".into() },
            format!("{:.2}", o.stop.as_secs_f64()),
            format!("{:.2}", o.checkin.as_secs_f64()),
            format!("{:.2}", (o.stop + o.checkin).as_secs_f64()),
            format!("{:.1}", o.sent as f64 / MIB as f64),
            format!("{:.1}%", 100.0 * o.sent as f64 / (mib * MIB) as f64),
        ]);
    }
    print_table(
        &format!("Trickle: {mib} MiB of new random data written through `isr disk`, then stop and checkin (loopback)"),
        &[
            "path",
            "MiB written",
            "write s",
            "wait until nothing pending s",
            "stop s",
            "checkin s",
            "stop+checkin s",
            "checkin sent MiB",
            "sent / changed",
        ],
        &rows,
    );
}
