//! Trickle reintegration end to end: while `isr disk` runs, flushed changes go to the server in the
//! background (held under the lock, so the server's gc spares them), the check-in after the stop sends
//! little, `isr sync` of the running parcel commits the disk as of that moment, and a kill -9 in the middle
//! of the background upload loses nothing and sends again only what had not arrived.

mod common;
use common::*;
use std::path::Path;
use std::process::Child;
use std::time::Duration;

const IMAGE: u64 = 96 << 20;
const CHANGED: u64 = 32 << 20;

/// `len` bytes of random data (distinct per `seed`) in a file, for `qemu-io write -s`.
fn random_file(dir: &Path, seed: &str, len: u64) -> (std::path::PathBuf, Vec<u8>) {
    let mut data = vec![0u8; len as usize];
    blake3::Hasher::new().update(seed.as_bytes()).finalize_xof().fill(&mut data);
    let path = dir.join(format!("{seed}.bin"));
    std::fs::write(&path, &data).unwrap();
    (path, data)
}

/// Write `file` at `offset` through the NBD export and flush.
fn write_flushed(sock: &Path, file: &Path, offset: u64, len: u64) {
    let (ok, out) = qemu_io(sock, &[&format!("write -s {} {offset} {len}", file.display()), "flush"]);
    assert!(ok, "qemu-io write: {out}");
}

fn pending(c: &Client, parcel: &str) -> u64 {
    c.stat(parcel)["pending_upload_bytes"].as_u64().expect("pending_upload_bytes")
}

/// "sent N chunks (X MiB)" of a sync or check-in, in bytes.
fn sent_bytes(output: &str) -> u64 {
    let mib = output.split('(').nth(1).and_then(|s| s.split(" MiB").next()).expect("sent (X MiB)");
    (mib.parse::<f64>().unwrap() * 1048576.0) as u64
}

/// The whole disk of `parcel`'s head, exported by a fresh client.
fn export_head(server: &Server, parcel: &str, dir: &Path) -> Vec<u8> {
    let b = Client::new(server, "alice");
    let out = dir.join(format!("export-{}.raw", rand_suffix()));
    b.ok(&["export", parcel, "--output", out.to_str().unwrap()]);
    std::fs::read(out).unwrap()
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
}

fn kill_9(mut child: Child) {
    child.kill().unwrap(); // SIGKILL to the isr process itself
    child.wait().unwrap();
}

/// A server, a client that has checked out parcel `p` (a [`make_image`] of [`IMAGE`] bytes), the image's
/// bytes (what the head must hold), and where its NBD socket goes.
struct Setup {
    server: Server,
    a: Client,
    dir: tempfile::TempDir,
    expected: Vec<u8>,
    sock: std::path::PathBuf,
}

fn setup() -> Setup {
    let server = Server::start();
    let a = Client::new(&server, "alice");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    make_image(&img, IMAGE);
    let expected = std::fs::read(&img).unwrap();
    a.ok(&["create", "p", "--disk", img.to_str().unwrap()]);
    a.ok(&["checkout", "p"]);
    let sock = dir.path().join("nbd.sock");
    Setup { server, a, dir, expected, sock }
}

