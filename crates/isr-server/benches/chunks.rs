//! Chunk GET/PUT throughput of `isr-server` against nginx serving the same files, on loopback.
//!
//! `cargo bench -p isr-server --bench chunks` (set `ISR_BENCH_SECS` to change the seconds per cell, default 2.5).
//! The server runs in-process on its own 2-thread runtime, nginx with 2 workers; the clients (reqwest,
//! HTTP/1.1 keep-alive) share the machine with both, as any loopback benchmark does. nginx serves the chunk
//! files statically (sendfile) and takes PUTs with its DAV module (temp file + rename, no fsync); isr-server
//! checks the token and verifies each chunk's tag on GET and PUT, writes each new chunk to a temp file and
//! renames it (no fsync), and makes them durable at the commit that follows: isr's PUT figure includes that
//! commit (keyring upload of every chunk the cell PUT, then the commit with its sync and presence check), as
//! a check-in does.

mod common;

use bytes::Bytes;
use common::{measure, Target, CHUNK_BYTES};
use isr_format::{
    ChunkIndex, ChunkKey, ChunkSize, ImageLen, ImageRef, Keyring, Keyroot, LoginSecret, Manifest, Tag,
    VmDescription,
};
use isr_server::{AppState, ServerSettings, Storage, StorageConfig};
use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const N_CHUNKS: usize = 256;
const CONCURRENCY: [usize; 3] = [1, 8, 64];
/// Alternating rounds per cell (isr, then nginx), the best of each reported.
const ROUNDS: usize = 3;

/// Between two measured runs, untimed: nginx's PUT files removed (isr's stay: later commits need none of
/// them, and gc is not the subject) and everything written so far written back.
fn settle(data: &Path) {
    let _ = std::fs::remove_dir_all(data.join("put"));
    let _ = Command::new("sync").status();
}

