//! Codec benchmark: single-thread encode/decode of a "mixed" disk image through our chunk codec, against the
//! `zstd` command-line tool (level 1, one thread) on the same bytes in the same run, plus a per-stage
//! breakdown of where the codec's time goes.
//!
//! `cargo bench -p isr-format --bench codec`. Environment: `ISR_BENCH_MIB` (image size, default 256),
//! `ISR_BENCH_ROUNDS` (best of, default 3).

#[path = "../tests/common/imagegen.rs"]
mod imagegen;

use imagegen::{Image, Mix};
use isr_format::codec::{self, ChunkDecoder, ChunkEncoder, EncodedChunk, AEAD_TAG_LEN, HEADER_LEN};
use isr_format::{ChunkKey, ChunkSize, ConvergenceSecret, Tag};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use std::hint::black_box;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn best_of<T>(rounds: u64, mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut best = Duration::MAX;
    let mut last = None;
    for _ in 0..rounds {
        let t = Instant::now();
        let r = f();
        best = best.min(t.elapsed());
        last = Some(r);
    }
    (best, last.expect("at least one round"))
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

fn run_zstd(args: &[&str], input: &std::path::Path, output: std::fs::File) -> Duration {
    let t = Instant::now();
    let status = Command::new("zstd")
        .args(args)
        .arg(input)
        .stdout(output)
        .stderr(Stdio::inherit())
        .status()
        .expect("run zstd (apt-get install zstd, or `make deps`)");
    let d = t.elapsed();
    assert!(status.success(), "zstd {args:?} failed: {status}");
    d
}

fn main() {
    let mib = env_u64("ISR_BENCH_MIB", 256);
    let rounds = env_u64("ISR_BENCH_ROUNDS", 3).max(1);
    let cs = ChunkSize::DEFAULT.as_usize();
    let image = Image { seed: 0x015c_0dec, len: mib << 20, region: 4 << 20, mix: Mix::Bench };
    let len = image.len as usize;
    let mut data = vec![0u8; len];
    for (i, c) in data.chunks_mut(cs).enumerate() {
        image.fill((i * cs) as u64, c);
    }
    let comp: Vec<String> =
        image.composition().iter().map(|(k, b)| format!("{k:?} {}%", b * 100 / image.len)).collect();
    println!("image: {mib} MiB, {} chunks of {} KiB ({})", len / cs, cs >> 10, comp.join(", "));

    // --- our codec, whole path ---
    let secret = ConvergenceSecret([0x42; 32]);
    let mut enc = ChunkEncoder::new(secret.clone());
    let (enc_time, encoded) = best_of(rounds, || {
        data.chunks(cs).map(|c| enc.encode(c).expect("encode")).collect::<Vec<Option<EncodedChunk>>>()
    });
    let stored_bytes: u64 = encoded.iter().flatten().map(|e| e.stored.len() as u64).sum();
    let mut dec = ChunkDecoder::new();
    let mut out = vec![0xffu8; len];
    let (dec_time, ()) = best_of(rounds, || {
        for (e, o) in encoded.iter().zip(out.chunks_mut(cs)) {
            match e {
                Some(e) => dec.decode_into(&e.tag, &e.key, &e.stored, o).expect("decode"),
                None => o.fill(0),
            }
        }
    });
    assert!(out == data, "decoded image differs");
    drop(out);

    // --- the zstd tool on the same bytes ---
    let dir = tempfile::tempdir().expect("tempdir");
    let raw = dir.path().join("image.raw");
    let zst = dir.path().join("image.zst");
    std::fs::write(&raw, &data).expect("write image");
    let devnull = || std::fs::File::create("/dev/null").expect("/dev/null");
    let status = Command::new("zstd").args(["-1", "-T1", "-q", "-f", "-o"]).arg(&zst).arg(&raw).status();
    assert!(status.expect("zstd").success());
    let zst_bytes = std::fs::metadata(&zst).expect("zst").len();
    let (zc_time, _) = best_of(rounds, || run_zstd(&["-1", "-T1", "-q", "-c"], &raw, devnull()));
    let (zd_time, _) = best_of(rounds, || run_zstd(&["-d", "-T1", "-q", "-c"], &zst, devnull()));

    let n = len as u64;
    let (e, d, ze, zd) = (mbps(n, enc_time), mbps(n, dec_time), mbps(n, zc_time), mbps(n, zd_time));
    println!();
    println!("| codec (1 thread, best of {rounds}) | encode MB/s | decode MB/s | stored / image |");
    println!("| --- | ---: | ---: | ---: |");
    println!("| isr chunk codec | {e:.0} | {d:.0} | {:.1}% |", stored_bytes as f64 * 100.0 / n as f64);
    println!("| zstd -1 -T1 (CLI) | {ze:.0} | {zd:.0} | {:.1}% |", zst_bytes as f64 * 100.0 / n as f64);
    println!("| ratio isr / zstd | {:.2} | {:.2} | |", e / ze, d / zd);
    println!(
        "goal: encode >= 0.85x ({}), decode >= 0.80x ({})",
        if e / ze >= 0.85 { "met" } else { "NOT met" },
        if d / zd >= 0.80 { "met" } else { "NOT met" }
    );

    breakdown(&data, cs, &secret, &encoded, rounds, enc_time, dec_time);
}

/// Time each stage of encode and decode on its own, over the same chunks.
fn breakdown(
    data: &[u8],
    cs: usize,
    secret: &ConvergenceSecret,
    encoded: &[Option<EncodedChunk>],
    rounds: u64,
    enc_total: Duration,
    dec_total: Duration,
) {
    let chunks: Vec<&[u8]> = data.chunks(cs).collect();
    let nonzero: Vec<&[u8]> =
        chunks.iter().zip(encoded).filter(|(_, e)| e.is_some()).map(|(c, _)| *c).collect();
    let stored: Vec<&EncodedChunk> = encoded.iter().flatten().collect();
    let aead = |k: &ChunkKey| LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &k.0).expect("key"));

    let (t_zero, _) = best_of(rounds, || chunks.iter().filter(|c| codec::is_zero(c)).count());
    let (t_key, keys) =
        best_of(rounds, || nonzero.iter().map(|c| ChunkKey::derive(secret, c)).collect::<Vec<_>>());
    let mut zc = zstd::bulk::Compressor::new(codec::ZSTD_LEVEL).expect("zstd");
    let mut buf = vec![0u8; zstd::zstd_safe::compress_bound(cs) + HEADER_LEN + AEAD_TAG_LEN];
    let (t_zstd, _) = best_of(rounds, || {
        nonzero.iter().map(|c| zc.compress_to_buffer(c, &mut buf[..]).expect("compress")).sum::<usize>()
    });
    // AES-GCM over each chunk's actual payload length (compressed or raw), as the encoder does.
    let payload_lens: Vec<usize> =
        stored.iter().map(|e| e.stored.len() - HEADER_LEN - AEAD_TAG_LEN).collect();
    let (t_aes, _) = best_of(rounds, || {
        for (k, &n) in keys.iter().zip(&payload_lens) {
            let t = aead(k)
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key([0; 12]),
                    Aad::from(&[0u8; 12]),
                    &mut buf[..n],
                )
                .expect("seal");
            let _ = black_box(t);
        }
    });
    let (t_tag, _) = best_of(rounds, || {
        for e in &stored {
            black_box(Tag::of(&e.stored));
        }
    });

    let mut scratch = Vec::with_capacity(cs + 64);
    let (t_copy, _) = best_of(rounds, || {
        for e in &stored {
            scratch.clear();
            scratch.extend_from_slice(&e.stored[HEADER_LEN..]);
            black_box(&scratch);
        }
    });
    let mut sealed: Vec<Vec<u8>> = stored.iter().map(|e| e.stored[HEADER_LEN..].to_vec()).collect();
    let (t_open, _) = best_of(1, || {
        for (e, s) in stored.iter().zip(sealed.iter_mut()) {
            aead(&e.key)
                .open_in_place(Nonce::assume_unique_for_key([0; 12]), Aad::from(&e.stored[..HEADER_LEN]), s)
                .expect("open");
        }
    });
    // `sealed` now holds the plaintext payloads (compressed or raw) followed by the 16-byte GCM tags.
    let mut zd = zstd::bulk::Decompressor::new().expect("zstd");
    let mut out = vec![0u8; cs];
    let (t_unzstd, _) = best_of(rounds, || {
        for (e, p) in stored.iter().zip(&sealed) {
            let payload = &p[..p.len() - AEAD_TAG_LEN];
            if e.stored[6] == codec::COMPRESSION_ZSTD {
                zd.decompress_to_buffer(payload, &mut out[..]).expect("decompress");
            } else {
                out[..payload.len()].copy_from_slice(payload);
            }
        }
    });
    let zero_chunks = encoded.iter().filter(|e| e.is_none()).count();
    let (t_fill, _) = best_of(rounds, || {
        for _ in 0..zero_chunks {
            out.fill(0);
            black_box(&out);
        }
    });

    let n = data.len() as u64;
    let nz: u64 = nonzero.iter().map(|c| c.len() as u64).sum();
    let st: u64 = stored.iter().map(|e| e.stored.len() as u64).sum();
    let row = |name: &str, t: Duration, bytes: u64, total: Duration| {
        println!(
            "| {name} | {:.1} | {:.0}% | {:.0} MB/s over {:.0} MB |",
            t.as_secs_f64() * 1e3,
            t.as_secs_f64() * 100.0 / total.as_secs_f64(),
            mbps(bytes, t),
            bytes as f64 / 1e6
        )
    };
    println!();
    println!(
        "encode breakdown (each stage alone; share of the measured total {:.1} ms)",
        enc_total.as_secs_f64() * 1e3
    );
    println!("| stage | ms | share | throughput |");
    println!("| --- | ---: | ---: | ---: |");
    row("zero check (all chunks)", t_zero, n, enc_total);
    row("chunk key: keyed BLAKE3 (non-zero chunks)", t_key, nz, enc_total);
    row("zstd -1 (non-zero chunks)", t_zstd, nz, enc_total);
    row("AES-256-GCM seal (payloads)", t_aes, st, enc_total);
    row("tag: BLAKE3 (stored chunks)", t_tag, st, enc_total);
    let sum = t_zero + t_key + t_zstd + t_aes + t_tag;
    println!(
        "| sum of stages | {:.1} | {:.0}% | |",
        sum.as_secs_f64() * 1e3,
        sum.as_secs_f64() * 100.0 / enc_total.as_secs_f64()
    );
    println!();
    println!("decode breakdown (share of the measured total {:.1} ms)", dec_total.as_secs_f64() * 1e3);
    println!("| stage | ms | share | throughput |");
    println!("| --- | ---: | ---: | ---: |");
    row("tag check: BLAKE3 (stored chunks)", t_tag, st, dec_total);
    row("copy ciphertext to scratch", t_copy, st, dec_total);
    row("AES-256-GCM open (1 round)", t_open, st, dec_total);
    row("zstd decompress / raw copy", t_unzstd, nz, dec_total);
    row("zero fill (zero chunks)", t_fill, n - nz, dec_total);
    let sum = t_tag + t_copy + t_open + t_unzstd + t_fill;
    println!(
        "| sum of stages | {:.1} | {:.0}% | |",
        sum.as_secs_f64() * 1e3,
        sum.as_secs_f64() * 100.0 / dec_total.as_secs_f64()
    );
}
