//! AES-256-XTS over whole 4 KiB sectors, the runtime image's cipher (IEEE 1619; the tweak of sector s is s
//! as a 128-bit little-endian number, as dm-crypt's `plain64`). Written here rather than taken from
//! `xts_mode`, which encrypts one AES block per call: a guest's every read and write passes through it.
//! Two backends give the same bytes (the tests check both against `xts_mode`): AES-NI where the CPU has it
//! (1.3-1.5x the portable one's speed on this project's machines), and the `aes` crate elsewhere.

#[cfg(target_arch = "x86_64")]
mod ni;
mod soft;

/// The unit of encryption: one tweak per sector.
pub const SECTOR: usize = 4096;

/// An XTS key (the data key, then the tweak key), ready for whole sectors.
pub struct Xts(Backend);

// One key per runtime image, held for as long as it is open: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
enum Backend {
    #[cfg(target_arch = "x86_64")]
    Ni(ni::Keys),
    Soft(soft::Xts),
}

/// The backend only: never the keys.
impl std::fmt::Debug for Xts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Xts").field(&self.backend()).finish()
    }
}

impl Xts {
    /// `key` is 64 bytes: the data key, then the tweak key.
    pub fn new(key: &[u8; 64]) -> Xts {
        #[cfg(target_arch = "x86_64")]
        if let Some(keys) = ni::Keys::new(key) {
            return Xts(Backend::Ni(keys));
        }
        Xts::portable(key)
    }

    /// The `aes` crate's backend whatever the CPU has (for tests and comparisons).
    pub fn portable(key: &[u8; 64]) -> Xts {
        Xts(Backend::Soft(soft::Xts::new(key)))
    }

    /// Encrypt whole sectors in place; the first is sector `first`.
    pub fn encrypt_sectors(&self, area: &mut [u8], first: u128) {
        match &self.0 {
            #[cfg(target_arch = "x86_64")]
            Backend::Ni(k) => k.encrypt_sectors(area, first),
            Backend::Soft(x) => x.encrypt_sectors(area, first),
        }
    }

    /// [`Self::encrypt_sectors`] of `plain` into `out` (the same length).
    pub fn encrypt_sectors_from(&self, plain: &[u8], out: &mut [u8], first: u128) {
        match &self.0 {
            #[cfg(target_arch = "x86_64")]
            Backend::Ni(k) => k.encrypt_sectors_from(plain, out, first),
            Backend::Soft(x) => x.encrypt_sectors_from(plain, out, first),
        }
    }

    /// Which backend this key uses: "AES-NI" or "portable".
    pub fn backend(&self) -> &'static str {
        match &self.0 {
            #[cfg(target_arch = "x86_64")]
            Backend::Ni(_) => "AES-NI",
            Backend::Soft(_) => "portable",
        }
    }

    /// Decrypt whole sectors in place.
    pub fn decrypt_sectors(&self, area: &mut [u8], first: u128) {
        match &self.0 {
            #[cfg(target_arch = "x86_64")]
            Backend::Ni(k) => k.decrypt_sectors(area, first),
            Backend::Soft(x) => x.decrypt_sectors(area, first),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aes::cipher::{generic_array::GenericArray, KeyInit};
    use aes::Aes256;
    use proptest::prelude::*;
    use xts_mode::{get_tweak_default, Xts128};

    fn key(seed: u8) -> [u8; 64] {
        std::array::from_fn(|i| (i as u8).wrapping_mul(37) ^ seed)
    }

    fn reference(key: &[u8; 64]) -> Xts128<Aes256> {
        Xts128::new(
            Aes256::new(GenericArray::from_slice(&key[..32])),
            Aes256::new(GenericArray::from_slice(&key[32..])),
        )
    }

    /// Both backends (the AES-NI one is the default on x86-64 machines that have it).
    fn backends(key: &[u8; 64]) -> [(&'static str, Xts); 2] {
        [("default", Xts::new(key)), ("portable", Xts::portable(key))]
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn x86_64_machines_with_aes_ni_use_it() {
        let expect = if std::arch::is_x86_feature_detected!("aes") { "AES-NI" } else { "portable" };
        assert_eq!(Xts::new(&key(1)).backend(), expect);
        assert_eq!(Xts::portable(&key(1)).backend(), "portable");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn every_backend_matches_the_xts_mode_crate(
            seed in any::<u8>(),
            sectors in 1usize..5,
            first in prop_oneof![0u128..4, any::<u64>().prop_map(u128::from), any::<u128>()],
            fill in any::<u8>(),
        ) {
            let k = key(seed);
            let plain: Vec<u8> = (0..sectors * SECTOR).map(|i| (i * 7 % 253) as u8 ^ fill).collect();
            let mut expect = plain.clone();
            reference(&k).encrypt_area(&mut expect, SECTOR, first, get_tweak_default);
            for (name, xts) in backends(&k) {
                let mut in_place = plain.clone();
                xts.encrypt_sectors(&mut in_place, first);
                prop_assert!(in_place == expect, "{} in place, first sector {}", name, first);
                let mut out = vec![0xEE; plain.len()];
                xts.encrypt_sectors_from(&plain, &mut out, first);
                prop_assert!(out == expect, "{} into a buffer", name);
                xts.decrypt_sectors(&mut out, first);
                prop_assert!(out == plain, "{} decrypts", name);
            }
        }
    }
}
