//! The web console in a real browser: headless Chromium (Debian's) driven by playwright-core
//! (`crates/isr-ui/web/test/drive.mjs`) resumes the test guest from the page, sees its screen, types a command
//! into it, suspends and checks in; then a second client home resumes it from its own console and sees the
//! same screen. Screenshots stay in the run's temp directory (printed).

mod common;
use common::*;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

fn guest() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest");
    let st = Command::new("bash").arg(root.join("build.sh")).stdout(Stdio::null()).status().unwrap();
    assert!(st.success(), "guest/build.sh failed");
    root.join("out")
}

/// `isr ui` for client `c`; returns the process and the URL it printed.
fn console(c: &Client) -> (Child, String) {
    let mut child = c
        .cmd(&["ui", "--no-open", "--accel", "tcg"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let url = line
        .trim()
        .strip_prefix("isr ui: open ")
        .unwrap_or_else(|| panic!("odd first line {line:?}"))
        .to_owned();
    (child, url)
}

fn drive(url: &str, out: &Path, step: &str, parcel: &str) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../isr-ui/web/test/drive.mjs");
    let output = Command::new("node")
        .arg(&script)
        .args([url, out.to_str().unwrap(), step, parcel])
        .stderr(Stdio::inherit())
        .output()
        .expect("node (make deps installs it)");
    let text = String::from_utf8_lossy(&output.stdout);
    let v: serde_json::Value =
        serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("drive.mjs printed {text:?}: {e}"));
    assert_eq!(v["ok"], true, "browser step {step} failed: {}\nscreenshots in {}", v["error"], out.display());
    v
}

fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.is_dir() {
            if let Some(f) = find_file(&p, name) {
                return Some(f);
            }
        } else if p.file_name().is_some_and(|n| n == name) {
            return Some(p);
        }
    }
    None
}

/// The share of 9x16 text cells that are lit in both screens or dark in both.
fn same_cells(a: &str, b: &str) -> f64 {
    assert_eq!(a.len(), b.len(), "screens of different sizes");
    a.bytes().zip(b.bytes()).filter(|(x, y)| x == y).count() as f64 / a.len().max(1) as f64
}

#[test]
fn the_web_console_resumes_shows_types_suspends_and_checks_in_and_another_client_sees_the_same_screen() {
    let out = guest();
    let server = Server::start();
    let a = Client::new(&server, "alice");
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::copy(out.join("disk.img"), &disk).unwrap();
    a.ok(&[
        "create",
        "desk",
        "--disk",
        disk.to_str().unwrap(),
        "--memory",
        "128",
        "--kernel",
        out.join("vmlinuz").to_str().unwrap(),
        "--initrd",
        out.join("initrd.img").to_str().unwrap(),
        "--append",
        "console=tty0 console=ttyS0 quiet panic=-1 init_on_free=1",
    ]);
    let shots = std::env::temp_dir().join(format!("isr-ui-test-{}", std::process::id()));
    std::fs::create_dir_all(&shots).unwrap();
    eprintln!("screenshots: {}", shots.display());

    let (mut ui, url) = console(&a);
    let typed = drive(&url, &shots, "resume-and-type", "desk");
    signal(&ui, 15);
    assert!(ui.wait().unwrap().success());
    assert!(
        typed["screen_first"]["lit"].as_u64().unwrap() > 500,
        "the screen is not blank: {}",
        typed["screen_first"]
    );
    let before = typed["before_typing"]["cells"].as_str().unwrap();
    let after = typed["after_typing"]["cells"].as_str().unwrap();
    assert_ne!(before, after, "typing changed what the screen shows");
    // The command typed into the page ran in the guest: its output reached the serial console's log.
    let log = find_file(a.home.path(), "console.log").expect("console.log");
    let text = String::from_utf8_lossy(&std::fs::read(&log).unwrap()).into_owned();
    assert!(text.contains("typed-in-the-browser 42"), "{}", &text[text.len().saturating_sub(2000)..]);
    assert!(
        typed["resume_job"]["message"].as_str().unwrap().contains("suspended"),
        "{}",
        typed["resume_job"]
    );
    assert_eq!(typed["checkin_job"]["state"], "done", "{}", typed["checkin_job"]);
    let versions: Vec<String> =
        typed["versions"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()).collect();
    assert!(
        versions.first().is_some_and(|v| v.starts_with('2') && v.contains("typed in the browser")),
        "{versions:?}"
    );

    // Another client home resumes it from its own console: the same screen, where it was left.
    let b = Client::new(&server, "alice");
    let (mut ui, url) = console(&b);
    let looked = drive(&url, &shots, "resume-and-look", "desk");
    signal(&ui, 15);
    assert!(ui.wait().unwrap().success());
    let seen = looked["screen"]["cells"].as_str().unwrap();
    let share = same_cells(after, seen);
    assert!(share > 0.97, "B's screen differs from A's at suspend ({:.3} of the text cells agree)", share);
    assert_eq!(looked["checkin_job"]["state"], "done", "{}", looked["checkin_job"]);
}