fn nginx_binary() -> Option<PathBuf> {
    ["/usr/sbin/nginx", "/usr/bin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

fn ensure_nginx() -> PathBuf {
    if let Some(p) = nginx_binary() {
        return p;
    }
    eprintln!("nginx not found: trying `apt-get install -y nginx`");
    let _ = Command::new("apt-get").args(["install", "-y", "nginx"]).stdout(Stdio::null()).status();
    nginx_binary().unwrap_or_else(|| {
        eprintln!("error: nginx is needed as the peer of this benchmark; install the Debian package `nginx`");
        std::process::exit(1)
    })
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Stops nginx (master and workers) however the benchmark ends.
struct Nginx(Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGQUIT: the master stops its workers too (SIGKILL would orphan them).
        let _ = Command::new("kill").arg("-QUIT").arg(self.0.id().to_string()).status();
        let _ = self.0.wait();
    }
}

fn start_nginx(bin: &Path, prefix: &Path, root: &Path, port: u16) -> Nginx {
    for d in ["body", "proxy", "fastcgi", "uwsgi", "scgi", "logs"] {
        std::fs::create_dir_all(prefix.join(d)).unwrap();
    }
    let p = prefix.display();
    // Workers must read and write the temp dir: as root, keep them root (nginx drops to nobody otherwise).
    let is_root = Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    let user = if is_root { "user root root;" } else { "" };
    let conf = format!(
        r#"daemon off;
{user}
master_process on;
worker_processes 2;
pid {p}/nginx.pid;
error_log {p}/logs/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
    default_type application/octet-stream;
    client_body_temp_path {p}/body;
    proxy_temp_path {p}/proxy;
    fastcgi_temp_path {p}/fastcgi;
    uwsgi_temp_path {p}/uwsgi;
    scgi_temp_path {p}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location /put/ {{
            dav_methods PUT;
            create_full_put_path on;
            client_max_body_size 8m;
            client_body_buffer_size 256k;
        }}
    }}
}}
"#,
        root = root.display()
    );
    let conf_path = prefix.join("nginx.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let child = Command::new(bin)
        .arg("-p")
        .arg(prefix)
        .arg("-c")
        .arg(&conf_path)
        .arg("-e")
        .arg(prefix.join("logs/error.log"))
        .stdout(Stdio::null())
        .spawn()
        .map(Nginx)
        .expect("starting nginx");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "nginx did not start: see {}",
            prefix.join("logs/error.log").display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// The version a check-in of the chunks `fresh_chunk(base, n)`, `n` in `seqs`, commits: keyring bytes, its
/// hash, the sealed manifest (built before the clock starts).
fn version_of(base: &[u8], seqs: std::ops::Range<u64>) -> (Vec<u8>, Tag, Vec<u8>) {
    let n = seqs.end - seqs.start;
    let cs = ChunkSize::new(CHUNK_BYTES as u64).unwrap();
    let len = ImageLen(n.max(1) * CHUNK_BYTES as u64);
    let mut keyring = Keyring::new(cs, len).unwrap();
    for (i, seq) in seqs.enumerate() {
        let (tag, _) = common::fresh_chunk(base, seq);
        keyring.set(ChunkIndex(i as u64), Some((tag, ChunkKey(isr_format::random_bytes()))));
    }
    let keyroot = Keyroot::random();
    let keyring = keyring.seal(&keyroot);
    let hash = Tag::of(&keyring);
    let manifest = Manifest {
        vm: VmDescription { memory_mib: 256, cpus: 1, append: None, devices: Default::default() },
        chunk_size: cs,
        disk: ImageRef { len, keyring: hash },
        memory: None,
        kernel: None,
        initrd: None,
        created_unix: 1_800_000_000,
        comment: "bench".into(),
    }
    .seal_legacy_unbound(&keyroot)
    .unwrap();
    (keyring, hash, manifest)
}

/// Uploads the keyring and commits version `base_version + 1` of parcel `p`; the time it took.
async fn commit(url: &str, token: &str, lock_id: &str, base_version: u64, v: (Vec<u8>, Tag, Vec<u8>)) -> f64 {
    use base64::Engine as _;
    let http = common::client_builder().build().unwrap();
    let t0 = Instant::now();
    let r = http
        .put(format!("{url}/api/v1/parcels/p/keyrings/{}?lock_id={lock_id}", v.1))
        .bearer_auth(token)
        .body(v.0)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "keyring upload: {}", r.status());
    let r = http
        .post(format!("{url}/api/v1/parcels/p/versions"))
        .bearer_auth(token)
        .json(&serde_json::json!({"lock_id": lock_id, "base_version": base_version,
            "manifest": base64::engine::general_purpose::STANDARD.encode(&v.2)}))
        .send()
        .await
        .unwrap();
    let status = r.status();
    assert!(status.is_success(), "commit: {status} {}", r.text().await.unwrap_or_default());
    t0.elapsed().as_secs_f64()
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` runs us with no such flag: do a short smoke run.
    let secs: f64 = std::env::var("ISR_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if std::env::args().any(|a| a == "--bench") { 2.5 } else { 0.3 });
    let nginx = ensure_nginx();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");

    // isr-server on its own runtime.
    let server_rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (storage, url) = server_rt.block_on(async {
        let storage =
            Storage::open(&StorageConfig::data_dir(&data), isr_server::Deployment::Create).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = AppState::new(storage.clone(), ServerSettings::default());
        tokio::spawn(isr_server::run(listener, state, None, std::future::pending()));
        (storage, url)
    });
    let secret = LoginSecret::random();
    let client_rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (tags, token) = {
        let (storage, url) = (storage.clone(), url.clone());
        server_rt.block_on(async move {
            isr_server::admin::add_user(&storage, "bench", &secret).await.unwrap();
            // N encoded 128 KiB chunks of incompressible data.
            let mut enc = isr_format::ChunkEncoder::new(storage.convergence_secret.clone());
            let mut tags = Vec::new();
            for i in 0..N_CHUNKS as u64 {
                let mut plain = vec![0u8; CHUNK_BYTES];
                blake3::Hasher::new().update(&i.to_le_bytes()).finalize_xof().fill(&mut plain);
                let e = enc.encode(&plain).unwrap().unwrap();
                storage.chunks.store().put(&e.tag, Bytes::from(e.stored)).await.unwrap();
                tags.push(e.tag);
            }
            let r = common::login(&url, "bench", &secret).await;
            (tags, r["token"].as_str().unwrap().to_owned())
        })
    };
    let h = tags[0].to_hex();
    let stored_len =
        std::fs::metadata(data.join("chunks").join(&h[..2]).join(&h)).map(|m| m.len()).unwrap_or(0);
    let port = free_port();
    let prefix = dir.path().join("nginx");
    let nginx_child = start_nginx(&nginx, &prefix, &data, port);

    let isr = Arc::new(Target {
        name: "isr",
        bases: vec![url.clone()],
        get_path: Box::new(|t| format!("/api/v1/chunks/{t}")),
        put_path: Box::new(|t| format!("/api/v1/chunks/{t}")),
        token: Some(token),
    });
    let ngx = Arc::new(Target {
        name: "nginx",
        bases: vec![format!("http://127.0.0.1:{port}")],
        get_path: Box::new(|t| {
            let h = t.to_hex();
            format!("/chunks/{}/{h}", &h[..2])
        }),
        put_path: Box::new(|t| {
            let h = t.to_hex();
            format!("/put/{}/{h}", &h[..2])
        }),
        token: None,
    });
    let tags = Arc::new(tags);
    let mut base = vec![0u8; CHUNK_BYTES + 28];
    blake3::Hasher::new().update(b"put").finalize_xof().fill(&mut base);
    let base = Arc::new(base);

    println!(
        "chunk GET/PUT over loopback, {N_CHUNKS} chunks of {stored_len} stored bytes, {secs} s per cell"
    );
    let lock_id = client_rt.block_on(async {
        let r: serde_json::Value = common::client_builder()
            .build()
            .unwrap()
            .post(format!("{url}/api/v1/parcels"))
            .bearer_auth(isr.token.as_ref().unwrap())
            .json(&serde_json::json!({"name": "p", "wrapped_keyroot": "00", "holder": "bench",
                "client_id": "bench"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        r["lock_id"].as_str().unwrap().to_owned()
    });
    let mut head = 0;
    println!(
        "| op  | clients | isr req/s | isr MB/s | nginx req/s | nginx MB/s | isr/nginx | isr commit ms |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for put in [false, true] {
        for c in CONCURRENCY {
            // Rounds alternate isr and nginx, best of each kept: a cell is never measured while the other's
            // writes are still being written back, since every run ends with an untimed `sync` and the PUT
            // files removed (nginx's PUTs are never synced by nginx itself; without this their write-back
            // would land in whichever cell came next).
            let (mut a_best, mut b_best, mut commit_best): (
                Option<common::Throughput>,
                Option<common::Throughput>,
                f64,
            ) = (None, None, f64::MAX);
            for _ in 0..ROUNDS {
                let first = common::fresh_seq();
                let mut a =
                    client_rt.block_on(measure(isr.clone(), put, c, secs, tags.clone(), base.clone()));
                if put {
                    // The check-in's commit: every chunk of the cell made durable, checked and referenced.
                    let v = version_of(&base, first..common::fresh_seq());
                    let t = client_rt.block_on(commit(&url, isr.token.as_ref().unwrap(), &lock_id, head, v));
                    head += 1;
                    let share = a.secs / (a.secs + t);
                    a.rps *= share;
                    a.mbps *= share;
                    commit_best = commit_best.min(t);
                }
                settle(&data);
                let b = client_rt.block_on(measure(ngx.clone(), put, c, secs, tags.clone(), base.clone()));
                settle(&data);
                if a_best.as_ref().is_none_or(|x| a.rps > x.rps) {
                    a_best = Some(a);
                }
                if b_best.as_ref().is_none_or(|x| b.rps > x.rps) {
                    b_best = Some(b);
                }
            }
            let (a, b) = (a_best.unwrap(), b_best.unwrap());
            let commit_ms = if put { format!("{:.0}", commit_best * 1e3) } else { "-".to_owned() };
            println!(
                "| {} | {c} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {commit_ms} |",
                if put { "PUT" } else { "GET" },
                a.rps,
                a.mbps,
                b.rps,
                b.mbps,
                a.rps / b.rps
            );
        }
    }
    drop(nginx_child);
    drop(server_rt);
}
