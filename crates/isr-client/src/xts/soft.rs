//! The portable backend: the `aes` crate's block cipher, the tweaks computed per sector.

use aes::cipher::{generic_array::GenericArray, inout::InOutBuf, BlockDecrypt, BlockEncrypt, KeyInit};
use aes::Aes256;

use super::SECTOR;

/// For each byte h shifted out of the top of a tweak by a multiplication by x^8: h times x^128 reduced by the
/// XTS polynomial, i.e. the carry-less product of h and 0x87 (at most 15 bits, so no further reduction).
const FOLD8: [u16; 256] = {
    let mut table = [0u16; 256];
    let mut h = 0;
    while h < 256 {
        let mut r = 0u16;
        let mut bit = 0;
        while bit < 8 {
            if (h >> bit) & 1 == 1 {
                r ^= 0x87 << bit;
            }
            bit += 1;
        }
        table[h] = r;
        h += 1;
    }
    table
};

/// XTS with the `aes` crate: each sector's 256 blocks go to AES at once (which the crate pipelines where the
/// CPU has AES instructions), with the tweaks applied in passes before and after.
pub struct Xts {
    data: Aes256,
    tweak: Aes256,
}

impl Xts {
    pub fn new(key: &[u8]) -> Xts {
        Xts {
            data: Aes256::new(GenericArray::from_slice(&key[..32])),
            tweak: Aes256::new(GenericArray::from_slice(&key[32..64])),
        }
    }

    /// The tweak of each 16-byte block of sector `s`: E(tweak key, s) times alpha^j. Computed once per sector
    /// and applied before and after the block cipher. The first 8 are a chain of multiplications by x; every
    /// later one is its eighth predecessor times x^8, so 8 independent chains run side by side instead of
    /// one serial chain of 255.
    fn tweaks(&self, s: u128) -> [u128; SECTOR / 16] {
        let mut t = GenericArray::from(s.to_le_bytes());
        self.tweak.encrypt_block(&mut t);
        let mut out = [0u128; SECTOR / 16];
        out[0] = u128::from_le_bytes(t.into());
        for j in 1..8 {
            // Multiply by x in GF(2^128) with the XTS polynomial (x^128 + x^7 + x^2 + x + 1).
            let t = out[j - 1];
            out[j] = (t << 1) ^ if t >> 127 == 1 { 0x87 } else { 0 };
        }
        for j in 8..out.len() {
            let t = out[j - 8];
            out[j] = (t << 8) ^ FOLD8[(t >> 120) as usize] as u128;
        }
        out
    }

    fn xor_tweaks(sector: &mut [u8], tweaks: &[u128; SECTOR / 16]) {
        for (block, t) in sector.chunks_exact_mut(16).zip(tweaks) {
            let x = u128::from_le_bytes(block.try_into().expect("16")) ^ t;
            block.copy_from_slice(&x.to_le_bytes());
        }
    }

    pub fn encrypt_sectors(&self, area: &mut [u8], first: u128) {
        for (k, sector) in area.chunks_exact_mut(SECTOR).enumerate() {
            let tweaks = self.tweaks(first + k as u128);
            Xts::xor_tweaks(sector, &tweaks);
            let (blocks, _) = InOutBuf::from(&mut *sector).into_chunks();
            self.data.encrypt_blocks_inout(blocks);
            Xts::xor_tweaks(sector, &tweaks);
        }
    }

    /// [`Self::encrypt_sectors`] of `plain` into `out` (the same length): the first tweak pass doubles as
    /// the copy.
    pub fn encrypt_sectors_from(&self, plain: &[u8], out: &mut [u8], first: u128) {
        for (k, (src, sector)) in plain.chunks_exact(SECTOR).zip(out.chunks_exact_mut(SECTOR)).enumerate() {
            let tweaks = self.tweaks(first + k as u128);
            for ((b, s), t) in sector.chunks_exact_mut(16).zip(src.chunks_exact(16)).zip(&tweaks) {
                let x = u128::from_le_bytes(s.try_into().expect("16")) ^ t;
                b.copy_from_slice(&x.to_le_bytes());
            }
            let (blocks, _) = InOutBuf::from(&mut *sector).into_chunks();
            self.data.encrypt_blocks_inout(blocks);
            Xts::xor_tweaks(sector, &tweaks);
        }
    }

    pub fn decrypt_sectors(&self, area: &mut [u8], first: u128) {
        for (k, sector) in area.chunks_exact_mut(SECTOR).enumerate() {
            let tweaks = self.tweaks(first + k as u128);
            Xts::xor_tweaks(sector, &tweaks);
            let (blocks, _) = InOutBuf::from(&mut *sector).into_chunks();
            self.data.decrypt_blocks_inout(blocks);
            Xts::xor_tweaks(sector, &tweaks);
        }
    }
}