/// `isr disk p` whose background upload goes at 4 MiB/s (so that a kill or a restart lands in the middle).
fn slow_disk(a: &Client, sock: &Path) -> Child {
    let _ = std::fs::remove_file(sock);
    let child = a
        .cmd(&["disk", "p", "--nbd", sock.to_str().unwrap(), "--upload-rate", "4M"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(|| sock.exists(), Duration::from_secs(30), "the NBD socket");
    child
}

#[test]
fn flushed_changes_go_up_while_running_and_checkin_sends_little() {
    let Setup { server, a, dir, mut expected, sock } = setup();
    let child = a.disk("p", &sock);
    let (file, data) = random_file(dir.path(), "changed", CHANGED);
    write_flushed(&sock, &file, 8 << 20, CHANGED);
    expected[8 << 20..(8 << 20) + CHANGED as usize].copy_from_slice(&data);
    // Written but not flushed (by a client that sends no flush, not even when it disconnects): not durable,
    // so not sent, and still counted as unsent.
    let (_, tail_data) = random_file(dir.path(), "unflushed", 1 << 20);
    let mut nbd = Nbd::connect(&sock, IMAGE).unwrap();
    nbd.write(80 << 20, &tail_data).unwrap();
    drop(nbd);
    expected[80 << 20..81 << 20].copy_from_slice(&tail_data);
    wait_for(|| pending(&a, "p") <= 1 << 20, Duration::from_secs(180), "the flushed changes to be sent");
    assert_eq!(pending(&a, "p"), 1 << 20, "the unflushed MiB waits for a flush");
    let (ok, out) = qemu_io(&sock, &["flush"]);
    assert!(ok, "{out}");
    wait_for(|| pending(&a, "p") == 0, Duration::from_secs(60), "nothing left to send");
    // `ls -l` (no key needed) shows what the running process records every second.
    let ls_line = || {
        let ls = a.ok(&["ls", "-l"]);
        ls.lines().find(|l| l.starts_with("p ")).expect("p listed").to_owned()
    };
    assert!(ls_line().contains("running"), "ls -l: {}", ls_line());
    wait_for(|| ls_line().contains(" 0.0 MiB"), Duration::from_secs(30), "ls -l to show nothing unsent");
    // The server's gc (no grace at all) keeps what the lock holder sent but no version references yet.
    let gc = server.admin(&["gc", "--grace", "0"]);
    assert!(gc.status.success(), "gc: {}", String::from_utf8_lossy(&gc.stderr));
    let stopped = stop_disk(child);
    assert!(stopped.contains("every change of p is on the server"), "{stopped}");
    let out = a.ok(&["checkin", "p"]);
    let sent = sent_bytes(&out);
    assert!(sent * 20 <= CHANGED, "the check-in sent {sent} bytes of {CHANGED} changed: {out}");
    assert!(export_head(&server, "p", dir.path()) == expected, "the head holds every write");
}

#[test]
fn sync_of_a_running_parcel_commits_the_disk_at_that_moment() {
    let Setup { server, a, dir, mut expected, sock } = setup();
    let child = a.disk("p", &sock);
    let (noon, noon_data) = random_file(dir.path(), "noon", 4 << 20);
    write_flushed(&sock, &noon, 0, 4 << 20);
    expected[..4 << 20].copy_from_slice(&noon_data);
    let out = a.ok(&["sync", "p", "-m", "noon"]);
    assert!(out.contains("synced p as version 2"), "{out}");
    // Synced while running, yes; checked in (leaving this client) while running, no.
    let (code, err) = a.code(&["checkin", "p"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("is running"), "{err}");
    // After the sync: not in version 2, flushed or not.
    let (later, _) = random_file(dir.path(), "later", 4 << 20);
    write_flushed(&sock, &later, 0, 4 << 20);
    let out = a.ok(&["sync", "p", "-m", "again"]);
    assert!(out.contains("synced p as version 3"), "{out}");
    let (last, _) = random_file(dir.path(), "last", 2 << 20);
    write_flushed(&sock, &last, 0, 2 << 20);
    // The laptop dies: everything of isr is gone at once.
    kill_9(child);
    let versions = a.ok(&["versions", "p"]);
    assert!(versions.contains("noon") && versions.contains("again"), "{versions}");
    // Another client, after the administrator released the dead laptop's lock: version 3's disk.
    let b = Client::new(&server, "alice");
    b.ok(&["unlock", "p", "--force"]);
    b.ok(&["checkout", "p"]);
    let out = dir.path().join("b.raw");
    b.ok(&["export", "p", "--output", out.to_str().unwrap()]);
    let got = std::fs::read(&out).unwrap();
    let (_, later_data) = random_file(dir.path(), "later", 4 << 20);
    expected[..4 << 20].copy_from_slice(&later_data);
    assert!(got == expected, "version 3 is the disk as of its sync");
    let v2 = dir.path().join("v2.raw");
    b.ok(&["export", "p", "--version", "2", "--output", v2.to_str().unwrap()]);
    assert!(std::fs::read(&v2).unwrap()[..4 << 20] == noon_data[..], "version 2 is the disk as of its sync");
}

#[test]
fn kill_9_during_the_background_upload_loses_nothing_and_resends_little() {
    let Setup { server, a, dir, mut expected, sock } = setup();
    // Slowly (4 MiB/s), so that the kill lands in the middle of it.
    let slow = slow_disk(&a, &sock);
    let (file, data) = random_file(dir.path(), "changed", CHANGED);
    let before = server.chunk_requests_answered(&["200", "201"]);
    write_flushed(&sock, &file, 8 << 20, CHANGED);
    expected[8 << 20..(8 << 20) + CHANGED as usize].copy_from_slice(&data);
    wait_for(
        || server.chunk_requests_answered(&["200", "201"]) > before + 16,
        Duration::from_secs(60),
        "the upload to start",
    );
    kill_9(slow);
    let sent_before_kill = server.chunk_requests_answered(&["200", "201"]) - before;
    assert!(sent_before_kill < CHANGED / (128 << 10), "the kill came after the upload ended");
    let (code, out) = a.code(&["check", "p", "--full"]);
    assert_eq!(code, 0, "isr check --full after kill -9: {out}");
    // Started again: the rest goes up; what had arrived is not sent again.
    let child = a.disk("p", &sock);
    wait_for(|| pending(&a, "p") == 0, Duration::from_secs(180), "nothing left to send");
    stop_disk(child);
    let out = a.ok(&["checkin", "p"]);
    let puts = server.chunk_requests_answered(&["200", "201"]) - before;
    let chunks = CHANGED / (128 << 10);
    // At most the uploads in flight at the kill are sent twice.
    assert!(puts <= chunks + 8, "{puts} chunk PUTs for {chunks} changed chunks: {out}");
    assert!(export_head(&server, "p", dir.path()) == expected, "the head holds every write");
}

#[test]
fn a_server_restart_during_the_background_upload_loses_nothing() {
    let Setup { server, a, dir, mut expected, sock } = setup();
    let child = slow_disk(&a, &sock);
    let (file, data) = random_file(dir.path(), "changed", 16 << 20);
    let before = server.chunk_requests_answered(&["200", "201"]);
    write_flushed(&sock, &file, 8 << 20, 16 << 20);
    expected[8 << 20..24 << 20].copy_from_slice(&data);
    wait_for(
        || server.chunk_requests_answered(&["200", "201"]) > before + 4,
        Duration::from_secs(60),
        "the upload to start",
    );
    // The server goes away mid-upload and comes back on the same address.
    let mut server = server;
    server.kill();
    std::thread::sleep(Duration::from_millis(1500));
    let server = server.restart_in_place();
    wait_for(|| pending(&a, "p") == 0, Duration::from_secs(180), "nothing left to send after the restart");
    let stopped = stop_disk(child);
    assert!(stopped.contains("every change of p is on the server"), "{stopped}");
    let out = a.ok(&["checkin", "p"]);
    assert!(sent_bytes(&out) * 20 <= 16 << 20, "the check-in sent most of it again: {out}");
    assert!(export_head(&server, "p", dir.path()) == expected, "the head holds every write");
}
