//! The x86-64 backend: AES-NI instructions, eight blocks in flight, each tweak made in a register from the
//! one before (as OpenSSL and the Linux kernel do) rather than in a table.
#![allow(unsafe_code)]

use core::arch::x86_64::*;

use super::SECTOR;

/// Round keys: encryption and decryption of the data key, encryption of the tweak key.
pub struct Keys {
    enc: [__m128i; 15],
    dec: [__m128i; 15],
    tweak: [__m128i; 15],
}

impl Keys {
    /// The round keys of `key` (data key, then tweak key), or `None` without AES-NI.
    pub fn new(key: &[u8; 64]) -> Option<Keys> {
        if !std::arch::is_x86_feature_detected!("aes") {
            return None;
        }
        // SAFETY: the CPU has AES-NI (checked above); SSE2 is part of x86-64.
        Some(unsafe { Keys::expand(key) })
    }

    #[target_feature(enable = "aes")]
    fn expand(key: &[u8; 64]) -> Keys {
        let enc = expand256(key[..32].try_into().expect("32"));
        let tweak = expand256(key[32..].try_into().expect("32"));
        let mut dec = [_mm_setzero_si128(); 15];
        dec[0] = enc[14];
        for r in 1..14 {
            dec[r] = _mm_aesimc_si128(enc[14 - r]);
        }
        dec[14] = enc[0];
        Keys { enc, dec, tweak }
    }

    /// Encrypt whole sectors in place; the first is sector `first`.
    pub fn encrypt_sectors(&self, area: &mut [u8], first: u128) {
        assert!(area.len().is_multiple_of(SECTOR));
        let p = area.as_mut_ptr();
        // SAFETY: `Keys` exists only where the CPU has AES-NI; source and destination are the same
        // `area.len()` bytes, which `area` borrows mutably.
        unsafe { self.sectors::<true>(p, p, area.len(), first) }
    }

    /// Encrypt whole sectors of `plain` into `out` (the same length).
    pub fn encrypt_sectors_from(&self, plain: &[u8], out: &mut [u8], first: u128) {
        assert_eq!(plain.len(), out.len());
        assert!(plain.len().is_multiple_of(SECTOR));
        // SAFETY: as above; `plain` and `out` are distinct borrows of `plain.len()` bytes each.
        unsafe { self.sectors::<true>(plain.as_ptr(), out.as_mut_ptr(), plain.len(), first) }
    }

    /// Decrypt whole sectors in place.
    pub fn decrypt_sectors(&self, area: &mut [u8], first: u128) {
        assert!(area.len().is_multiple_of(SECTOR));
        let p = area.as_mut_ptr();
        // SAFETY: as for `encrypt_sectors`.
        unsafe { self.sectors::<false>(p, p, area.len(), first) }
    }

    /// # Safety
    /// The CPU has AES-NI; `src` is readable and `dst` writable for `len` bytes (they may be the same
    /// pointer, not otherwise overlapping); `len` is a multiple of the sector size.
    #[target_feature(enable = "aes")]
    unsafe fn sectors<const ENCRYPT: bool>(&self, src: *const u8, dst: *mut u8, len: usize, first: u128) {
        let rk = if ENCRYPT { &self.enc } else { &self.dec };
        for s in 0..len / SECTOR {
            let mut t = self.first_tweak(first + s as u128);
            for g in 0..SECTOR / 128 {
                let at = s * SECTOR + g * 128;
                let mut tw = [t; 8];
                for j in 1..8 {
                    tw[j] = mul_x(tw[j - 1]);
                }
                t = mul_x(tw[7]);
                let mut b = [_mm_setzero_si128(); 8];
                for j in 0..8 {
                    // SAFETY: `at + 16 * j + 16 <= len` (the caller's bounds); unaligned loads.
                    let x = unsafe { _mm_loadu_si128(src.add(at + 16 * j).cast()) };
                    b[j] = _mm_xor_si128(_mm_xor_si128(x, tw[j]), rk[0]);
                }
                for k in rk.iter().take(14).skip(1) {
                    for x in b.iter_mut() {
                        *x = if ENCRYPT { _mm_aesenc_si128(*x, *k) } else { _mm_aesdec_si128(*x, *k) };
                    }
                }
                for j in 0..8 {
                    let x = if ENCRYPT {
                        _mm_aesenclast_si128(b[j], rk[14])
                    } else {
                        _mm_aesdeclast_si128(b[j], rk[14])
                    };
                    // SAFETY: as for the load; every load of this group came before.
                    unsafe { _mm_storeu_si128(dst.add(at + 16 * j).cast(), _mm_xor_si128(x, tw[j])) };
                }
            }
        }
    }

