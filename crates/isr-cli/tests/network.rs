//! The VM's network (issue 16) under TCG: the guest reaches a server on the host through user-mode NAT, and
//! IT's policy `none` (`isr-server parcel policy`) takes the network away at the next resume whatever the user
//! asks for, from a memory image saved with the link up and on a cold boot, until IT allows NAT again.
//!
//! The test guest's `isr_fetch=URL` kernel parameter makes it fetch URL every 2 s and print
//! `isr-fetch carrier=C ok BODY` or `isr-fetch carrier=C failed` (C: eth0's carrier) on its console.

mod common;
use common::guest::*;
use common::*;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Generous: a TCG boot takes 5-30 s on an idle machine, much more on a loaded one.
const BOOT: Duration = Duration::from_secs(300);

/// A tiny HTTP server on 127.0.0.1 answering every request with a body only this test knows.
struct HostServer {
    port: u16,
    body: String,
    hits: Arc<AtomicUsize>,
}

impl HostServer {
    fn start() -> HostServer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let body = format!("isr-host-secret-{}-{nanos}", std::process::id());
        let hits = Arc::new(AtomicUsize::new(0));
        let (answer, counter) = (body.clone(), hits.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { continue };
                let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                // Read the request head (until the blank line), then answer and close.
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                counter.fetch_add(1, Ordering::SeqCst);
                let _ = write!(
                    s,
                    "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                    answer.len()
                );
            }
        });
        HostServer { port, body, hits }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// A running `isr resume`, its stderr collected as it comes.
struct Resume {
    child: Child,
    stderr: Arc<Mutex<String>>,
}

