//! Hoarded `isr resume` of the test guest (256 MiB memory) vs QEMU restoring the very same memory image from
//! plain local files through isr_vmm (the limit), interleaved in the same run, best of 3.
//!
//! Each round: decode the parcel's current memory image (and disk) to plain files, the RAM in one and the
//! device state in another; restore them with `Vm::start(.., Start::Incoming)` (RAM a shared file in tmpfs,
//! disk from qemu-nbd on a raw copy) and power off; then `isr resume` the parcel (its RAM on demand), wait
//! until the guest's counter advances, `isr suspend`.
//!
//! Run: `cargo build --release --workspace --bins && cargo bench -p isr-cli --bench resume`. Needs QEMU.

mod common;
use common::*;
use isr_client::home::Home;
use isr_client::parcel::Client as Lib;
use isr_format::ImageKind;
use isr_vmm::{Accel, Display, Start, Vm, VmConfig};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ROUNDS: usize = 3;
const APPEND: &str = "console=ttyS0 quiet panic=-1 init_on_free=1";

fn guest() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest");
    let st = Command::new("bash").arg(root.join("build.sh")).stdout(Stdio::null()).status().unwrap();
    assert!(st.success(), "guest/build.sh failed");
    root.join("out")
}

fn counters(console: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string(console).unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split("isr-counter ").nth(1))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

fn finish(child: Child) -> String {
    let out = child.wait_with_output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "resume failed: {text}");
    text
}

