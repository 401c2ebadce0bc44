//! End-to-end round trip of a 1 GiB image through the codec, a keyring and a filesystem chunk store.
//!
//! The image is generated piece by piece (never whole in memory), encoded on several threads (one encoder
//! each), stored in an `FsChunkStore`, described by a sealed and reopened keyring, and read back through a
//! verifying store: the BLAKE3 of the read-back image must equal the original's. Then: a 1 MiB change at an
//! unaligned offset changes exactly the tags of the chunks it touches; a second parcel of the same image
//! under another keyroot stores no new chunk file; a flipped byte in a chunk file is an integrity error.
//!
//! `ISR_ROUNDTRIP_MIB` overrides the image size for experiments (default 1024); CI runs the default.

#[path = "common/imagegen.rs"]
mod imagegen;
#[path = "common/pipeline.rs"]
mod pipeline;

use bytes::Bytes;
use imagegen::{Image, Mix};
use isr_format::codec::ChunkError;
use isr_format::{
    ByteOffset, ChunkDecoder, ChunkEncoder, ChunkIndex, ChunkKey, ChunkSize, ConvergenceSecret, ImageLen,
    Keyring, KeyringTags, Keyroot, Tag,
};
use isr_store::{ChunkStore, Durability, FsChunkStore, StoreError, VerifyingStore};
use pipeline::pipeline;
use std::collections::HashSet;
use std::time::Instant;

const CHUNK: ChunkSize = ChunkSize::DEFAULT;

use pipeline::threads;

fn chunk_count(len: u64) -> u64 {
    CHUNK.chunk_count(ImageLen(len))
}

fn chunk_files(store: &FsChunkStore) -> usize {
    let mut n = 0;
    for d in std::fs::read_dir(store.root()).unwrap().flatten() {
        if d.file_name() != "tmp" && d.path().is_dir() {
            n += std::fs::read_dir(d.path()).unwrap().count();
        }
    }
    n
}

struct Encoded {
    keyring: Keyring,
    image_hash: blake3::Hash,
    new_files: u64,
    stored_bytes: u64,
}

/// Encode every chunk of `image` (with `modify` applied to each chunk's bytes at its offset), optionally
/// storing them, on several threads.
fn encode_image(
    image: &Image,
    secret: &ConvergenceSecret,
    store: Option<(&FsChunkStore, &tokio::runtime::Handle)>,
    modify: &(dyn Fn(u64, &mut [u8]) + Sync),
    hash: bool,
) -> Encoded {
    let mut keyring = Keyring::new(CHUNK, ImageLen(image.len)).unwrap();
    let mut hasher = blake3::Hasher::new();
    let (mut new_files, mut stored_bytes) = (0, 0);
    pipeline(
        chunk_count(image.len),
        threads(),
        || (ChunkEncoder::new(secret.clone()), vec![0u8; CHUNK.as_usize()]),
        |(enc, buf), i| {
            let off = CHUNK.offset_of(ChunkIndex(i)).0;
            let len = CHUNK.chunk_len(ImageLen(image.len), ChunkIndex(i));
            let buf = &mut buf[..len];
            image.fill(off, buf);
            modify(off, buf);
            let encoded = enc.encode(buf).unwrap();
            let mut put = (false, 0);
            if let (Some(e), Some((store, rt))) = (&encoded, store) {
                let n = e.stored.len() as u64;
                put = (rt.block_on(store.put(&e.tag, Bytes::from(e.stored.clone()))).unwrap(), n);
            }
            let entry = encoded.map(|e| (e.tag, e.key));
            // The plaintext goes to the sink only to be hashed in order.
            (entry, put, hash.then(|| buf.to_vec()))
        },
        |i, (entry, (new, n), plain)| {
            keyring.set(ChunkIndex(i), entry);
            if let Some(plain) = plain {
                hasher.update(&plain);
            }
            if new {
                new_files += 1;
                stored_bytes += n;
            }
        },
    );
    Encoded { keyring, image_hash: hasher.finalize(), new_files, stored_bytes }
}

fn no_change(_: u64, _: &mut [u8]) {}

