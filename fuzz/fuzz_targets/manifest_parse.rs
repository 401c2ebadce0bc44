//! Manifest parsing: `Manifest::parse_unauthenticated` (server) and `Manifest::open` (client).
//!
//! The first input byte picks a mode: 0 = the bytes as they are; 1 = checksum and MAC recomputed for the
//! fixed keyroot, so the fuzzer reaches the JSON body and its validation; 2 = the data framed as a body
//! (header, checksum and MAC added here).
#![no_main]

use isr_format::{Keyroot, Manifest};
use libfuzzer_sys::fuzz_target;

/// The keyroot of the golden fixtures (crates/isr-format/tests/golden.rs), so seeds made from them open.
const KEYROOT: [u8; 32] = {
    let mut k = [0u8; 32];
    let mut i = 0;
    while i < 32 {
        k[i] = 0xa0 ^ (i as u8 * 3);
        i += 1;
    }
    k
};

fn fix_trailer(bytes: &mut [u8]) {
    if bytes.len() < 64 {
        return;
    }
    let end = bytes.len() - 64;
    let sum = blake3::hash(&bytes[..end]);
    let mac_key = blake3::derive_key("isr 2026-11 manifest mac v1", &KEYROOT);
    let mac = blake3::keyed_hash(&mac_key, &bytes[..end]);
    bytes[end..end + 32].copy_from_slice(sum.as_bytes());
    bytes[end + 32..].copy_from_slice(mac.as_bytes());
}

fuzz_target!(|input: &[u8]| {
    let Some((&mode, data)) = input.split_first() else { return };
    let mut bytes = match mode % 3 {
        0 | 1 => data.to_vec(),
        _ => {
            let mut b = b"ISRM\x01\x00\x00\x00".to_vec();
            b.extend_from_slice(&(data.len() as u32).to_le_bytes());
            b.extend_from_slice(data);
            b.extend_from_slice(&[0; 64]);
            b
        }
    };
    if mode % 3 != 0 {
        fix_trailer(&mut bytes);
    }
    let keyroot = Keyroot(KEYROOT);
    let unauth = Manifest::parse_unauthenticated(&bytes);
    let opened = Manifest::open(&bytes, &keyroot);
    if let Ok(m) = opened {
        assert_eq!(unauth.expect("an authentic manifest also parses"), m);
        // What opens seals again and opens to the same value.
        assert_eq!(Manifest::open(&m.seal(&keyroot).unwrap(), &keyroot).unwrap(), m);
    }
});
