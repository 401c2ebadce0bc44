//! Deterministic synthetic disk images, generated piece by piece so a large image never has to be in memory.
//!
//! Shared by the round-trip test, the codec benchmark and the demo (included with `#[path]`). An image is a
//! sequence of fixed-size regions; each region has a kind (zero, random, repeated text, binary-like code) and a
//! content id. Regions with the same content id and kind are byte-identical, so an image whose region size is a
//! multiple of the chunk size contains duplicate chunks, as real disks do. Any 4 KiB-aligned range can be
//! generated on its own: [`Image::fill`] is random access.

#![allow(dead_code)]

/// 4 KiB: the unit of generation; offsets and lengths passed to [`Image::fill`] are multiples of it.
pub const BLOCK: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Zero,
    Random,
    Text,
    Binary,
}

/// How region kinds are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mix {
    /// Pseudo-random kinds (each about 25%), with about one region in eight a copy of an earlier one.
    Varied,
    /// Exactly 50% binary-like, 25% zero, 25% random (repeating B Z B R), no duplicates: the benchmark's
    /// "mixed" disk.
    Bench,
}

#[derive(Clone, Copy, Debug)]
pub struct Image {
    pub seed: u64,
    pub len: u64,
    /// Region size in bytes, a multiple of [`BLOCK`].
    pub region: u64,
    pub mix: Mix,
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A small fast PRNG (wyrand).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let t = (self.0 as u128).wrapping_mul((self.0 ^ 0xe703_7ed1_a0b4_28db) as u128);
        ((t >> 64) as u64) ^ (t as u64)
    }
    fn below(&mut self, n: u64) -> u64 {
        ((self.next() as u128 * n as u128) >> 64) as u64
    }
}

const WORDS: &[&str] = &[
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "for",
    "that",
    "with",
    "on",
    "as",
    "by",
    "this",
    "be",
    "are",
    "from",
    "kernel",
    "module",
    "device",
    "driver",
    "memory",
    "page",
    "file",
    "system",
    "user",
    "error",
    "return",
    "config",
    "value",
    "buffer",
    "network",
    "packet",
    "interface",
    "address",
    "server",
    "client",
    "request",
    "version",
    "package",
    "library",
    "function",
    "struct",
    "static",
    "const",
    "void",
    "int",
    "char",
    "unsigned",
    "if",
    "else",
    "while",
    "switch",
    "case",
    "break",
    "default",
    "include",
    "define",
    "endif",
    "license",
    "copyright",
    "software",
    "warranty",
    "without",
    "debian",
];

impl Image {
    pub fn region_count(&self) -> u64 {
        self.len.div_ceil(self.region)
    }

    /// The kind and content id of region `r`.
    pub fn region(&self, r: u64) -> (Kind, u64) {
        match self.mix {
            Mix::Bench => {
                let kind = [Kind::Binary, Kind::Zero, Kind::Binary, Kind::Random][(r % 4) as usize];
                (kind, splitmix(self.seed ^ r))
            }
            Mix::Varied => {
                let h = splitmix(self.seed.wrapping_mul(31) ^ r);
                // One region in eight repeats an earlier region.
                if r >= 16 && (h >> 8).is_multiple_of(8) {
                    return self.region(r - 1 - (h >> 16) % 15);
                }
                ([Kind::Zero, Kind::Random, Kind::Text, Kind::Binary][(h & 3) as usize], h)
            }
        }
    }

    /// Fill `buf` with the image's bytes at `offset..offset + buf.len()`; both multiples of [`BLOCK`] except
    /// that `buf` may end at the end of the image.
    pub fn fill(&self, offset: u64, buf: &mut [u8]) {
        assert_eq!(offset % BLOCK as u64, 0, "offset must be block aligned");
        assert!(offset + buf.len() as u64 <= self.len, "range beyond the image");
        let mut pos = offset;
        for piece in buf.chunks_mut(BLOCK) {
            let r = pos / self.region;
            let (kind, content) = self.region(r);
            let block_in_region = (pos - r * self.region) / BLOCK as u64;
            fill_block(kind, splitmix(content ^ block_in_region.wrapping_mul(0x1000_0001)), piece);
            pos += piece.len() as u64;
        }
    }

    /// Bytes of each kind, for reports.
    pub fn composition(&self) -> [(Kind, u64); 4] {
        let mut out = [(Kind::Zero, 0), (Kind::Random, 0), (Kind::Text, 0), (Kind::Binary, 0)];
        for r in 0..self.region_count() {
            let len = self.region.min(self.len - r * self.region);
            let k = self.region(r).0;
            out.iter_mut().find(|(kk, _)| *kk == k).expect("every kind listed").1 += len;
        }
        out
    }
}

