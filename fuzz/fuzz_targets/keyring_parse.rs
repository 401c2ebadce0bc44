//! Keyring parsing: the server's `KeyringTags::parse` and the client's `Keyring::open`.
//!
//! The first input byte picks a mode: 0 = the bytes as they are; 1 = with the trailing checksum recomputed,
//! so the fuzzer gets past it and reaches the structure and AEAD checks behind it.
#![no_main]

use isr_format::{Keyring, KeyringTags, Keyroot};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Some((&mode, data)) = input.split_first() else { return };
    let mut bytes = data.to_vec();
    if mode & 1 == 1 && bytes.len() >= 32 {
        let end = bytes.len() - 32;
        let sum = blake3::hash(&bytes[..end]);
        bytes[end..].copy_from_slice(sum.as_bytes());
    }
    let tags = KeyringTags::parse(&bytes);
    // The keyroot of the golden fixtures (crates/isr-format/tests/golden.rs), so seeds made from them open.
    let keyroot = Keyroot(std::array::from_fn(|i| 0xa0 ^ (i as u8 * 3)));
    let opened = Keyring::open(&bytes, &keyroot);
    if let Ok(k) = &opened {
        // Whatever opens also parses, with the same tags, and seals back to a keyring that opens the same.
        let t = tags.as_ref().expect("an openable keyring parses");
        assert_eq!(t.tags, k.tags());
        assert_eq!(&Keyring::open(&k.seal(&keyroot), &keyroot).unwrap(), k);
    }
    if let Ok(t) = tags {
        assert_eq!(t.tags.len() as u64, t.chunk_size.chunk_count(t.image_len));
    }
});
