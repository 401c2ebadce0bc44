//! `make demo`: build a parcel from a generated disk image into a local chunk store, read it back and verify.
//!
//! A stand-in until the server/client story exists: it exercises the whole parcel format (chunk codec,
//! keyring, manifest, password-wrapped keyroot) against a filesystem chunk store in a temporary directory.
//!
//! `cargo run --release -p isr-format --example demo [-- SIZE_MIB]` (default 512).

#[path = "../tests/common/imagegen.rs"]
mod imagegen;
#[path = "../tests/common/pipeline.rs"]
mod pipeline;

use bytes::Bytes;
use imagegen::{Image, Mix};
use isr_format::keys::KdfParams;
use isr_format::{
    Binding, ChunkDecoder, ChunkEncoder, ChunkIndex, ChunkSize, ConvergenceSecret, ImageLen, ImageRef,
    Keyring, Keyroot, LegacyManifest, Manifest, Tag, UserSecrets, VmDescription, WrappedKeyroot,
};
use isr_store::{ChunkStore, Durability, FsChunkStore, VerifyingStore};
use pipeline::{pipeline, threads};
use std::collections::HashSet;
use std::time::Instant;

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mib: u64 = std::env::args().nth(1).map(|a| a.parse()).transpose()?.unwrap_or(512);
    let cs = ChunkSize::DEFAULT;
    // Chunk-aligned regions of 4 MiB, about one in eight a copy of an earlier one: zero, random, text and
    // binary-like data, as on a real disk.
    let image = Image { seed: 7, len: mib << 20, region: 4 << 20, mix: Mix::Varied };
    let n = cs.chunk_count(ImageLen(image.len));
    let dir = tempfile::tempdir()?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let store = VerifyingStore::new(FsChunkStore::open(dir.path().join("chunks"), Durability::Rename)?);
    println!(
        "isr demo: {mib} MiB disk image, {n} chunks of {cs}, {} threads, store in {}",
        threads(),
        dir.path().display()
    );

    // --- create: chunk, encode, store; keyring; manifest; keyroot wrapped by the password ---
    let secret = ConvergenceSecret::random();
    let t = Instant::now();
    let mut keyring = Keyring::new(cs, ImageLen(image.len))?;
    let mut hasher = blake3::Hasher::new();
    let (mut new_chunks, mut new_bytes) = (0u64, 0u64);
    pipeline(
        n,
        threads(),
        || (ChunkEncoder::new(secret.clone()), vec![0u8; cs.as_usize()]),
        |(enc, buf), i| {
            let buf = &mut buf[..cs.chunk_len(ImageLen(image.len), ChunkIndex(i))];
            image.fill(cs.offset_of(ChunkIndex(i)).0, buf);
            let e = enc.encode(buf).expect("chunk within size limits");
            let stored = e.as_ref().map(|e| {
                let new = rt.block_on(store.put(&e.tag, Bytes::from(e.stored.clone()))).expect("store chunk");
                (new, e.stored.len() as u64)
            });
            (e.map(|e| (e.tag, e.key)), stored, buf.to_vec())
        },
        |i, (entry, stored, plain)| {
            keyring.set(ChunkIndex(i), entry);
            if let Some((true, len)) = stored {
                new_chunks += 1;
                new_bytes += len;
            }
            hasher.update(&plain);
        },
    );
    let create_time = t.elapsed();
    let t = Instant::now();
    store.inner().sync_all()?;
    let sync_time = t.elapsed();
    let original = hasher.finalize();

    let keyroot = Keyroot::random();
    let sealed_keyring = keyring.seal(&keyroot);
    let manifest = Manifest {
        vm: VmDescription { memory_mib: 512, cpus: 1, append: None, devices: Default::default() },
        chunk_size: cs,
        disk: ImageRef { len: ImageLen(image.len), keyring: Tag::of(&sealed_keyring) },
        memory: None,
        kernel: None,
        initrd: None,
        created_unix: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() as i64,
        comment: "isr demo".into(),
    };
    let binding = Binding::new("demo", "demo-parcel", 1);
    let sealed_manifest = manifest.seal(&keyroot, &binding)?;
    let user = UserSecrets::derive("demo", "demo password", KdfParams::DEFAULT)?;
    let wrapped = WrappedKeyroot::wrap(&keyroot, &user.wrap);
    std::fs::write(dir.path().join("keyring"), &sealed_keyring)?;
    std::fs::write(dir.path().join("manifest"), &sealed_manifest)?;
    std::fs::write(dir.path().join("keyroot"), &wrapped.0)?;

    // --- read back: unwrap the keyroot, verify the manifest and keyring, fetch and decode every chunk ---
    let t = Instant::now();
    let user = UserSecrets::derive("demo", "demo password", KdfParams::DEFAULT)?;
    let keyroot = WrappedKeyroot(std::fs::read(dir.path().join("keyroot"))?).unwrap(&user.wrap)?;
    let manifest = Manifest::open_bound(
        &std::fs::read(dir.path().join("manifest"))?,
        &keyroot,
        &binding,
        LegacyManifest::Refuse,
    )?
    .manifest;
    let keyring_bytes = std::fs::read(dir.path().join("keyring"))?;
    if Tag::of(&keyring_bytes) != manifest.disk.keyring {
        return Err("keyring does not match the manifest".into());
    }
    let keyring = Keyring::open(&keyring_bytes, &keyroot)?;
    let mut hasher = blake3::Hasher::new();
    pipeline(
        keyring.chunk_count(),
        threads(),
        ChunkDecoder::new,
        |dec, i| {
            let mut out = vec![0u8; keyring.chunk_len(ChunkIndex(i))];
            if let Some((tag, key)) = keyring.get(ChunkIndex(i)) {
                let stored = rt.block_on(store.get(&tag)).expect("read chunk").expect("chunk present");
                dec.decode_into(&tag, key, &stored, &mut out).expect("chunk verifies");
            }
            out
        },
        |_, plain| {
            hasher.update(&plain);
        },
    );
    let read_time = t.elapsed();
    let read_back = hasher.finalize();

    // --- report ---
    let tags = keyring.tags();
    let zero = tags.iter().filter(|t| t.is_zero()).count() as u64;
    let distinct: HashSet<&Tag> = tags.iter().filter(|t| !t.is_zero()).collect();
    let distinct = distinct.len() as u64;
    let on_disk: u64 = rt.block_on(store.list())?.iter().map(|(_, len)| len).sum();
    let chunk_bytes = cs.bytes() as u64;
    let dup = n - zero - distinct;
    println!();
    println!("image            {:>12}  ({n} chunks)", mb(image.len));
    println!("zero chunks      {:>12}  ({zero} chunks, not stored)", mb(zero * chunk_bytes));
    println!("duplicate chunks {:>12}  ({dup} chunks, stored once)", mb(dup * chunk_bytes));
    println!("distinct chunks  {:>12}  ({distinct} chunks)", mb(distinct * chunk_bytes));
    println!(
        "stored           {:>12}  ({:.1}% of the image; {new_chunks} files, {})",
        mb(on_disk),
        on_disk as f64 * 100.0 / image.len as f64,
        mb(new_bytes)
    );
    println!(
        "keyring          {:>12}  manifest {} bytes, wrapped keyroot {} bytes",
        mb(sealed_keyring.len() as u64),
        sealed_manifest.len(),
        wrapped.0.len()
    );
    println!(
        "savings          zero {:.1}%, dedup {:.1}%, compression {:.1}% of the image",
        (zero * chunk_bytes) as f64 * 100.0 / image.len as f64,
        (dup * chunk_bytes) as f64 * 100.0 / image.len as f64,
        (distinct * chunk_bytes).saturating_sub(on_disk) as f64 * 100.0 / image.len as f64
    );
    println!(
        "create           {:>9.0} MB/s  ({:.2} s: generate, encode, store, {} threads)",
        image.len as f64 / 1e6 / create_time.as_secs_f64(),
        create_time.as_secs_f64(),
        threads()
    );
    println!(
        "sync to disk      {:>9.2} s     (fsync of every chunk file and directory)",
        sync_time.as_secs_f64()
    );
    println!(
        "read back        {:>9.0} MB/s  ({:.2} s: unwrap, verify, fetch, decode)",
        image.len as f64 / 1e6 / read_time.as_secs_f64(),
        read_time.as_secs_f64()
    );
    println!("image BLAKE3     {}", original.to_hex());
    if read_back != original {
        println!("read back BLAKE3 {}  MISMATCH", read_back.to_hex());
        return Err("read-back image differs from the original".into());
    }
    println!("read back BLAKE3 identical: OK");
    Ok(())
}
