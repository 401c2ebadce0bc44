//! `isr resume --transient`: a version runs without the lock and without a check-in, beside another client's
//! lock and this client's own modified checkout, and leaves nothing behind (real QEMU under TCG).

mod common;
use common::guest::*;
use common::*;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const MINUTES: Duration = Duration::from_secs(300);

/// Collects a child's stderr in the background.
struct Lines(Arc<Mutex<String>>);

impl Lines {
    fn of(r: impl Read + Send + 'static) -> Lines {
        let text = Arc::new(Mutex::new(String::new()));
        let t = text.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(r).lines().map_while(Result::ok) {
                let mut t = t.lock().unwrap();
                t.push_str(&line);
                t.push('\n');
            }
        });
        Lines(text)
    }

    fn text(&self) -> String {
        self.0.lock().unwrap().clone()
    }
}

/// A transient run of `parcel` on `c` with its private directory under `runtime`.
fn transient(c: &Client, parcel: &str, runtime: &Path, extra: &[&str]) -> (Child, Lines) {
    let mut args = vec!["resume", parcel, "--transient", "--display", "none"];
    args.extend_from_slice(extra);
    let mut child = c
        .cmd(&args)
        .env("ISR_RUNTIME_DIR", runtime)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = Lines::of(child.stderr.take().unwrap());
    (child, lines)
}

/// The console log of the one transient run in `runtime`, once its private directory is there.
fn transient_console(runtime: &Path) -> PathBuf {
    wait_for(|| private_dirs(runtime).len() == 1, MINUTES, "the transient run's private directory");
    private_dirs(runtime)[0].join("vm").join("console.log")
}

fn finish_transient(mut child: Child, lines: &Lines) -> String {
    let mut out = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "transient run failed: {out}\n{}", lines.text());
    out
}