#[test]
fn one_gib_image_round_trips_through_the_store() {
    let total = Instant::now();
    let mib: u64 = std::env::var("ISR_ROUNDTRIP_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(1024);
    // Regions of 3 MiB + 12 KiB: not chunk aligned, so many chunks mix two kinds of data.
    let image = Image { seed: 2026, len: mib << 20, region: (3 << 20) + 12 * 1024, mix: Mix::Varied };
    let n = chunk_count(image.len);
    let secret = ConvergenceSecret(*blake3::hash(b"round trip convergence secret").as_bytes());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let fs = FsChunkStore::open(dir.path().join("chunks"), Durability::Rename).unwrap();
    println!("image {mib} MiB, {n} chunks, {} threads, composition {:?}", threads(), image.composition());

    // 1. Encode and store.
    let t = Instant::now();
    let first = encode_image(&image, &secret, Some((&fs, rt.handle())), &no_change, true);
    let files = chunk_files(&fs);
    let distinct: HashSet<Tag> = first.keyring.tags().iter().copied().filter(|t| !t.is_zero()).collect();
    let zero = first.keyring.tags().iter().filter(|t| t.is_zero()).count();
    println!(
        "encode+store: {:.1} s ({:.0} MB/s); {files} files, {} MB stored, {zero} zero chunks, {} duplicate chunks",
        t.elapsed().as_secs_f64(),
        image.len as f64 / 1e6 / t.elapsed().as_secs_f64(),
        first.stored_bytes / 1_000_000,
        n as usize - zero - distinct.len()
    );
    assert_eq!(files, distinct.len(), "one file per distinct non-zero chunk");
    assert_eq!(first.new_files as usize, files);
    assert!(zero > 0 && distinct.len() > n as usize / 2, "the image mixes zero and data chunks");

    // 2. Seal and reopen the keyring; the server's view has the same tags.
    let keyroot = Keyroot(*blake3::hash(b"round trip keyroot").as_bytes());
    let sealed = first.keyring.seal(&keyroot);
    assert_eq!(sealed.len(), 32 + 64 * n as usize + 16 + 32);
    let keyring = Keyring::open(&sealed, &keyroot).unwrap();
    assert_eq!(keyring, first.keyring);
    assert_eq!(KeyringTags::parse(&sealed).unwrap().tags, first.keyring.tags());

    // 3. Read every chunk back through a verifying store and compare the whole image.
    let t = Instant::now();
    let store = VerifyingStore::new(fs.clone());
    let mut hasher = blake3::Hasher::new();
    pipeline(
        n,
        threads(),
        ChunkDecoder::new,
        |dec, i| {
            let idx = ChunkIndex(i);
            let mut out = vec![0u8; keyring.chunk_len(idx)];
            if let Some((tag, key)) = keyring.get(idx) {
                let stored = rt.block_on(store.get(&tag)).unwrap().expect("chunk present");
                dec.decode_into(&tag, key, &stored, &mut out).unwrap();
            }
            out
        },
        |_, plain| {
            hasher.update(&plain);
        },
    );
    let read_back = hasher.finalize();
    println!(
        "read back: {:.1} s ({:.0} MB/s)",
        t.elapsed().as_secs_f64(),
        image.len as f64 / 1e6 / t.elapsed().as_secs_f64()
    );
    assert_eq!(read_back, first.image_hash, "read-back image differs from the original");

    // 4. Change 1 MiB at an unaligned offset: exactly the touched chunks change, and only they are new.
    let t = Instant::now();
    let (at, len) = (image.len / 3 + 12_345, 1u64 << 20);
    let modify = move |off: u64, buf: &mut [u8]| {
        let (start, end) = (at.max(off), (at + len).min(off + buf.len() as u64));
        for p in start..end {
            // Never zero and different at every position, so no two changed chunks become equal.
            buf[(p - off) as usize] ^= (p.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8 | 1;
        }
    };
    let changed = encode_image(&image, &secret, Some((&fs, rt.handle())), &modify, false);
    let touched: Vec<ChunkIndex> = CHUNK.chunks_in_range(ByteOffset(at), len).map(ChunkIndex).collect();
    assert_eq!(touched.len(), 9, "1 MiB at an unaligned offset touches 9 chunks of 128 KiB");
    assert_eq!(changed.keyring.diff(&keyring), touched);
    assert_eq!(changed.new_files, touched.len() as u64, "only the touched chunks are new");
    println!("modified image: {:.1} s, diff {:?}", t.elapsed().as_secs_f64(), touched);

    // 5. A second parcel from the same image, under another keyroot: no new chunk file.
    let t = Instant::now();
    let before = chunk_files(&fs);
    let second = encode_image(&image, &secret, Some((&fs, rt.handle())), &no_change, false);
    assert_eq!(second.new_files, 0);
    assert_eq!(chunk_files(&fs), before, "dedup across parcels: no new chunk file");
    let keyroot2 = Keyroot(*blake3::hash(b"second parcel keyroot").as_bytes());
    let sealed2 = second.keyring.seal(&keyroot2);
    assert_eq!(
        KeyringTags::parse(&sealed2).unwrap().tags,
        keyring.tags(),
        "same tags: the chunks are shared"
    );
    assert!(
        Keyring::open(&sealed2, &keyroot).is_err(),
        "but each parcel's keys are sealed under its own keyroot"
    );
    assert_eq!(Keyring::open(&sealed2, &keyroot2).unwrap(), keyring);
    println!("second parcel: {:.1} s, {before} files before and after", t.elapsed().as_secs_f64());

    // 6. Tampering with a stored chunk file is an integrity error on read-back.
    let (idx, tag, key) = (0..n)
        .find_map(|i| keyring.get(ChunkIndex(i)).map(|(t, k)| (ChunkIndex(i), t, k.clone())))
        .expect("a data chunk");
    tamper_is_detected(&rt, &fs, &store, &keyring, idx, tag, &key);

    println!("total {:.1} s", total.elapsed().as_secs_f64());
}

fn tamper_is_detected(
    rt: &tokio::runtime::Runtime,
    fs: &FsChunkStore,
    store: &VerifyingStore<FsChunkStore>,
    keyring: &Keyring,
    idx: ChunkIndex,
    tag: Tag,
    key: &ChunkKey,
) {
    let path = fs.path_of(&tag);
    let good = std::fs::read(&path).unwrap();
    let mut bad = good.clone();
    let at = bad.len() / 2;
    bad[at] ^= 0x01;
    std::fs::write(&path, &bad).unwrap();
    let len = keyring.chunk_len(idx);
    match rt.block_on(store.get(&tag)) {
        Err(StoreError::Integrity { tag: t, source: ChunkError::TagMismatch { .. } }) => assert_eq!(t, tag),
        other => panic!("tampered chunk read back as {other:?}"),
    }
    // Read around the verifying store: the decoder's own checks catch it too.
    let raw = rt.block_on(fs.get(&tag)).unwrap().unwrap();
    let mut out = vec![0u8; len];
    assert!(matches!(
        ChunkDecoder::new().decode_into(&tag, key, &raw, &mut out),
        Err(ChunkError::TagMismatch { .. })
    ));
    std::fs::write(&path, &good).unwrap();
    assert!(rt.block_on(store.get(&tag)).unwrap().is_some());
}
