//! `isr disk` as an NBD export for tools beyond QEMU's block layer: block status (`base:allocation`) tells
//! zero chunks apart from data without reading them, `qemu-img map` sees them as holes, a guest's writes show
//! up before a flush, and NBD_CMD_CACHE fetches into the cache.

mod common;
use common::*;
use std::process::Command;

/// `qemu-img map --output=json` of the export: (start, length, data, zero) per extent.
fn map(sock: &std::path::Path) -> Vec<(u64, u64, bool, bool)> {
    let out = Command::new("qemu-img")
        .args(["map", "--output=json", "-f", "raw"])
        .arg(format!("nbd+unix:///?socket={}", sock.display()))
        .output()
        .expect("qemu-img (qemu-utils)");
    assert!(out.status.success(), "qemu-img map: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["data"].as_bool().unwrap(),
                e["zero"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// Whether byte range [a, b) is reported as data everywhere (`true`) or as zero holes everywhere (`false`).
fn all(map: &[(u64, u64, bool, bool)], a: u64, b: u64, data: bool) -> bool {
    map.iter()
        .filter(|(s, l, _, _)| s + l > a && *s < b)
        .all(|&(_, _, d, z)| if data { d && !z } else { !d && z })
}

#[test]
fn block_status_shows_zero_chunks_as_holes_and_cache_fetches() {
    let server = Server::start();
    let a = Client::new(&server, "alice");
    let scratch = tempfile::tempdir().unwrap();
    let img = scratch.path().join("disk.img");
    make_image(&img, 256 << 20); // data 0..4 MiB and 64..65 MiB, zeros elsewhere
    a.ok(&["create", "d", "--disk", img.to_str().unwrap()]);

    // A fresh client: nothing cached, yet the map needs no chunk (it comes from the keyring).
    let b = Client::new(&server, "alice");
    let sock = scratch.path().join("d.sock");
    let disk = b.disk("d", &sock);
    let before = server.chunks_fetched();
    let m = map(&sock);
    assert_eq!(server.chunks_fetched(), before, "block status fetched chunks");
    assert!(all(&m, 0, 4 << 20, true), "{m:?}");
    assert!(all(&m, 4 << 20, 64 << 20, false), "{m:?}");
    assert!(all(&m, 64 << 20, 65 << 20, true), "{m:?}");
    assert!(all(&m, 65 << 20, 256 << 20, false), "{m:?}");

    // Writes show up at once (before any flush), zeroing whole chunks makes holes again.
    let (ok, text) = qemu_io(&sock, &["write -P 0x5a 100M 1M", "write -z 0 4M"]);
    assert!(ok, "{text}");
    let m = map(&sock);
    assert!(all(&m, 100 << 20, 101 << 20, true), "{m:?}");
    assert!(all(&m, 0, 4 << 20, false), "{m:?}");

    // libnbd (another client implementation) sees the flags, and NBD_CMD_CACHE of the 64 MiB text region
    // fetches its chunks once; reading it afterwards fetches nothing.
    let before = server.chunks_fetched();
    let script = "assert h.can_cache()\nassert h.can_multi_conn()\nassert h.can_fast_zero()\n\
                  assert h.can_meta_context('base:allocation')\nh.cache(1024 * 1024, 64 * 1024 * 1024)\n";
    // Debian's python3 (nbdsh's module is installed for it, not for another python3 on the PATH).
    let out = Command::new("/usr/bin/python3")
        .args(["-m", "nbd", "--base-allocation", "-u"])
        .arg(format!("nbd+unix:///?socket={}", sock.display()))
        .args(["-c", script])
        .output()
        .expect("nbdsh (libnbd-bin, python3-libnbd)");
    assert!(out.status.success(), "nbdsh: {}", String::from_utf8_lossy(&out.stderr));
    let cached = server.chunks_fetched() - before;
    assert_eq!(cached, 8, "1 MiB of 128 KiB chunks, each fetched once");
    let (ok, text) = qemu_io(&sock, &["read -P 0x74 64M 1"]); // the "t" of "the"
    assert!(ok, "{text}");
    assert_eq!(server.chunks_fetched() - before, cached, "a read after the cache request fetched again");
    stop_disk(disk);
}