/// Every file under `dir` with its bytes (for byte-for-byte comparisons).
fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.strip_prefix(dir).unwrap().to_owned(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// Names of the chunk files of a chunk store directory (`ab/abcd...`).
fn chunk_names(root: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for d in std::fs::read_dir(root).unwrap().flatten() {
        if d.file_name().len() == 2 && d.path().is_dir() {
            for f in std::fs::read_dir(d.path()).unwrap().flatten() {
                out.insert(f.file_name().into_string().unwrap());
            }
        }
    }
    out
}

/// What a checked-out parcel is made of: its local state, manifest and keyrings (not the run records).
fn parcel_files(c: &Client, parcel: &str) -> BTreeMap<PathBuf, Vec<u8>> {
    let dir = c.home.path().join("parcels").join(&c.user).join(parcel);
    files(&dir).into_iter().filter(|(p, _)| !p.to_string_lossy().starts_with("run")).collect()
}

fn head(c: &Client, parcel: &str) -> u64 {
    let v: serde_json::Value = serde_json::from_str(&c.ok(&["versions", parcel, "--json"])).unwrap();
    v["versions"].as_array().unwrap().iter().map(|v| v["version"].as_u64().unwrap()).max().unwrap()
}

#[test]
fn a_transient_run_changes_nothing_anywhere() {
    let server = Server::start();
    let a = Client::new(&server, "alice");
    let b = Client::new(&server, "alice");
    let scratch = tempfile::tempdir().unwrap();
    let runtime_a = tempfile::tempdir().unwrap();
    let runtime_t = tempfile::tempdir().unwrap();
    create_guest_parcel(&a, "vm", 128, scratch.path());
    let console_a = console_of(&a, "vm");
    let resume_a = || {
        a.cmd(&["resume", "vm", "--display", "none"])
            .env("ISR_RUNTIME_DIR", runtime_a.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };

    // Version 2: the guest suspended after counting on A (a memory image and a disk with the counter).
    let run = resume_a();
    wait_for(|| counters(&console_a).len() >= 3, MINUTES, "the counter on A");
    a.ok(&["suspend", "vm"]);
    finish(run);
    let v2_last = *counters(&console_a).last().unwrap();
    a.ok(&["checkin", "vm", "-m", "suspended"]);
    assert_eq!(head(&a, "vm"), 2);

    // A checks it out again and runs it on: local changes (dirty disk chunks, a new memory image).
    a.ok(&["checkout", "vm"]);
    let seen = counters(&console_a).len();
    let run = resume_a();
    wait_for(|| counters(&console_a).len() >= seen + 3, MINUTES, "the counter on A again");
    a.ok(&["suspend", "vm"]);
    finish(run);
    // B breaks A's lock and holds the parcel, with a change of its own (its memory image dropped).
    b.ok(&["unlock", "vm", "--force"]);
    b.ok(&["checkout", "vm"]);
    b.ok(&["poweroff", "vm"]);
    let b_before = b.stat("vm");
    assert_eq!(b_before["state"], "modified");
    let holder = b_before["lock"]["holder"].as_str().unwrap().to_owned();
    assert!(holder.contains(&b.home.path().display().to_string()), "{holder}");

    let a_before = a.stat("vm");
    assert_eq!(a_before["state"], "modified", "{a_before}");
    assert!(a_before["chunks"]["dirty"].as_u64().unwrap() > 0, "{a_before}");
    assert_eq!(a_before["lock"]["holder"], holder.as_str());
    let a_files = parcel_files(&a, "vm");
    let cache_before = chunk_names(&a.home.path().join("cache"));

    // The transient run of the head: resumed from version 2's memory, beside B's lock and A's changes.
    let (child, lines) = transient(&a, "vm", runtime_t.path(), &[]);
    let console = transient_console(runtime_t.path());
    wait_for(|| counters(&console).len() >= 3, MINUTES, "the counter of the transient run");
    let cs = counters(&console);
    assert_eq!(cs[0], v2_last + 1, "not resumed from version 2's memory image: {cs:?} after {v2_last}");
    let err = lines.text();
    assert!(err.contains(&format!("locked by {holder}")) && err.contains("check nothing in"), "{err}");
    // The guest's writes (the counter file, synced every second) went to the run's own runtime image.
    let runtime_image = private_dirs(runtime_t.path())[0].join("parcel/runtime/disk.img");
    wait_for(
        || {
            isr_client::runtime::RuntimeImage::summary(&runtime_image)
                .ok()
                .flatten()
                .is_some_and(|s| s.dirty > 0)
        },
        MINUTES,
        "chunks written by the guest in the run's runtime image",
    );
    assert_eq!(a.stat("vm")["state"], "modified", "the checkout is not what runs");
    assert!(!console_of(&a, "vm").to_string_lossy().contains(runtime_t.path().to_str().unwrap()));
    let stopped = a.ok(&["suspend", "vm"]);
    assert!(stopped.contains("stopped the transient run of vm: nothing saved"), "{stopped}");
    let out = finish_transient(child, &lines);
    assert!(
        out.contains("transient run of version 2 ended") && out.contains("every change dropped"),
        "{out}"
    );

    // Nothing changed: head, lock, B's and A's states, A's files; nothing of the run is left.
    let assert_unchanged = |when: &str, a_expected: &serde_json::Value| {
        assert_eq!(head(&a, "vm"), 2, "{when}");
        assert_eq!(&a.stat("vm"), a_expected, "{when}: A's stat changed");
        assert_eq!(b.stat("vm"), b_before, "{when}: B's stat changed");
        assert!(parcel_files(&a, "vm") == a_files, "{when}: A's parcel files changed");
        assert!(private_dirs(runtime_t.path()).is_empty(), "{when}: {:?}", private_dirs(runtime_t.path()));
        assert!(qemus_naming(runtime_t.path()).is_empty(), "{when}: a QEMU is left");
        assert!(!a.home.path().join("transient/alice/vm/run.json").exists(), "{when}");
        // New cached chunks are only ones fetched from the server: no chunk the guest wrote.
        let on_server: BTreeSet<String> = server
            .chunk_files()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        let new: Vec<_> =
            chunk_names(&a.home.path().join("cache")).difference(&cache_before).cloned().collect();
        assert!(
            new.iter().all(|t| on_server.contains(t)),
            "{when}: chunks made by the run in the cache: {new:?}"
        );
    };
    assert_unchanged("after the transient run of the head", &a_before);

    // Version 1 while the head is 2: no memory image, so it boots, and its disk has no counter yet.
    let (child, lines) = transient(&a, "vm", runtime_t.path(), &["--version", "1"]);
    let console = transient_console(runtime_t.path());
    wait_for(|| counters(&console).len() >= 2, MINUTES, "the counter of version 1");
    let log = std::fs::read_to_string(&console).unwrap();
    assert!(log.contains("isr-boot 0"), "version 1 did not boot from its own disk:\n{log}");
    assert_eq!(counters(&console)[..2], [1, 2]);
    // One VM of a parcel at a time: the checkout cannot resume beside it.
    let (code, err) = a.code(&["resume", "vm", "--display", "none"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("transient run of vm is running"), "{err}");
    let stopped = a.ok(&["poweroff", "vm"]);
    assert!(stopped.contains("stopped the transient run of vm: nothing saved"), "{stopped}");
    let out = finish_transient(child, &lines);
    assert!(out.contains("transient run of version 1 ended"), "{out}");
    assert_unchanged("after the transient run of version 1", &a_before);

    // Killed: what it left (its private directory with plaintext) goes at the next command of the parcel.
    let (mut child, lines) = transient(&a, "vm", runtime_t.path(), &[]);
    let console = transient_console(runtime_t.path());
    wait_for(|| !counters(&console).is_empty(), MINUTES, "the counter before the kill");
    signal(&child, 9);
    child.wait().unwrap();
    wait_for(|| qemus_naming(runtime_t.path()).is_empty(), MINUTES, "QEMU to die with its isr");
    assert_eq!(private_dirs(runtime_t.path()).len(), 1, "{}", lines.text());
    let out = a.cmd(&["stat", "vm", "--json"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("isr resume --transient") && err.contains("removed its private directory"), "{err}");
    assert_unchanged("after a killed transient run", &a_before);

    // Refused up front, exit 2: --version without --transient, disconnected without that version hoarded here.
    assert_eq!(a.code(&["resume", "vm", "--version", "1"]).0, 2);
    assert_eq!(a.code(&["resume", "vm", "--transient", "--version", "0", "--display", "none"]).0, 2);
    let (code, err) =
        a.code(&["resume", "vm", "--transient", "--disconnected", "--version", "1", "--display", "none"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("version 2") && err.contains("version 1 is not on this client"), "{err}");
    let fresh = Client::new(&server, "alice");
    let (code, err) = fresh.code(&["resume", "vm", "--transient", "--disconnected", "--display", "none"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not checked out here"), "{err}");
    assert_unchanged("after the refusals", &a_before);

    // Disconnected: the version hoarded here (A's base, version 2) runs with no server at all.
    a.ok(&["hoard", "vm"]);
    let a_hoarded = a.stat("vm");
    let cache_before = chunk_names(&a.home.path().join("cache"));
    let offline = Client {
        home: tempfile::TempDir::new_in(scratch.path()).unwrap(),
        server: "http://127.0.0.1:9".into(),
        user: a.user.clone(),
        password: a.password.clone(),
        env: Vec::new(),
    };
    let mut cmd = offline.cmd(&["resume", "vm", "--transient", "--disconnected", "--display", "none"]);
    let mut child = cmd
        .env("ISR_HOME", a.home.path())
        .env("ISR_RUNTIME_DIR", runtime_t.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = Lines::of(child.stderr.take().unwrap());
    let console = transient_console(runtime_t.path());
    wait_for(|| counters(&console).len() >= 2, MINUTES, "the counter of the disconnected transient run");
    assert_eq!(counters(&console)[0], v2_last + 1, "{}", lines.text());
    let stopped = offline.cmd(&["suspend", "vm"]).env("ISR_HOME", a.home.path()).output().unwrap();
    assert!(stopped.status.success(), "{}", String::from_utf8_lossy(&stopped.stderr));
    let out = finish_transient(child, &lines);
    assert!(out.contains("transient run of version 2 ended"), "{out}");
    assert!(chunk_names(&a.home.path().join("cache")) == cache_before, "the disconnected run added chunks");
    assert_unchanged("after the disconnected transient run", &a_hoarded);
}
