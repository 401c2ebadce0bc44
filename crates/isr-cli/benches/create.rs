//! `isr create` of a 512 MiB mixed image into a fresh server vs `restic backup` of the same image into a fresh
//! local repository, same run.
//!
//! Run: `cargo build --release --workspace --bins && cargo bench -p isr-cli --bench create`. Needs restic.

mod common;
use common::*;
use std::process::Command;
use std::time::{Duration, Instant};

const IMAGE: u64 = 512 * MIB;
const REPS: usize = 2;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    require_tool("restic", "apt-get install restic");
    println!("{}", load_note());
    let dir = scratch();
    let d = dir.path();
    let img = d.join("image.raw");
    make_mixed_image(&img, IMAGE, "isr bench image");
    let img_s = img.to_str().unwrap();

    let (mut isr_t, mut restic_t) = (Vec::<Duration>::new(), Vec::<Duration>::new());
    let mut isr_line = String::new();
    for rep in 0..REPS {
        // restic: fresh repository each time (init not timed), backup timed.
        let repo = d.join(format!("restic-{rep}"));
        let restic = |args: &[&str]| {
            let mut c = Command::new("restic");
            c.args(["--repo", repo.to_str().unwrap(), "--quiet", "--no-cache"])
                .args(args)
                .env("RESTIC_PASSWORD", PASSWORD);
            c
        };
        run(&mut restic(&["init"]), "restic init");
        let t = Instant::now();
        run(&mut restic(&["backup", img_s]), "restic backup");
        restic_t.push(t.elapsed());
        let _ = std::fs::remove_dir_all(&repo);

        // isr: fresh server and client home each time (user creation and login not timed: `isr auth` first).
        let server = Server::start(&d.join(format!("server-{rep}")));
        let c = Client::new(&server, &d.join(format!("home-{rep}")));
        c.ok(&["auth"]);
        let t = Instant::now();
        isr_line = c.ok(&["create", "p", "--disk", img_s]);
        isr_t.push(t.elapsed());
        drop(server);
        let _ = std::fs::remove_dir_all(d.join(format!("server-{rep}")));
        let _ = std::fs::remove_dir_all(d.join(format!("home-{rep}")));
    }
    eprintln!("isr {isr_t:?} ({}); restic {restic_t:?}", isr_line.trim());
    let i = mbps(IMAGE, *isr_t.iter().min().unwrap());
    let r = mbps(IMAGE, *restic_t.iter().min().unwrap());
    print_table(
        &format!("create / first backup of a {} MiB mixed image (wall clock, best of {REPS})", IMAGE / MIB),
        &["tool", "MB/s", "ratio isr/restic"],
        &[
            vec![
                "isr create (fresh server, loopback HTTP)".into(),
                format!("{i:.0}"),
                format!("{:.2}", i / r),
            ],
            vec![
                "restic 0.14 backup (fresh local repository, --no-cache)".into(),
                format!("{r:.0}"),
                "1.00".into(),
            ],
        ],
    );
}
