//! Lookaside directories (`--lookaside DIR`): chunk files from a USB stick or another client's cache are used
//! before the server, each verified by its tag; a wrong one is ignored and the chunk comes from the server.

mod common;
use common::guest::*;
use common::*;

#[test]
fn an_export_from_a_full_lookaside_fetches_nothing_and_a_corrupt_file_comes_from_the_server() {
    let server = Server::start();
    let a = Client::new(&server, "alice");
    let scratch = tempfile::tempdir().unwrap();
    create_guest_parcel(&a, "vm", 128, scratch.path());
    let original = std::fs::read(scratch.path().join("vm-disk.img")).unwrap();
    let stick = scratch.path().join("stick");
    let files = server.copy_chunks_to(&stick);
    assert!(files.len() > 10, "the parcel has chunks: {}", files.len());

    // A fresh client with the stick: the disk comes whole from it, not one chunk from the server.
    let b = Client::new(&server, "alice");
    let before = server.chunks_fetched();
    let out = scratch.path().join("b.img");
    b.ok(&["--lookaside", stick.to_str().unwrap(), "export", "vm", "--output", out.to_str().unwrap()]);
    assert_eq!(server.chunks_fetched(), before, "chunks were fetched from the server despite the lookaside");
    assert!(std::fs::read(&out).unwrap() == original, "the exported disk differs from the original");

    // Without the stick the same export asks the server for every chunk (the counter above can count).
    // The chunks come in batches: fewer requests than chunks.
    let c = Client::new(&server, "alice");
    let (before, requests_before) = (server.chunks_fetched(), server.fetch_requests());
    let plain = scratch.path().join("c.img");
    c.ok(&["export", "vm", "--output", plain.to_str().unwrap()]);
    let (fetched, requests) = (server.chunks_fetched() - before, server.fetch_requests() - requests_before);
    assert!(fetched >= 4, "an export without lookaside fetched {fetched} chunks");
    assert!(requests < fetched, "{fetched} chunks took {requests} requests: not batched");

    // Every file on the stick altered by one byte in the middle: each is ignored (it fails its tag) and
    // its chunk comes from the server instead; the data is still right. ISR_LOOKASIDE works like the option.
    for f in &files {
        let mut bytes = std::fs::read(f).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x40;
        std::fs::write(f, bytes).unwrap();
    }
    let d = Client::new(&server, "alice");
    let before = server.chunks_fetched();
    let out = scratch.path().join("d.img");
    let done = d
        .cmd(&["export", "vm", "--output", out.to_str().unwrap()])
        .env("ISR_LOOKASIDE", format!("/nonexistent:{}", stick.display()))
        .output()
        .unwrap();
    assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
    assert!(std::fs::read(&out).unwrap() == original, "a corrupt lookaside file changed the data");
    let all_from_server = server.chunks_fetched() - before;
    assert!(all_from_server > 0, "the corrupt files were used or nothing was fetched");
    assert!(std::fs::read(&plain).unwrap() == original);

    // One corrupt file among good ones: exactly that chunk comes from the server.
    let e = Client::new(&server, "alice");
    let fresh = scratch.path().join("stick2");
    let files = server.copy_chunks_to(&fresh);
    let before = server.chunks_fetched();
    e.ok(&["--lookaside", fresh.to_str().unwrap(), "export", "vm", "--output", out.to_str().unwrap()]);
    assert_eq!(server.chunks_fetched(), before);
    let victim = files
        .iter()
        .find(|f| {
            // a chunk of the disk: it is in e's cache now, and the export reads it
            e.home
                .path()
                .join("cache")
                .join(f.parent().unwrap().file_name().unwrap())
                .join(f.file_name().unwrap())
                .exists()
        })
        .expect("a disk chunk")
        .clone();
    let mut bytes = std::fs::read(&victim).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 1;
    std::fs::write(&victim, bytes).unwrap();
    let f = Client::new(&server, "alice");
    let before = server.chunks_fetched();
    let out = scratch.path().join("f.img");
    f.ok(&["--lookaside", fresh.to_str().unwrap(), "export", "vm", "--output", out.to_str().unwrap()]);
    assert_eq!(server.chunks_fetched() - before, 1, "exactly the corrupt chunk comes from the server");
    assert!(std::fs::read(&out).unwrap() == original);
}
