//! The resumed environment a person uses: an interactive serial console (`isr console`) and a guest clock
//! that is right after a resume, set through the guest agent (the test guest runs a stand-in for it).

mod common;
use common::guest::*;
use common::*;
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

const MINUTES: Duration = Duration::from_secs(300);

/// Ask the guest agent on `sock` one command (after a guest-sync) and return its answer.
fn agent(sock: &Path, command: Value) -> Value {
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    writeln!(s, "{}", serde_json::json!({"execute": "guest-sync", "arguments": {"id": 4711}})).unwrap();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line.contains("4711") {
            break;
        }
    }
    writeln!(s, "{command}").unwrap();
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("agent answered {line:?}: {e}"))
}

fn host_secs() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64()
}

fn guest_secs(sock: &Path) -> f64 {
    agent(sock, serde_json::json!({"execute": "guest-get-time"}))["return"].as_u64().unwrap() as f64 / 1e9
}

/// The agent socket of the one running VM in `runtime` (its private directory).
fn agent_socket(runtime: &Path) -> PathBuf {
    let dirs = private_dirs(runtime);
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    dirs[0].join("qga.sock")
}

/// Collects a child's stderr lines in the background; `wait_line` waits until one contains a text.
struct Lines(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl Lines {
    fn of(r: impl Read + Send + 'static) -> Lines {
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let l2 = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(r).lines().map_while(Result::ok) {
                l2.lock().unwrap().push(line);
            }
        });
        Lines(lines)
    }

    fn count(&self, text: &str) -> usize {
        self.0.lock().unwrap().iter().filter(|l| l.contains(text)).count()
    }

    fn wait_count(&self, text: &str, n: usize) {
        wait_for(|| self.count(text) >= n, MINUTES, text);
    }
}

#[test]
fn the_serial_console_is_interactive_and_the_guest_clock_is_right_after_a_resume() {
    let server = Server::start();
    let a = Client::new(&server, "alice");
    let dir = tempfile::tempdir().unwrap();
    let runtime = tempfile::tempdir().unwrap();
    create_guest_parcel(&a, "p", 128, dir.path());
    let console_log = console_of(&a, "p");
    let resume = |c: &Client| {
        c.cmd(&["resume", "p", "--display", "none"])
            .env("ISR_RUNTIME_DIR", runtime.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };

    let mut vm = resume(&a);
    let lines = Lines::of(vm.stderr.take().unwrap());
    wait_for(|| !counters(&console_log).is_empty(), MINUTES, "the guest's counter");
    // A command typed into `isr console` runs in the guest; its answer is on the console (and in the log).
    let mut console = a.cmd(&["console", "p"]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let mut out = console.stdout.take().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let s2 = seen.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            s2.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    let mut keys = console.stdin.take().unwrap();
    let answered = || String::from_utf8_lossy(&seen.lock().unwrap()).contains("console-says 42");
    // The guest's shell may not be reading yet: the line is sent again until the answer comes.
    let end = std::time::Instant::now() + MINUTES;
    while !answered() {
        assert!(std::time::Instant::now() < end, "no answer on the console");
        writeln!(keys, "echo console-says $((6*7))").unwrap();
        std::thread::sleep(Duration::from_secs(2));
    }
    drop(keys);
    assert!(console.wait().unwrap().success());
    assert!(std::fs::read_to_string(&console_log).unwrap().contains("console-says 42"));

    // The agent set the clock after the boot. Put the guest's clock 3 hours back (as if it had been
    // suspended that long ago), suspend, resume: the clock is the host's again.
    lines.wait_count("guest clock set", 1);
    let sock = agent_socket(runtime.path());
    agent(
        &sock,
        serde_json::json!({"execute": "guest-set-time", "arguments": {"time": ((host_secs() - 3.0 * 3600.0) * 1e9) as u64}}),
    );
    let behind = host_secs() - guest_secs(&sock);
    assert!(behind > 3.0 * 3600.0 - 120.0, "the guest clock was put back ({behind} s)");
    a.ok(&["suspend", "p"]);
    finish(vm);

    let mut vm = resume(&a);
    let lines = Lines::of(vm.stderr.take().unwrap());
    lines.wait_count("guest clock set", 1);
    let sock = agent_socket(runtime.path());
    let off = (host_secs() - guest_secs(&sock)).abs();
    assert!(off < 120.0, "after the resume the guest clock is {off} s off the host's");
    a.ok(&["suspend", "p"]);
    // Before the memory was saved, the guest dropped its page cache (through the agent).
    lines.wait_count("dropped its page cache", 1);
    finish(vm);
}
