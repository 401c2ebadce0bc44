//! The libvirt driver against a real libvirt daemon (Debian's, `qemu:///system`, domain type `qemu` under TCG):
//! a parcel suspended under QEMU-direct on client A resumes under libvirt on client B, and back on A under
//! QEMU-direct, the guest's counter going on each time (no reboot). `isr resume --vmm libvirt` starts the
//! daemon itself when none answers, so the test needs nothing running beforehand.

mod common;
use common::guest::*;
use common::*;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const URI: &str = "qemu:///system";

fn resume_with(c: &Client, parcel: &str, vmm: &str) -> Child {
    c.cmd(&["resume", parcel, "--display", "none", "--vmm", vmm])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Names of the running libvirt domains.
fn domains() -> Vec<String> {
    let out = Command::new("virsh").args(["-q", "-c", URI, "list", "--name"]).output().expect("virsh");
    assert!(out.status.success(), "virsh list: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

/// The domain `isr resume` (process `pid`) of alice's `vm` runs under.
fn domain_of(pid: u32) -> String {
    format!("isr-alice-vm-{pid}")
}

/// Wait for `f` while `run` goes on; a resume that ends first fails the test with its output.
fn wait_running(run: &mut Child, mut f: impl FnMut() -> bool, what: &str) {
    wait_for(
        || {
            if let Some(status) = run.try_wait().unwrap() {
                let mut err = String::new();
                if let Some(mut e) = run.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                panic!("the resume ended ({status}) before {what}:\n{err}");
            }
            f()
        },
        Duration::from_secs(240),
        what,
    )
}

fn boots(console: &std::path::Path) -> usize {
    std::fs::read_to_string(console).unwrap_or_default().matches("isr-boot").count()
}

#[test]
fn suspended_under_qemu_resumes_under_libvirt_and_back() {
    let server = Server::start();
    let a = Client::new(&server, "alice");
    let scratch = tempfile::tempdir().unwrap();
    create_guest_parcel(&a, "vm", 256, scratch.path());

    // A boots it under QEMU-direct and lets it count.
    let mut run = resume_with(&a, "vm", "qemu");
    let console_a = console_of(&a, "vm");
    wait_running(&mut run, || counters(&console_a).len() >= 3, "the counter under QEMU on A");
    a.ok(&["suspend", "vm"]);
    let text = finish(run);
    assert!(text.contains("suspended"), "{text}");
    let on_a = counters(&console_a);
    let last_a = *on_a.last().unwrap();
    assert_eq!(boots(&console_a), 1);
    a.ok(&["checkin", "vm", "-m", "suspended under qemu"]);

    // B resumes it under libvirt: a libvirt domain, and the guest goes on from memory.
    let b = Client::new(&server, "alice");
    let mut run = resume_with(&b, "vm", "libvirt");
    let name = domain_of(run.id());
    let console_b = console_of(&b, "vm");
    wait_running(&mut run, || counters(&console_b).len() >= 3, "the counter under libvirt on B");
    assert!(domains().contains(&name), "{name} not among the libvirt domains {:?}", domains());
    let on_b = counters(&console_b);
    assert_eq!(
        on_b[0],
        last_a + 1,
        "the first counter under libvirt must follow QEMU's last ({last_a}): {on_b:?}"
    );
    assert_eq!(boots(&console_b), 0, "the guest rebooted under libvirt");
    b.ok(&["suspend", "vm"]);
    let text = finish(run);
    assert!(text.contains("suspended"), "{text}");
    assert!(!domains().contains(&name), "the domain {name} outlived its resume");
    let on_b = counters(&console_b);
    let last_b = *on_b.last().unwrap();
    assert_eq!(on_b, (on_b[0]..=last_b).collect::<Vec<_>>(), "counter skipped under libvirt");
    b.ok(&["checkin", "vm", "-m", "suspended under libvirt"]);

    // A resumes B's memory image under QEMU-direct again.
    let mut run = resume_with(&a, "vm", "qemu");
    wait_running(
        &mut run,
        || counters(&console_a).len() >= on_a.len() + 3,
        "the counter under QEMU on A again",
    );
    let again = counters(&console_a);
    assert_eq!(again[on_a.len()], last_b + 1, "QEMU must go on from libvirt's last ({last_b}): {again:?}");
    assert_eq!(boots(&console_a), 1, "the guest rebooted back under QEMU");
    a.ok(&["suspend", "vm"]);
    finish(run);
    let last = *counters(&console_a).last().unwrap();

    // The setting ($ISR_VMM) picks libvirt too; a `kill -9` of isr leaves no domain behind (autodestroy).
    let mut run = a
        .cmd(&["resume", "vm", "--display", "none"])
        .env("ISR_VMM", "libvirt")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let name = domain_of(run.id());
    wait_running(
        &mut run,
        || counters(&console_a).iter().any(|&c| c > last + 1),
        "the counter under libvirt with ISR_VMM=libvirt",
    );
    assert!(domains().contains(&name), "ISR_VMM=libvirt did not run {name}: {:?}", domains());
    run.kill().unwrap();
    run.wait().unwrap();
    wait_for(
        || !domains().contains(&name),
        Duration::from_secs(60),
        "libvirt destroying the killed run's domain",
    );
    // the next command cleans up after the dead run; the parcel is not running any more
    assert_ne!(a.stat("vm")["state"], "running");
}
