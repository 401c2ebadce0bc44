//! Test harness: a real `isr-server` on 127.0.0.1:0 in a temp dir and the real `isr` binary.
#![allow(dead_code)]

pub mod guest;

use isr_nbd::proto::{IHAVEOPT, NBDMAGIC, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const PASSWORD: &str = "correct horse battery staple";

pub fn isr_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_isr"))
}

pub fn server_bin() -> PathBuf {
    let p = isr_bin().with_file_name("isr-server");
    assert!(p.exists(), "{} missing: build the workspace binaries first (make test does)", p.display());
    p
}

pub struct Server {
    pub dir: tempfile::TempDir,
    pub url: String,
    child: Option<Child>,
    /// Certificate and key to serve HTTPS with.
    tls: Option<(PathBuf, PathBuf)>,
    /// More arguments for `serve` (e.g. `--config FILE`), from the next restart on.
    pub serve_args: Vec<String>,
}

impl Server {
    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn start() -> Server {
        let dir = tempfile::tempdir().unwrap();
        let s = Server { dir, url: String::new(), child: None, tls: None, serve_args: Vec::new() };
        s.admin(&["user", "add", "alice"]);
        s.admin(&["user", "add", "bob"]);
        s.restart()
    }

    /// A server on HTTPS with this certificate and key.
    pub fn start_tls(cert: &Path, key: &Path) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let s = Server {
            dir,
            url: String::new(),
            child: None,
            tls: Some((cert.to_owned(), key.to_owned())),
            serve_args: Vec::new(),
        };
        s.admin(&["user", "add", "alice"]);
        s.restart()
    }

    /// An administrator's command with `password` in $ISR_PASSWORD.
    pub fn admin_with_password(&self, args: &[&str], password: &str) -> Output {
        Command::new(server_bin())
            .args(args)
            .arg("--data")
            .arg(self.data())
            .env("ISR_PASSWORD", password)
            .output()
            .unwrap()
    }

    pub fn admin(&self, args: &[&str]) -> Output {
        let out = Command::new(server_bin())
            .args(args)
            .arg("--data")
            .arg(self.data())
            .env("ISR_PASSWORD", PASSWORD)
            .output()
            .unwrap();
        out
    }

    pub fn restart(self) -> Server {
        self.restart_listening("127.0.0.1:0")
    }

    /// Kill and start again on the same address (clients keep their URL).
    pub fn restart_in_place(self) -> Server {
        let addr =
            self.url.trim_start_matches("http://").trim_start_matches("https://").trim_end_matches('/');
        let addr = addr.to_owned();
        self.restart_listening(&addr)
    }

    fn restart_listening(mut self, listen: &str) -> Server {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let mut cmd = Command::new(server_bin());
        cmd.args(["serve", "--listen", listen, "--data"]).arg(self.data());
        if let Some((cert, key)) = &self.tls {
            cmd.arg("--tls-cert").arg(cert).arg("--tls-key").arg(key);
        }
        cmd.args(&self.serve_args);
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let url =
            line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("odd first line {line:?}"));
        self.url = url.to_owned();
        self.child = Some(child);
        self
    }

    /// Kill the server process (SIGKILL) and keep it down.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn chunk_files(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let root = self.data().join("chunks");
        for d in std::fs::read_dir(&root).unwrap().flatten() {
            if d.file_name().len() == 2 && d.path().is_dir() {
                for f in std::fs::read_dir(d.path()).unwrap().flatten() {
                    out.push(f.path());
                }
            }
        }
        out
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One client: its own home.
pub struct Client {
    pub home: tempfile::TempDir,
    pub server: String,
    pub user: String,
    pub password: String,
    /// More environment for every command of this client.
    pub env: Vec<(String, String)>,
}

impl Client {
    pub fn new(server: &Server, user: &str) -> Client {
        Client {
            home: tempfile::tempdir().unwrap(),
            server: server.url.clone(),
            user: user.into(),
            password: PASSWORD.into(),
            env: Vec::new(),
        }
    }