    /// E(tweak key, sector number as a 128-bit little-endian block).
    #[target_feature(enable = "aes")]
    fn first_tweak(&self, s: u128) -> __m128i {
        let mut x = _mm_set_epi64x((s >> 64) as i64, s as i64);
        x = _mm_xor_si128(x, self.tweak[0]);
        for k in &self.tweak[1..14] {
            x = _mm_aesenc_si128(x, *k);
        }
        _mm_aesenclast_si128(x, self.tweak[14])
    }
}

/// Multiply a tweak by x in GF(2^128) (XTS's polynomial x^128 + x^7 + x^2 + x + 1, little-endian).
#[target_feature(enable = "sse2")]
fn mul_x(t: __m128i) -> __m128i {
    // Each 32-bit lane's top bit, spread: lane 3's (bit 127) comes back as the reduction 0x87 in lane 0,
    // lane 1's (bit 63) carries into bit 64 (lane 2).
    let spread = _mm_shuffle_epi32::<0x13>(_mm_srai_epi32::<31>(t));
    let carry = _mm_and_si128(spread, _mm_set_epi32(0, 1, 0, 0x87));
    _mm_xor_si128(_mm_add_epi64(t, t), carry)
}

/// The 15 round keys of AES-256.
#[target_feature(enable = "aes")]
fn expand256(key: &[u8; 32]) -> [__m128i; 15] {
    let lo = u128::from_le_bytes(key[..16].try_into().expect("16"));
    let hi = u128::from_le_bytes(key[16..].try_into().expect("16"));
    let mut a = _mm_set_epi64x((lo >> 64) as i64, lo as i64);
    let mut b = _mm_set_epi64x((hi >> 64) as i64, hi as i64);
    let mut rk = [_mm_setzero_si128(); 15];
    rk[0] = a;
    rk[1] = b;
    macro_rules! round {
        ($i:expr, $rcon:literal) => {
            a = next_even(a, _mm_aeskeygenassist_si128::<$rcon>(b));
            rk[$i] = a;
            b = next_odd(b, _mm_aeskeygenassist_si128::<0>(a));
            rk[$i + 1] = b;
        };
    }
    round!(2, 0x01);
    round!(4, 0x02);
    round!(6, 0x04);
    round!(8, 0x08);
    round!(10, 0x10);
    round!(12, 0x20);
    // The last round key has no odd partner.
    rk[14] = next_even(a, _mm_aeskeygenassist_si128::<0x40>(b));
    rk
}

/// `w` with each word xored with all the words before it (the key schedule's running xor).
#[target_feature(enable = "sse2")]
fn prefix_xor(w: __m128i) -> __m128i {
    let w = _mm_xor_si128(w, _mm_slli_si128::<4>(w));
    _mm_xor_si128(w, _mm_slli_si128::<8>(w))
}

#[target_feature(enable = "sse2")]
fn next_even(prev: __m128i, assist: __m128i) -> __m128i {
    _mm_xor_si128(prefix_xor(prev), _mm_shuffle_epi32::<0xff>(assist))
}

#[target_feature(enable = "sse2")]
fn next_odd(prev: __m128i, assist: __m128i) -> __m128i {
    _mm_xor_si128(prefix_xor(prev), _mm_shuffle_epi32::<0xaa>(assist))
}
