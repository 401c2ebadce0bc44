//! The chunk decoder on untrusted stored bytes.
//!
//! The first input byte picks a mode; the rest is the data:
//! - 0: arbitrary stored bytes under their own (valid) tag and a fixed key: everything up to the AEAD.
//! - 1: the same under a wrong tag: the size and tag checks.
//! - 2: `header(12) || payload` encrypted here under the fixed key, so the AEAD passes and the header checks,
//!   decompression of arbitrary payloads and the length checks are reached (what a holder of the key could
//!   feed a client).
//! - 3: the data as a plaintext: encode, then decode must give it back.
//!
//! Expected plaintext length: from the header when there is one, else 4096.
#![no_main]

use isr_format::codec::{self, ChunkDecoder, ChunkEncoder};
use isr_format::{ChunkKey, ConvergenceSecret, Tag};
use libfuzzer_sys::fuzz_target;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};

const KEY: [u8; 32] = [0x5c; 32];

fn expected_len(stored: &[u8]) -> usize {
    stored
        .get(8..12)
        .map(|b| u32::from_le_bytes(b.try_into().unwrap()) as usize)
        .unwrap_or(4096)
        .min(codec::MAX_PLAINTEXT)
}

fuzz_target!(|input: &[u8]| {
    let Some((&mode, data)) = input.split_first() else { return };
    let mut dec = ChunkDecoder::new();
    match mode % 4 {
        0 | 1 => {
            let tag = if mode % 4 == 0 { Tag::of(data) } else { Tag([0xa5; 32]) };
            let r = dec.decode(&tag, &ChunkKey(KEY), data, expected_len(data));
            assert!(r.is_err(), "a chunk not sealed under the key must not decode");
        }
        2 => {
            if data.len() < codec::HEADER_LEN {
                return;
            }
            let mut stored = data[..codec::HEADER_LEN].to_vec();
            let mut payload = data[codec::HEADER_LEN..].to_vec();
            LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &KEY).unwrap())
                .seal_in_place_append_tag(
                    Nonce::assume_unique_for_key([0; 12]),
                    Aad::from(&stored[..]),
                    &mut payload,
                )
                .unwrap();
            stored.extend_from_slice(&payload);
            let len = expected_len(&stored);
            if let Ok(plain) = dec.decode(&Tag::of(&stored), &ChunkKey(KEY), &stored, len) {
                assert_eq!(plain.len(), len);
            }
        }
        _ => {
            let mut enc = ChunkEncoder::new(ConvergenceSecret([7; 32]));
            match enc.encode(data).unwrap() {
                None => assert!(codec::is_zero(data)),
                Some(e) => {
                    assert_eq!(e.tag, Tag::of(&e.stored));
                    assert!(e.stored.len() <= codec::MAX_STORED);
                    assert_eq!(dec.decode(&e.tag, &e.key, &e.stored, data.len()).unwrap(), data);
                }
            }
        }
    }
});