    /// The same client with `var=value` in every command's environment.
    pub fn with_env(mut self, var: &str, value: &str) -> Client {
        self.env.push((var.into(), value.into()));
        self
    }

    /// A client whose running parcels send nothing in the background (`ISR_UPLOAD_RATE=0`): everything
    /// goes at check-in, for the tests of that path.
    pub fn without_trickle(server: &Server, user: &str) -> Client {
        Client::new(server, user).with_env("ISR_UPLOAD_RATE", "0")
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(isr_bin());
        c.args(args)
            .env("ISR_SERVER", &self.server)
            .env("ISR_USER", &self.user)
            .env("ISR_PASSWORD", &self.password)
            .env("ISR_HOME", self.home.path())
            .env("ISR_ACCEL", "tcg")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// Run and require success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "isr {args:?} failed ({:?}):\n{}\n{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn code(&self, args: &[&str]) -> (i32, String) {
        let out = self.run(args);
        (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
    }

    pub fn stat(&self, parcel: &str) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["stat", parcel, "--json"])).unwrap()
    }

    /// Start `isr disk` and wait for its socket.
    pub fn disk(&self, parcel: &str, sock: &Path) -> Child {
        let _ = std::fs::remove_file(sock);
        let child = self
            .cmd(&["disk", parcel, "--nbd", sock.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_for(|| sock.exists(), Duration::from_secs(30), "the NBD socket");
        child
    }
}

pub fn wait_for(mut f: impl FnMut() -> bool, timeout: Duration, what: &str) {
    let end = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn signal(child: &Child, sig: i32) {
    let status = Command::new("kill").arg(format!("-{sig}")).arg(child.id().to_string()).status().unwrap();
    assert!(status.success());
}

/// Stop `isr disk` cleanly (SIGTERM) and require a clean exit.
pub fn stop_disk(child: Child) -> String {
    signal(&child, 15);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "isr disk exited with {:?}: {err}", out.status);
    err
}

/// Run qemu-io commands against an NBD socket; returns (success, combined output).
pub fn qemu_io(sock: &Path, cmds: &[&str]) -> (bool, String) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    c.arg(format!("nbd+unix:///?socket={}", sock.display()));
    let out = c.output().expect("qemu-io (install qemu-utils)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let ok =
        out.status.success() && !text.contains("Pattern verification failed") && !text.contains("failed");
    (ok, text)
}

/// A 256 MiB image: 4 MiB of pseudo-random data at the start, text at 64 MiB, zeros elsewhere.
pub fn make_image(path: &Path, size: u64) -> Vec<u8> {
    let mut data = vec![0u8; 4 << 20];
    blake3::Hasher::new().update(b"isr test image").finalize_xof().fill(&mut data);
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&data, 0).unwrap();
    let text: Vec<u8> =
        b"the quick brown fox jumps over the lazy dog\n".iter().copied().cycle().take(1 << 20).collect();
    if size >= 65 << 20 {
        f.write_all_at(&text, 64 << 20).unwrap();
    }
    data
}

pub fn sent_chunks(output: &str) -> u64 {
    let after = output.split("sent ").nth(1).unwrap_or_else(|| panic!("no 'sent' in {output:?}"));
    after.split_whitespace().next().unwrap().parse().unwrap()
}

impl Server {
    /// Chunks the server sent so far (one by one or in batched fetches).
    pub fn chunks_fetched(&self) -> u64 {
        self.metrics()
            .lines()
            .find_map(|l| l.strip_prefix("isr_chunks_sent_total ")?.parse().ok())
            .expect("isr_chunks_sent_total in /metrics")
    }

