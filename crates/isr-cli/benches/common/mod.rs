//! Shared helpers for the client benchmarks: a real `isr-server`, the real `isr` binary, peers run in the same
//! process tree, and a table printer. Build the binaries first:
//! `cargo build --release --workspace --bins` (same CARGO_TARGET_DIR), then `cargo bench -p isr-cli`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const PASSWORD: &str = "correct horse battery staple";
pub const MIB: u64 = 1 << 20;

pub fn isr_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_isr"))
}

pub fn server_bin() -> PathBuf {
    let p = isr_bin().with_file_name("isr-server");
    assert!(p.exists(), "{} missing: run `cargo build --release --workspace --bins` first", p.display());
    p
}

/// Scratch space on the real disk (not tmpfs), so that peers and isr pay the same file system costs.
pub fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("isr-bench-")
        .tempdir_in(std::env::var_os("ISR_BENCH_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir))
        .unwrap()
}

pub fn require_tool(name: &str, hint: &str) {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "`{name}` not found: {hint}");
}

pub struct Server {
    pub data: PathBuf,
    pub url: String,
    child: Child,
}

impl Server {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn start(data: &Path) -> Server {
        let out = Command::new(server_bin())
            .args(["user", "add", "alice", "--data"])
            .arg(data)
            .env("ISR_PASSWORD", PASSWORD)
            .output()
            .unwrap();
        assert!(out.status.success(), "user add: {}", String::from_utf8_lossy(&out.stderr));
        let mut child = Command::new(server_bin())
            .args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(data)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let url = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("odd first line {line:?}"))
            .to_owned();
        Server { data: data.to_owned(), url, child }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Client {
    pub home: PathBuf,
    pub server: String,
}

impl Client {
    pub fn new(server: &Server, home: &Path) -> Client {
        std::fs::create_dir_all(home).unwrap();
        Client { home: home.to_owned(), server: server.url.clone() }
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(isr_bin());
        c.args(args)
            .env("ISR_SERVER", &self.server)
            .env("ISR_USER", "alice")
            .env("ISR_PASSWORD", PASSWORD)
            .env("ISR_HOME", &self.home)
            .env("ISR_ACCEL", "tcg")
            .stdin(Stdio::null());
        c
    }

    /// Run and require success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd(args).output().unwrap();
        check(&out, &format!("isr {args:?}"));
        String::from_utf8(out.stdout).unwrap()
    }

    /// Start `isr disk` and wait for its socket.
    pub fn disk(&self, parcel: &str, sock: &Path) -> Child {
        self.disk_with(parcel, sock, &[])
    }

    /// [`Self::disk`] with further arguments.
    pub fn disk_with(&self, parcel: &str, sock: &Path, extra: &[&str]) -> Child {
        let _ = std::fs::remove_file(sock);
        let mut args = vec!["disk", parcel, "--nbd", sock.to_str().unwrap()];
        args.extend_from_slice(extra);
        let child = self.cmd(&args).stdout(Stdio::null()).stderr(Stdio::inherit()).spawn().unwrap();
        wait_for(|| sock.exists(), Duration::from_secs(60), "the isr disk socket");
        child
    }
}

/// CPU time (user + system) that process `pid` has used so far, from `/proc/PID/stat`; with
/// `reaped_children`, that of its children it has waited for instead.
pub fn cpu_time(pid: u32, reaped_children: bool) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces), which ends at the last ')'.
    let rest: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    // utime, stime are fields 14 and 15 of the line, cutime, cstime 16 and 17; `rest` starts at field 3.
    let at = if reaped_children { 13 } else { 11 };
    let ticks: u64 = rest[at].parse::<u64>().unwrap() + rest[at + 1].parse::<u64>().unwrap();
    // USER_HZ is 100 on every Linux architecture this runs on.
    Duration::from_millis(ticks * 10)
}

pub fn check(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({:?}):\n{}\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("{what}: {e}"));
    check(&out, what);
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

pub fn wait_for(mut f: impl FnMut() -> bool, timeout: Duration, what: &str) {
    let end = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGTERM and wait (clean shutdown of `isr disk` or `qemu-nbd`).
pub fn stop(mut child: Child) {
    let _ = Command::new("kill").arg("-15").arg(child.id().to_string()).status();
    let end = Instant::now() + Duration::from_secs(120);
    loop {
        if child.try_wait().unwrap().is_some() {
            return;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A deterministic mixed image, in 4 MiB regions cycling through: pseudo-random (incompressible), zero,
/// text-like, and "binary-like" (text with a random byte every 16, compresses ~2x).
pub fn make_mixed_image(path: &Path, size: u64, seed: &str) {
    use std::io::Write;
    const REGION: usize = 4 << 20;
    let mut f = std::io::BufWriter::with_capacity(REGION, std::fs::File::create(path).unwrap());
    let words: &[&[u8]] = &[
        b"the ",
        b"quick ",
        b"brown ",
        b"fox ",
        b"jumps ",
        b"over ",
        b"lazy ",
        b"dog\n",
        b"suspend ",
        b"resume ",
        b"internet ",
        b"parcel\n",
    ];
    let mut xof = blake3::Hasher::new().update(seed.as_bytes()).finalize_xof();
    let mut buf = vec![0u8; REGION];
    let mut written = 0u64;
    let mut region = 0u64;
    while written < size {
        let n = REGION.min((size - written) as usize);
        let b = &mut buf[..n];
        match region % 4 {
            0 => xof.fill(b),
            1 => b.fill(0),
            k => {
                let mut rnd = vec![0u8; n / 16 + 64];
                xof.fill(&mut rnd);
                let mut pos = 0;
                let mut r = 0;
                while pos < n {
                    let w = words[rnd[r % rnd.len()] as usize % words.len()];
                    let m = w.len().min(n - pos);
                    b[pos..pos + m].copy_from_slice(&w[..m]);
                    pos += m;
                    r += 1;
                }
                if k == 3 {
                    for (i, x) in b.iter_mut().step_by(16).enumerate() {
                        *x = rnd[i % rnd.len()];
                    }
                }
            }
        }
        f.write_all(b).unwrap();
        written += n as u64;
        region += 1;
    }
    f.flush().unwrap();
    f.into_inner().unwrap().sync_all().unwrap();
}

pub fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

/// A simple aligned table.
pub fn print_table(title: &str, header: &[&str], rows: &[Vec<String>]) {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    println!("\n## {title}\n");
    let line = |cells: Vec<String>| {
        let cells: Vec<String> =
            cells.iter().enumerate().map(|(i, c)| format!("{c:<width$}", width = w[i])).collect();
        println!("| {} |", cells.join(" | "));
    };
    line(header.iter().map(|s| s.to_string()).collect());
    println!("|{}|", w.iter().map(|n| "-".repeat(n + 2)).collect::<Vec<_>>().join("|"));
    for r in rows {
        line(r.clone());
    }
    println!();
}

pub fn load_note() -> String {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    format!(
        "load average at start: {} (2 vCPUs shared; compare ratios, not absolute numbers)",
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    )
}