impl Resume {
    fn start(c: &Client, parcel: &str, extra: &[&str]) -> Resume {
        let mut args = vec!["resume", parcel, "--display", "none"];
        args.extend_from_slice(extra);
        let Collecting { child, stderr } = Collecting::spawn(&mut c.cmd(&args));
        Resume { child, stderr }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    fn finish(self) -> String {
        let stderr = self.stderr.clone();
        let out = self.child.wait_with_output().unwrap();
        let stderr = stderr.lock().unwrap().clone();
        assert!(out.status.success(), "resume failed ({:?}): {stderr}", out.status);
        stderr
    }
}

/// The console from byte `from` on.
fn console_after(console: &Path, from: usize) -> String {
    let bytes = std::fs::read(console).unwrap_or_default();
    String::from_utf8_lossy(bytes.get(from..).unwrap_or_default()).into_owned()
}

fn file_len(p: &Path) -> usize {
    std::fs::metadata(p).map(|m| m.len() as usize).unwrap_or(0)
}

/// The guest's `isr-fetch ...` lines (without the marker).
fn fetches(text: &str) -> Vec<String> {
    text.lines().filter_map(|l| l.split("isr-fetch ").nth(1)).map(|l| l.trim().to_owned()).collect()
}

/// Wait until the guest, from console byte `from` on, printed `n` fetch lines starting with `prefix`.
fn wait_fetches(console: &Path, from: usize, prefix: &str, n: usize, what: &str) {
    let end = std::time::Instant::now() + BOOT;
    while fetches(&console_after(console, from)).iter().filter(|l| l.starts_with(prefix)).count() < n {
        if std::time::Instant::now() > end {
            let text = console_after(console, from);
            let tail: Vec<&str> = text.lines().filter(|l| !l.contains("isr-counter")).collect();
            panic!("timed out waiting for {what}; the console since then, without counters: {tail:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Once IT's policy `none` applies (from the first `carrier=0` line on), nothing reaches the host: every
/// fetch fails with the link down, and the host server counts no request from then to the end.
fn assert_cut_off(console: &Path, from: usize, host: &HostServer, what: &str) {
    wait_fetches(console, from, "carrier=0 failed", 1, &format!("{what}: a fetch with the link down"));
    let hits_cut = host.hits();
    wait_fetches(console, from, "carrier=0 failed", 3, &format!("{what}: three fetches with the link down"));
    let lines = fetches(&console_after(console, from));
    let first_down = lines.iter().position(|l| l.starts_with("carrier=0")).unwrap();
    for l in &lines[first_down..] {
        assert_eq!(l, "carrier=0 failed", "{what}: the guest has network under policy none: {lines:?}");
    }
    assert_eq!(host.hits(), hits_cut, "{what}: the host server was reached under policy none");
}

#[test]
fn nat_reaches_the_host_and_it_policy_none_cuts_the_network_at_every_resume() {
    let server = Server::start();
    let a = Client::new(&server, "alice");
    let scratch = tempfile::tempdir().unwrap();
    let host = HostServer::start();
    let append = format!("{APPEND} isr_fetch=http://10.0.2.2:{}/", host.port);
    create_guest_parcel_appending(&a, "vm", 256, scratch.path(), &append);
    let console = console_of(&a, "vm");
    assert_eq!(a.stat("vm")["network_policy"], "unset");

    // 1. Default (NAT): the guest fetches the host server's body through 10.0.2.2.
    let run = Resume::start(&a, "vm", &[]);
    let ok = format!("carrier=1 ok {}", host.body);
    wait_fetches(&console, 0, &ok, 1, "the guest's fetch of the host server through NAT");
    assert!(console_after(&console, 0).contains("isr-net eth0"));
    assert!(host.hits() >= 1);
    assert!(!run.stderr().contains("IT's network policy"), "{}", run.stderr());
    a.ok(&["suspend", "vm"]);
    run.finish();
    assert_eq!(a.stat("vm")["memory_image"], true);

    // 2. IT sets policy none. The next resume, from the memory image saved with the link up and with the
    //    user asking for NAT, gives the guest a NIC without link and no way out.
    let set = server.admin(&["parcel", "policy", "alice/vm", "--network", "none"]);
    assert!(set.status.success(), "{}", String::from_utf8_lossy(&set.stderr));
    let stat = a.stat("vm");
    assert_eq!(stat["network_policy"], "none", "{stat}");
    assert!(a.ok(&["stat", "vm"]).contains("network: IT's policy none"));
    let from = file_len(&console);
    let run = Resume::start(&a, "vm", &["--network", "nat"]);
    assert_cut_off(&console, from, &host, "resumed from a memory image");
    assert!(
        run.stderr().contains("IT's network policy for vm is none") && run.stderr().contains("--network nat"),
        "the user is not told that IT's policy applies: {}",
        run.stderr()
    );
    assert!(!console_after(&console, from).contains("isr-boot"), "the guest resumed, it did not boot");
    a.ok(&["poweroff", "vm"]);
    run.finish();

    // 3. A cold boot under policy none (through $ISR_NETWORK this time): no working network either.
    let from = file_len(&console);
    let mut cmd = a.cmd(&["resume", "vm", "--display", "none"]);
    cmd.env("ISR_NETWORK", "nat").stdout(Stdio::null()).stderr(Stdio::piped());
    let child = cmd.spawn().unwrap();
    wait_for(|| console_after(&console, from).contains("isr-boot"), BOOT, "the cold boot under policy none");
    assert_cut_off(&console, from, &host, "cold boot");
    a.ok(&["suspend", "vm"]);
    let done = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&done.stderr);
    assert!(done.status.success(), "{stderr}");
    assert!(stderr.contains("IT's network policy for vm is none"), "{stderr}");

    // 4. IT allows NAT again: the image saved with the link down resumes with it up and the guest reaches
    //    the host again; the user's own --network none is still honoured below.
    let set = server.admin(&["parcel", "policy", "alice/vm", "--network", "nat"]);
    assert!(set.status.success(), "{}", String::from_utf8_lossy(&set.stderr));
    assert_eq!(a.stat("vm")["network_policy"], "nat");
    let from = file_len(&console);
    let run = Resume::start(&a, "vm", &[]);
    wait_fetches(&console, from, &ok, 1, "the guest's fetch after IT allowed NAT again");
    a.ok(&["suspend", "vm"]);
    run.finish();
    let from = file_len(&console);
    let run = Resume::start(&a, "vm", &["--network", "none"]);
    assert_cut_off(&console, from, &host, "the user's --network none");
    a.ok(&["poweroff", "vm"]);
    run.finish();
}