    /// Batched fetch requests (`POST chunks/fetch`) the server answered so far.
    pub fn fetch_requests(&self) -> u64 {
        self.metrics()
            .lines()
            .filter(|l| l.starts_with("isr_http_requests_total{route=\"/api/v1/chunks/fetch\","))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    fn metrics(&self) -> String {
        use std::io::{Read, Write};
        let addr = self.url.trim_start_matches("http://").trim_end_matches('/');
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body
    }

    /// Requests on `/chunks/{tag}` (uploads; the client fetches in batches) answered with any of `statuses`
    /// so far (a PUT of a new chunk is answered 201).
    pub fn chunk_requests_answered(&self, statuses: &[&str]) -> u64 {
        self.metrics()
            .lines()
            .filter(|l| {
                statuses.iter().any(|s| {
                    l.starts_with(&format!(
                        "isr_http_requests_total{{route=\"/api/v1/chunks/{{tag}}\",status=\"{s}\"}}"
                    ))
                })
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// A directory of chunk files in the server store's layout holding every chunk the server has: what a
    /// USB stick or another client's cache would hold.
    pub fn copy_chunks_to(&self, dir: &Path) -> Vec<PathBuf> {
        let mut copied = Vec::new();
        for f in self.chunk_files() {
            let name = f.file_name().unwrap().to_owned();
            let sub = dir.join(f.parent().unwrap().file_name().unwrap());
            std::fs::create_dir_all(&sub).unwrap();
            std::fs::copy(&f, sub.join(&name)).unwrap();
            copied.push(sub.join(name));
        }
        copied
    }
}

/// A child whose stdout is piped and whose stderr is collected as it comes (readable while it runs).
pub struct Collecting {
    pub child: Child,
    pub stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Collecting {
    pub fn spawn(cmd: &mut Command) -> Collecting {
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let pipe = child.stderr.take().unwrap();
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        Collecting { child, stderr }
    }
}

/// A tiny blocking NBD client (used by the tests that must control every request: no flush unless asked) (fixed newstyle, NBD_OPT_EXPORT_NAME, simple replies): enough for a stream of
/// writes and flushes whose acknowledgements the test must see itself.
pub struct Nbd {
    s: UnixStream,
    handle: u64,
}

impl Nbd {
    pub fn connect(sock: &Path, size: u64) -> std::io::Result<Nbd> {
        let mut s = UnixStream::connect(sock)?;
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello)?;
        assert_eq!(u64::from_be_bytes(hello[..8].try_into().unwrap()), NBDMAGIC);
        assert_eq!(u64::from_be_bytes(hello[8..16].try_into().unwrap()), IHAVEOPT);
        s.write_all(&3u32.to_be_bytes())?; // fixed newstyle, no zeroes
        let mut opt = Vec::new();
        opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME, default export
        opt.extend_from_slice(&0u32.to_be_bytes());
        s.write_all(&opt)?;
        let mut reply = [0u8; 10];
        s.read_exact(&mut reply)?;
        assert_eq!(u64::from_be_bytes(reply[..8].try_into().unwrap()), size);
        Ok(Nbd { s, handle: 0 })
    }

    fn request(
        &mut self,
        kind: u16,
        offset: u64,
        len: u32,
        data: &[u8],
        out: &mut [u8],
    ) -> std::io::Result<()> {
        self.handle += 1;
        let mut req = Vec::with_capacity(28 + data.len());
        req.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        req.extend_from_slice(&0u16.to_be_bytes());
        req.extend_from_slice(&kind.to_be_bytes());
        req.extend_from_slice(&self.handle.to_be_bytes());
        req.extend_from_slice(&offset.to_be_bytes());
        req.extend_from_slice(&len.to_be_bytes());
        req.extend_from_slice(data);
        self.s.write_all(&req)?;
        let mut rep = [0u8; 16];
        self.s.read_exact(&mut rep)?;
        assert_eq!(u32::from_be_bytes(rep[..4].try_into().unwrap()), SIMPLE_REPLY_MAGIC);
        let error = u32::from_be_bytes(rep[4..8].try_into().unwrap());
        assert_eq!(u64::from_be_bytes(rep[8..16].try_into().unwrap()), self.handle);
        if error != 0 {
            return Err(std::io::Error::other(format!("NBD error {error}")));
        }
        self.s.read_exact(out)
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.request(1, offset, data.len() as u32, data, &mut [])
    }
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.request(3, 0, 0, &[], &mut [])
    }
    pub fn read(&mut self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let mut out = vec![0u8; len];
        self.request(0, offset, len as u32, &[], &mut out)?;
        Ok(out)
    }
}
