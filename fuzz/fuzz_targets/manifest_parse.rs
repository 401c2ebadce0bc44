//! Manifest parsing: `Manifest::parse_unauthenticated` (server) and `Manifest::open_bound` (client).
//!
//! The first input byte picks a mode: 0 = the bytes as they are; 1 = checksum and MAC recomputed for the
//! fixed keyroot, so the fuzzer reaches the binding, the JSON body and its validation; 2 = the data framed as
//! a format 1 body; 3 = the data framed as a format 2 binding and body (header, checksum and MAC added here).
#![no_main]

use isr_format::{Keyroot, LegacyManifest, Manifest};
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
    // The MAC key depends on the format version (bytes 4..6).
    let context =
        if bytes.get(4) == Some(&2) { "isr 2026-11 manifest mac v2" } else { "isr 2026-11 manifest mac v1" };
    let mac_key = blake3::derive_key(context, &KEYROOT);
    let mac = blake3::keyed_hash(&mac_key, &bytes[..end]);
    bytes[end..end + 32].copy_from_slice(sum.as_bytes());
    bytes[end + 32..].copy_from_slice(mac.as_bytes());
}

fuzz_target!(|input: &[u8]| {
    let Some((&mode, data)) = input.split_first() else { return };
    let mut bytes = match mode % 4 {
        0 | 1 => data.to_vec(),
        2 => {
            let mut b = b"ISRM\x01\x00\x00\x00".to_vec();
            b.extend_from_slice(&(data.len() as u32).to_le_bytes());
            b.extend_from_slice(data);
            b.extend_from_slice(&[0; 64]);
            b
        }
        _ => {
            // The data holds the binding (version, name lengths, names) and then the body.
            let body_len = data.len().saturating_sub(10);
            let mut b = b"ISRM\x02\x00\x00\x00".to_vec();
            b.extend_from_slice(&(body_len as u32).to_le_bytes());
            b.extend_from_slice(data);
            b.extend_from_slice(&[0; 64]);
            b
        }
    };
    if mode % 4 != 0 {
        fix_trailer(&mut bytes);
    }
    let keyroot = Keyroot(KEYROOT);
    let unauth = Manifest::parse_unauthenticated(&bytes);
    let opened = Manifest::open_without_binding_check(&bytes, &keyroot);
    if let Ok(c) = opened {
        assert_eq!(unauth.expect("an authentic manifest also parses"), c);
        // What opens seals again (bound, or legacy when it was) and opens to the same value.
        let resealed = match &c.binding {
            Some(b) => c.manifest.seal(&keyroot, b).unwrap(),
            None => c.manifest.seal_legacy_unbound(&keyroot).unwrap(),
        };
        assert_eq!(Manifest::open_without_binding_check(&resealed, &keyroot).unwrap(), c);
        if let Some(b) = &c.binding {
            assert_eq!(Manifest::open_bound(&bytes, &keyroot, b, LegacyManifest::Refuse).unwrap(), c);
        }
    }
});