fn fill_block(kind: Kind, seed: u64, out: &mut [u8]) {
    match kind {
        Kind::Zero => out.fill(0),
        Kind::Random => blake3::Hasher::new().update(&seed.to_le_bytes()).finalize_xof().fill(out),
        Kind::Text => fill_text(seed, out),
        Kind::Binary => fill_binary(seed, out),
    }
}

/// Lines of words from a small vocabulary, with numbers: compresses about 3-4x at zstd level 1.
fn fill_text(seed: u64, out: &mut [u8]) {
    let mut rng = Rng(seed);
    let mut i = 0;
    let mut col = 0;
    while i < out.len() {
        let r = rng.next();
        let word: &[u8] = if r & 0xf == 0 {
            // A number: digits of the random value.
            let n = (r >> 8) % 100_000;
            let s = n.to_string();
            let take = s.len().min(out.len() - i);
            out[i..i + take].copy_from_slice(&s.as_bytes()[..take]);
            i += take;
            col += take;
            b""
        } else {
            WORDS[((r >> 8) % WORDS.len() as u64) as usize].as_bytes()
        };
        let take = word.len().min(out.len() - i);
        out[i..i + take].copy_from_slice(&word[..take]);
        i += take;
        col += take;
        if i < out.len() {
            out[i] = if col > 60 + (r >> 40) as usize % 20 {
                col = 0;
                b'\n'
            } else {
                col += 1;
                b' '
            };
            i += 1;
        }
    }
}

/// x86-64-like machine code (prologues, moves relative to rbp, calls with nearby targets, short jumps,
/// padding to 16 bytes) interleaved with pointer tables and symbol strings, as in executables and libraries:
/// compresses about 2-3x at zstd level 1, at about binary speed.
fn fill_binary(seed: u64, out: &mut [u8]) {
    let mut rng = Rng(seed);
    let mut w = Vec::with_capacity(out.len() + 64);
    let base = 0x5555_5555_0000u64 + (seed & 0xffff) * 0x1000;
    while w.len() < out.len() {
        match rng.below(16) {
            0 => {
                // A table of pointers into the same image.
                for _ in 0..2 + rng.below(12) {
                    w.extend_from_slice(&(base + rng.below(0x4000) * 8).to_le_bytes());
                }
            }
            1 => {
                // Symbol names.
                for _ in 0..1 + rng.below(4) {
                    w.extend_from_slice(b"_ZN");
                    w.extend_from_slice(WORDS[rng.below(WORDS.len() as u64) as usize].as_bytes());
                    w.push(b'_');
                    w.extend_from_slice(WORDS[rng.below(WORDS.len() as u64) as usize].as_bytes());
                    w.push(0);
                }
            }
            _ => {
                // A function.
                w.extend_from_slice(&[0x55, 0x48, 0x89, 0xe5, 0x48, 0x83, 0xec, (rng.below(16) * 8) as u8]);
                for _ in 0..3 + rng.below(20) {
                    let slot = 0x100 - 8 * (1 + rng.below(12)) as u16;
                    match rng.below(12) {
                        0 | 1 => w.extend_from_slice(&[0x48, 0x8b, 0x45, slot as u8]),
                        2 | 3 => w.extend_from_slice(&[0x48, 0x89, 0x45, slot as u8]),
                        4 => w.extend_from_slice(&[0x8b, 0x55, slot as u8]),
                        5 => {
                            let rel = (rng.below(0x20000) as i64 - 0x10000) as i32;
                            w.push(0xe8);
                            w.extend_from_slice(&rel.to_le_bytes());
                        }
                        6 => {
                            let rel = rng.below(0x40000) as i32;
                            w.extend_from_slice(&[0x48, 0x8d, 0x3d]);
                            w.extend_from_slice(&rel.to_le_bytes());
                        }
                        7 => w.extend_from_slice(&[0x85, 0xc0, 0x74, rng.below(0x40) as u8]),
                        8 => w.extend_from_slice(&[0x31, 0xc0]),
                        9 => w.extend_from_slice(&[0x48, 0x89, 0xc7]),
                        10 => {
                            w.push(0xb8);
                            w.extend_from_slice(&(rng.below(256) as u32).to_le_bytes());
                        }
                        _ => w.extend_from_slice(&[0x0f, 0xb6, 0x45, slot as u8]),
                    }
                }
                w.extend_from_slice(&[0xc9, 0xc3]);
                while w.len() % 16 != 0 {
                    w.push(0xcc);
                }
            }
        }
    }
    out.copy_from_slice(&w[..out.len()]);
}