fn secs_after(text: &str, key: &str) -> f64 {
    text.split(key)
        .nth(1)
        .and_then(|s| s.trim().split('s').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no '{key}' in {text}"))
}

/// Decode the parcel's working memory and disk images to plain files with the client library.
/// Decode the memory image into `mem` (the RAM, as QEMU maps it) and `devices` (the device state), and the disk.
async fn decode_images(
    home: &Path,
    url: &str,
    mem: &Path,
    devices: &Path,
    disk: &Path,
) -> (u32, u32, isr_format::manifest::DeviceModel) {
    let mut lib = Lib::new(
        Home::open(home).unwrap(),
        "alice".into(),
        Some(url.into()),
        None,
        Box::new(|| Ok(PASSWORD.to_owned())),
    );
    let o = lib.open("vm").unwrap();
    // Connected: the chunks a suspend changed are on the server after the round's sync.
    let server = lib.connect().await.unwrap();
    let sources = lib.sources(Some(server)).unwrap();
    for (kind, path) in [(ImageKind::Memory, mem), (ImageKind::Disk, disk)] {
        let (_, work, _) = lib.keyrings(&o, kind).unwrap().expect("image present");
        isr_client::resume::write_image_file(&work, &sources, path).await.unwrap();
    }
    use isr_client::guest_ram::layout::{Header, HEADER_LEN};
    use std::os::unix::fs::FileExt;
    let ram_len = u64::from(o.manifest.vm.memory_mib) << 20;
    let file = std::fs::OpenOptions::new().read(true).write(true).open(mem).unwrap();
    let mut page = vec![0u8; HEADER_LEN];
    file.read_exact_at(&mut page, ram_len).unwrap();
    let header = Header::parse(&page).expect("a memory image with RAM and device state").unwrap();
    let mut state = vec![0u8; header.state_len as usize];
    file.read_exact_at(&mut state, ram_len + HEADER_LEN as u64).unwrap();
    std::fs::write(devices, state).unwrap();
    file.set_len(ram_len).unwrap();
    (o.manifest.vm.memory_mib, o.manifest.vm.cpus, o.manifest.vm.devices)
}

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    require_tool("qemu-system-x86_64", "see /work/shared/notes/test-guest.md");
    require_tool("qemu-nbd", "apt-get install qemu-utils");
    println!("{}", load_note());
    let out = guest();
    let dir = scratch();
    let d = dir.path();
    let server = Server::start(&d.join("server"));
    let a = Client::new(&server, &d.join("home"));
    let disk = d.join("disk.img");
    std::fs::copy(out.join("disk.img"), &disk).unwrap();
    let (kernel, initrd) = (out.join("vmlinuz"), out.join("initrd.img"));
    a.ok(&[
        "create",
        "vm",
        "--disk",
        disk.to_str().unwrap(),
        "--memory",
        "256",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--append",
        APPEND,
    ]);
    let console = a.home.join("logs").join("alice").join("vm").join("console.log");
    let resume = || {
        a.cmd(&["resume", "vm", "--display", "none"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };

    // Cold boot once, let it count, suspend: from now on the parcel has a memory image.
    let t = Instant::now();
    let child = resume();
    wait_for(|| counters(&console).len() >= 3, Duration::from_secs(180), "the guest's counter (boot)");
    a.ok(&["suspend", "vm"]);
    finish(child);
    a.ok(&["hoard", "vm"]);
    eprintln!("boot + suspend + hoard in {:.1}s", t.elapsed().as_secs_f64());

    let shm = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
    let plain = tempfile::Builder::new().prefix("isr-bench-resume-").tempdir_in(shm).unwrap();
    let (mem, disk_raw) = (plain.path().join("memory"), d.join("limit-disk.raw"));
    let devices = plain.path().join("devices");
    let limit_console = d.join("limit-console.log");
    let sock = d.join("limit.sock");

    let (mut limit, mut prep, mut rest, mut total) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut mem_bytes = 0;
    for round in 0..ROUNDS {
        // The limit: QEMU restores the same memory image from a plain file.
        let (memory_mib, cpus, model) = decode_images(&a.home, &server.url, &mem, &devices, &disk_raw).await;
        mem_bytes = std::fs::metadata(&mem).unwrap().len();
        let _ = std::fs::remove_file(&sock);
        let nbd = Command::new("qemu-nbd")
            .args(["-f", "raw", "--cache=writeback", "--aio=threads", "--persistent", "--socket"])
            .arg(&sock)
            .arg(&disk_raw)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        wait_for(|| sock.exists(), Duration::from_secs(30), "qemu-nbd");
        let mut config = VmConfig::new(memory_mib, &sock);
        config.cpus = cpus;
        config.kernel = Some(kernel.clone());
        config.initrd = Some(initrd.clone());
        config.append = Some(APPEND.into());
        config.accel = Accel::Tcg;
        config.display = Display::None;
        config.console_log = Some(limit_console.clone());
        config.shared_ram = Some(mem.clone());
        // The devices the state was saved with (as `isr resume` sets them): the parcel's device model and the
        // machine type the image names.
        config.vga = model.has_display();
        config.agent_channel = model.has_agent_channel();
        config.nic = model.has_nic();
        config.agent_socket = config.agent_channel.then(|| plain.path().join("qga.sock"));
        config.runtime_dir = Some(plain.path().to_owned());
        if let Some(machine) = isr_vmm::inspect_memory_image(&devices).ok().and_then(|i| i.machine_type) {
            config.machine = machine;
        }
        let t = Instant::now();
        let mut vm = Vm::start(config, Start::Incoming { memory_image_path: devices.clone() })
            .await
            .expect("limit restore");
        limit.push(t.elapsed());
        wait_for(
            || !counters(&limit_console).is_empty(),
            Duration::from_secs(60),
            "the restored guest's counter (limit)",
        );
        vm.poweroff().await.unwrap();
        stop(nbd);
        let _ = std::fs::remove_file(&limit_console);

        // isr: hoarded resume of the same image; the guest must count on from where it was.
        let last = counters(&console).last().copied().unwrap_or(0);
        let child = resume();
        wait_for(
            || counters(&console).last().is_some_and(|&n| n > last),
            Duration::from_secs(120),
            "the guest's counter (isr)",
        );
        a.ok(&["suspend", "vm"]);
        let text = finish(child);
        // The suspend left the changed chunks in the runtime images; the next round's limit decodes the
        // images from chunks, so they are encoded (and uploaded) first.
        a.ok(&["sync", "vm"]);
        let (p, r) = (secs_after(&text, "prepare "), secs_after(&text, "start/restore "));
        prep.push(p);
        rest.push(r);
        total.push(p + r);
        eprintln!(
            "round {round}: limit {:.2}s; isr prepare {p:.2}s restore {r:.2}s",
            limit[round].as_secs_f64()
        );
    }
    let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    let lim = limit.iter().min().unwrap().as_secs_f64();
    let best =
        total
            .iter()
            .copied()
            .enumerate()
            .fold((0, f64::INFINITY), |acc, (i, t)| if t < acc.1 { (i, t) } else { acc });
    print_table(
        &format!(
            "resume of the test guest (256 MiB RAM, memory image {:.0} MiB apparent), TCG, best of {ROUNDS}",
            mem_bytes as f64 / MIB as f64
        ),
        &["path", "prepare (fetch/decode)", "QEMU start+restore", "total", "vs limit"],
        &[
            vec![
                "isr resume, hoarded (best round)".into(),
                format!("{:.2}s", prep[best.0]),
                format!("{:.2}s", rest[best.0]),
                format!("{:.2}s", best.1),
                format!("{:.2}", best.1 / lim),
            ],
            vec![
                "isr resume, best of each stage".into(),
                format!("{:.2}s", min(&prep)),
                format!("{:.2}s", min(&rest)),
                "".into(),
                "".into(),
            ],
            vec![
                "limit: isr_vmm Vm::start(Incoming) from a plain file".into(),
                "0".into(),
                format!("{lim:.2}s"),
                format!("{lim:.2}s"),
                "1.00".into(),
            ],
        ],
    );
}
