//! Golden vectors: pin the on-disk format. Every value here was produced once by the code and written down;
//! a test failing here means stored chunks, keyrings, manifests or wrapped keys written by an older build
//! would no longer be read, or would no longer deduplicate. Change a value only together with a format
//! version bump (and a migration story in docs/design.md).
//!
//! Besides the pinned values, each layout is re-derived here from its specification (docs/design.md) with
//! the primitives alone (blake3, zstd, ring, x25519), so the tests also document the formats executably.
//!
//! The fixture files in `tests/data/` were written once by the ignored test `regenerate_fixtures`
//! (`cargo test -p isr-format --test golden -- --ignored regenerate_fixtures`); keyring and wrapped-key
//! sealing use random nonces, so regenerating them changes their bytes: do not, unless the format changes.
//! `manifest.bin` is a format 1 (legacy, unbound) manifest, kept to prove old manifests still open;
//! `manifest_v2.bin` is the same manifest in format 2, bound to a parcel and version (added with format 2,
//! written by the same code; manifest sealing is deterministic, so it is reproducible).

use isr_format::codec::{self, ChunkDecoder, ChunkEncoder, ChunkError};
use isr_format::keyring::KEYRING_MAGIC;
use isr_format::keys::{KdfParams, WRAPPED_KEYROOT_LEN};
use isr_format::{
    Binding, ChunkIndex, ChunkKey, ChunkSize, ConvergenceSecret, ImageKind, ImageLen, ImageRef, Keyring,
    KeyringTags, Keyroot, LegacyManifest, Manifest, ManifestContents, ManifestError, RecoverySecretKey, Tag,
    UserSecrets, VmDescription, WrappedKeyroot,
};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use std::path::PathBuf;

// ---------------------------------------------------------------------------------------------------------
// Fixed inputs.

fn secret() -> ConvergenceSecret {
    ConvergenceSecret(std::array::from_fn(|i| i as u8))
}

fn keyroot() -> Keyroot {
    Keyroot(std::array::from_fn(|i| 0xa0 ^ (i as u8 * 3)))
}

fn recovery_secret() -> RecoverySecretKey {
    RecoverySecretKey(*blake3::hash(b"isr golden recovery secret").as_bytes())
}

const SMALL_KDF: KdfParams = KdfParams { memory_kib: 256, iterations: 1 };

/// The plaintexts of the golden chunks: (name, bytes).
fn plaintexts() -> Vec<(&'static str, Vec<u8>)> {
    let text: Vec<u8> =
        b"Internet Suspend/Resume golden vector 0123456789\n".iter().copied().cycle().take(4096).collect();
    let mut random = vec![0u8; 4096];
    blake3::Hasher::new().update(b"isr golden random").finalize_xof().fill(&mut random);
    let structured: Vec<u8> = (0..128 * 1024u32).map(|i| ((i * 7) % 251) as u8 ^ (i >> 12) as u8).collect();
    let short: Vec<u8> = (0..1000u32).map(|i| (i % 10) as u8 + b'0').collect();
    vec![
        ("text-4k", text),
        ("random-4k", random),
        ("structured-128k", structured),
        ("one-byte", vec![1]),
        ("short-1000", short),
    ]
}

// ---------------------------------------------------------------------------------------------------------
// Pinned values.

/// (name, chunk key, tag, stored length, compression id)
const CHUNKS: &[(&str, &str, &str, usize, u8)] = &[
    (
        "text-4k",
        "f78c5215e905491a2da635e45f09c9b66bf005d675e922e77cc7dfcf7ba38cb2",
        "4c595245d95ff35cc0827b792bfa61462dc859573d67cac37155af3a149fbec6",
        96,
        1,
    ),
    (
        "random-4k",
        "1ea7cac3cb4faac672f09816e2bd60223e6e2da37deee7334f4dca402ada63eb",
        "5221e722cc0013a092a998a8e115d051eb7833e3528cdbbbbca6516ff0ea99e1",
        4124,
        0,
    ),
    (
        "structured-128k",
        "3baa2c8818365a849c9614c00bcca1992309e6d30fd335f2bdeb0c4931e03d8f",
        "82233e5c0d00efc7b591fb64caa725d8492eff0426e7494b41ec0a147ffddeda",
        8172,
        1,
    ),
    (
        "one-byte",
        "c83549102fe62df0a1cda96ab32500a6eb0ebeb0bdf481fb489921ab389ed63a",
        "4a28b5c7af74a6ec1a2527fdceeaaeb8b7c2560802bd179fc89100530d2331f2",
        29,
        0,
    ),
    (
        "short-1000",
        "9442820c12c0a65c571bf3c938765248237280e6166d7808d36b77046bedf3c4",
        "1525a9788b30c125970e3972a03993d2ee91c3000fd7144643c64a1824bc5797",
        55,
        1,
    ),
];

/// The complete stored bytes of two small chunks.
const TEXT_4K_STORED: &str = "495352430101010000100000ac9927c8924bf16c1360e3e40b2b8e479489b3d27b20c0cb1a296b753aba5a70773bae613d065925de0350a90bd2ba4c680b96d7f317b0b5f1c5fd95aba85be704400ebbcf2442e1ad0f9bbe965ec8d49c612cc8";
const ONE_BYTE_STORED: &str = "4953524301010000010000007c2482244df66cd6858a326f53e134e943";

/// UserSecrets::derive("golden-user", "golden password", SMALL_KDF): (login, wrap).
const SECRETS_SMALL: (&str, &str) = (
    "5e9d38d4e3a540bdcabb6b439f8e4fc06d919123cd8f65d7fe873f9cbc2d5969",
    "30f331cacaa0577c71fd1145edda16da2407772d852e3d2409578beb150c6a31",
);
/// UserSecrets::derive("alice", "correct horse battery staple", KdfParams::DEFAULT): (login, wrap).
const SECRETS_DEFAULT: (&str, &str) = (
    "d03e3783cc1db9eea2d40e83113704ded16e11cbd5db0d53d8bae09f0ae3cc28",
    "73ef9f4e06625df60b5f8c9174a7a53867ec0160585be5b846ce1d9bc0207d9b",
);
/// recovery_secret().public_key()
const RECOVERY_PUBLIC: &str = "7ba2cad7d8aaeaf21e13386fd01e1fbc94ac0ede92dd518b8979393815630b2b";

/// BLAKE3 of the fixture files, so a regenerated fixture cannot slip in unnoticed.
const FIXTURE_HASHES: &[(&str, &str)] = &[
    ("keyring.bin", "0ee41df578c3c04ccab9a1e71687b179c563ce6d0ab0321a26730066ddc922bb"),
    ("manifest.bin", "c775fd02233de2c581887c7d336a8eea4e4122788f9f10902f6e2a73727fc705"),
    ("manifest_v2.bin", "1f4612b040b6417642e53be8b6e634d1257dc402a847a6399f9bba01f314481d"),
    ("wrapped_password.bin", "f897f31a44315d5675f866084b6f7e49a37d05f592abbf924ec99f5c2bb3ec9b"),
    ("wrapped_recovery.bin", "d5df9c37056298812f750c87cefcda8fe8fbc1c974e55eeb87ce0b5c30fc8214"),
];

/// The manifest body exactly as sealed (serde_json, field order of the struct).
const MANIFEST_JSON: &str = concat!(
    "{\"vm\":{\"memory_mib\":512,\"cpus\":2,\"append\":\"console=ttyS0 root=/dev/vda rw\"},",
    "\"chunk_size\":4096,\"disk\":{\"len\":21480,",
    "\"keyring\":\"0ee41df578c3c04ccab9a1e71687b179c563ce6d0ab0321a26730066ddc922bb\"},",
    "\"memory\":{\"len\":536870912,",
    "\"keyring\":\"1111111111111111111111111111111111111111111111111111111111111111\"},",
    "\"kernel\":{\"len\":9437184,",
    "\"keyring\":\"2222222222222222222222222222222222222222222222222222222222222222\"},",
    "\"initrd\":{\"len\":4194304,",
    "\"keyring\":\"3333333333333333333333333333333333333333333333333333333333333333\"},",
    "\"created_unix\":1790000000,\"comment\":\"golden fixture \u{2713}\"}",
);

/// What the format 2 manifest fixture is bound to.
fn fixture_binding() -> Binding {
    Binding::new("golden-user", "golden-parcel", 3)
}

// ---------------------------------------------------------------------------------------------------------
// Helpers.

/// Collects mismatches so one run reports every value that changed (and prints all of them when pinning).
#[derive(Default)]
struct Pins(Vec<String>);

impl Pins {
    fn check(&mut self, name: &str, actual: impl std::fmt::Display, expected: impl std::fmt::Display) {
        let (a, e) = (actual.to_string(), expected.to_string());
        if a != e {
            self.0.push(format!("{name}:\n    actual   {a}\n    expected {e}"));
        }
    }
    fn finish(self) {
        assert!(self.0.is_empty(), "{} pinned value(s) changed:\n{}", self.0.len(), self.0.join("\n"));
    }
}

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(data_dir().join(name)).unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

fn gcm(key: &[u8; 32]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).unwrap())
}

/// The chunk layout from the specification: header || AES-256-GCM(key, 0, aad = header, payload) || gcm tag.
fn reference_chunk(secret: &ConvergenceSecret, plaintext: &[u8]) -> (ChunkKey, Vec<u8>) {
    let key = *blake3::keyed_hash(&secret.0, plaintext).as_bytes();
    let compressed = zstd::bulk::compress(plaintext, 1).unwrap();
    let (comp_id, mut payload) =
        if compressed.len() < plaintext.len() { (1u8, compressed) } else { (0u8, plaintext.to_vec()) };
    let mut stored = b"ISRC".to_vec();
    stored.extend_from_slice(&[1, 1, comp_id, 0]);
    stored.extend_from_slice(&(plaintext.len() as u32).to_le_bytes());
    gcm(&key)
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key([0; 12]),
            Aad::from(&stored[..12]),
            &mut payload,
        )
        .unwrap();
    stored.extend_from_slice(&payload);
    (ChunkKey(key), stored)
}

/// The keyring layout from the specification, given the nonce.
fn reference_keyring(keyroot: &Keyroot, ring: &Keyring, nonce: [u8; 12]) -> Vec<u8> {
    let mut out = b"ISRK".to_vec();
    out.extend_from_slice(&1u16.to_le_bytes());
    out.extend_from_slice(&[1, 1]);
    out.extend_from_slice(&ring.chunk_size().bytes().to_le_bytes());
    out.extend_from_slice(&ring.image_len().0.to_le_bytes());
    out.extend_from_slice(&nonce);
    let mut keys = Vec::new();
    for i in 0..ring.chunk_count() {
        match ring.get(ChunkIndex(i)) {
            Some((tag, key)) => {
                out.extend_from_slice(&tag.0);
                keys.extend_from_slice(&key.0);
            }
            None => {
                out.extend_from_slice(&[0; 32]);
                keys.extend_from_slice(&[0; 32]);
            }
        }
    }
    let aad = blake3::hash(&out);
    let subkey = blake3::derive_key("isr 2026-11 keyring keys v1", &keyroot.0);
    gcm(&subkey)
        .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad.as_bytes()), &mut keys)
        .unwrap();
    out.extend_from_slice(&keys);
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

/// The keyring fixture's content: six chunks of 4 KiB (the last 1000 bytes), two of them zero.
fn fixture_image() -> (ChunkSize, Vec<u8>) {
    let p = plaintexts();
    let mut image = Vec::new();
    image.extend_from_slice(&p[0].1); // text
    image.extend_from_slice(&[0; 4096]); // zero
    image.extend_from_slice(&p[1].1); // random
    image.extend_from_slice(&[0; 4096]); // zero
    image.extend_from_slice(&p[2].1[..4096]); // structured
    image.extend_from_slice(&p[4].1); // short last chunk
    (ChunkSize::new(4096).unwrap(), image)
}

fn fixture_keyring() -> Keyring {
    let (cs, image) = fixture_image();
    let mut ring = Keyring::new(cs, ImageLen(image.len() as u64)).unwrap();
    let mut enc = ChunkEncoder::new(secret());
    for (i, c) in image.chunks(cs.as_usize()).enumerate() {
        ring.set(ChunkIndex(i as u64), enc.encode(c).unwrap().map(|e| (e.tag, e.key)));
    }
    ring
}

fn fixture_manifest(keyring_bytes: &[u8]) -> Manifest {
    let keyring = Tag::of(keyring_bytes);
    Manifest {
        vm: VmDescription {
            memory_mib: 512,
            cpus: 2,
            append: Some("console=ttyS0 root=/dev/vda rw".into()),
            devices: Default::default(),
        },
        chunk_size: ChunkSize::new(4096).unwrap(),
        disk: ImageRef { len: ImageLen(5 * 4096 + 1000), keyring },
        memory: Some(ImageRef { len: ImageLen(512 << 20), keyring: Tag([0x11; 32]) }),
        kernel: Some(ImageRef { len: ImageLen(9_437_184), keyring: Tag([0x22; 32]) }),
        initrd: Some(ImageRef { len: ImageLen(4_194_304), keyring: Tag([0x33; 32]) }),
        created_unix: 1_790_000_000,
        comment: "golden fixture \u{2713}".into(),
    }
}

// ---------------------------------------------------------------------------------------------------------
// Chunks.

#[test]
fn chunk_vectors() {
    let mut pins = Pins::default();
    let mut enc = ChunkEncoder::new(secret());
    let mut dec = ChunkDecoder::new();
    for ((name, plain), &(pname, key_hex, tag_hex, stored_len, comp)) in plaintexts().iter().zip(CHUNKS) {
        assert_eq!(*name, pname);
        pins.check(&format!("{name} ChunkKey::derive"), ChunkKey::derive(&secret(), plain).to_hex(), key_hex);
        let e = enc.encode(plain).unwrap().expect("not zero");
        pins.check(&format!("{name} key"), e.key.to_hex(), key_hex);
        pins.check(&format!("{name} tag"), e.tag.to_hex(), tag_hex);
        pins.check(&format!("{name} stored length"), e.stored.len(), stored_len);
        pins.check(&format!("{name} compression id"), e.stored[6], comp);
        // The tag is BLAKE3 of the stored bytes; the stored bytes follow the specification exactly.
        assert_eq!(e.tag, Tag(*blake3::hash(&e.stored).as_bytes()), "{name}");
        let (ref_key, ref_stored) = reference_chunk(&secret(), plain);
        assert_eq!(e.key, ref_key, "{name}: key differs from the specification");
        assert!(e.stored == ref_stored, "{name}: stored bytes differ from the specification");
        // Header fields.
        assert_eq!(&e.stored[..4], codec::CHUNK_MAGIC);
        assert_eq!(&e.stored[4..6], &[1, 1], "{name}: format version 1, cipher AES-256-GCM");
        assert_eq!(e.stored[7], 0);
        assert_eq!(u32::from_le_bytes(e.stored[8..12].try_into().unwrap()) as usize, plain.len());
        assert_eq!(dec.decode(&e.tag, &e.key, &e.stored, plain.len()).unwrap(), *plain, "{name}");
    }
    let p = plaintexts();
    pins.check("text-4k stored", hex::encode(enc.encode(&p[0].1).unwrap().unwrap().stored), TEXT_4K_STORED);
    pins.check("one-byte stored", hex::encode(enc.encode(&p[3].1).unwrap().unwrap().stored), ONE_BYTE_STORED);
    pins.finish();
}

#[test]
fn pinned_stored_chunks_decode() {
    // Chunks written by the pinned format version decode with today's decoder.
    let p = plaintexts();
    let mut dec = ChunkDecoder::new();
    for (hex_stored, (name, plain)) in [(TEXT_4K_STORED, &p[0]), (ONE_BYTE_STORED, &p[3])] {
        let stored = hex::decode(hex_stored).unwrap();
        let key = ChunkKey::derive(&secret(), plain);
        let tag = Tag::of(&stored);
        assert_eq!(dec.decode(&tag, &key, &stored, plain.len()).unwrap(), *plain, "{name}");
        let mut bad = stored.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(matches!(dec.decode(&tag, &key, &bad, plain.len()), Err(ChunkError::TagMismatch { .. })));
    }
}

#[test]
fn zero_chunks_are_not_encoded() {
    let mut enc = ChunkEncoder::new(secret());
    assert!(enc.encode(&vec![0u8; 128 * 1024]).unwrap().is_none());
    assert!(enc.encode(&[0u8; 4096]).unwrap().is_none());
    assert!(Tag::ZERO.is_zero());
}

#[test]
fn convergence_depends_on_the_secret_only() {
    let p = plaintexts();
    let a = ChunkEncoder::new(secret()).encode(&p[0].1).unwrap().unwrap();
    let b = ChunkEncoder::new(ConvergenceSecret([0xee; 32])).encode(&p[0].1).unwrap().unwrap();
    assert_ne!(a.tag, b.tag);
    assert_ne!(a.key, b.key);
}

// ---------------------------------------------------------------------------------------------------------
// Keys.

#[test]
fn key_derivation_vectors() {
    let mut pins = Pins::default();
    let s = UserSecrets::derive("golden-user", "golden password", SMALL_KDF).unwrap();
    pins.check("small kdf login", s.login.to_hex(), SECRETS_SMALL.0);
    pins.check("small kdf wrap", s.wrap.to_hex(), SECRETS_SMALL.1);
    let s = UserSecrets::derive("alice", "correct horse battery staple", KdfParams::DEFAULT).unwrap();
    pins.check("default kdf login", s.login.to_hex(), SECRETS_DEFAULT.0);
    pins.check("default kdf wrap", s.wrap.to_hex(), SECRETS_DEFAULT.1);
    pins.check(
        "KdfParams::DEFAULT",
        format!("{:?}", KdfParams::DEFAULT),
        "KdfParams { memory_kib: 65536, iterations: 2 }",
    );
    pins.check("recovery public key", recovery_secret().public_key().to_hex(), RECOVERY_PUBLIC);
    pins.finish();
}

#[test]
fn key_derivation_follows_the_specification() {
    // argon2id(m, t, p = 1, 32 bytes; salt = first 16 bytes of BLAKE3-derive_key("isr 2026-11 user salt v1",
    // user)) -> master; login / wrap = BLAKE3-derive_key(context, master).
    let salt = blake3::derive_key("isr 2026-11 user salt v1", b"golden-user");
    let argon = argon2::Argon2::new(
        argon2::Algorithm::Argon2id,
        argon2::Version::V0x13,
        argon2::Params::new(SMALL_KDF.memory_kib, SMALL_KDF.iterations, 1, Some(32)).unwrap(),
    );
    let mut master = [0u8; 32];
    argon.hash_password_into(b"golden password", &salt[..16], &mut master).unwrap();
    let s = UserSecrets::derive("golden-user", "golden password", SMALL_KDF).unwrap();
    assert_eq!(s.login.0, blake3::derive_key("isr 2026-11 login secret v1", &master));
    assert_eq!(s.wrap.0, blake3::derive_key("isr 2026-11 keyroot wrap v1", &master));
}

#[test]
fn wrapped_keyroot_fixtures() {
    assert_eq!(WRAPPED_KEYROOT_LEN, 88);
    let s = UserSecrets::derive("golden-user", "golden password", SMALL_KDF).unwrap();

    let pw = fixture("wrapped_password.bin");
    assert_eq!(pw.len(), 88);
    assert_eq!(&pw[..8], b"ISRW\x01\x01\x00\x00", "magic, version 1, kind 1 = password, reserved");
    assert_eq!(&pw[20..40], &[0u8; 20], "nonce is 12 bytes, zero padded to 32");
    let w = WrappedKeyroot(pw.clone());
    assert!(!w.is_recovery());
    assert_eq!(w.unwrap(&s.wrap).unwrap(), keyroot());
    // Specification: AES-256-GCM(wrap key, nonce = bytes 8..20, aad = bytes 0..40, keyroot) at 40..88.
    let mut body = keyroot().0.to_vec();
    let nonce: [u8; 12] = pw[8..20].try_into().unwrap();
    gcm(&s.wrap.0)
        .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(&pw[..40]), &mut body)
        .unwrap();
    assert_eq!(&pw[40..], &body[..]);

    let rec = fixture("wrapped_recovery.bin");
    assert_eq!(rec.len(), 88);
    assert_eq!(&rec[..8], b"ISRW\x01\x02\x00\x00", "magic, version 1, kind 2 = recovery, reserved");
    let w = WrappedKeyroot(rec.clone());
    assert!(w.is_recovery());
    assert_eq!(w.open_with_recovery(&recovery_secret()).unwrap(), keyroot());
    assert!(w.unwrap(&s.wrap).is_err());
    // Specification: key = BLAKE3-derive_key("isr 2026-11 recovery seal v1", shared || eph_pub || recovery_pub),
    // AES-256-GCM(key, nonce = 0, aad = bytes 0..40, keyroot) at 40..88, ephemeral public key at 8..40.
    let eph: [u8; 32] = rec[8..40].try_into().unwrap();
    let shared = x25519_dalek::StaticSecret::from(recovery_secret().0).diffie_hellman(&eph.into());
    let mut h = blake3::Hasher::new_derive_key("isr 2026-11 recovery seal v1");
    h.update(shared.as_bytes()).update(&eph).update(&recovery_secret().public_key().0);
    let mut body = keyroot().0.to_vec();
    gcm(h.finalize().as_bytes())
        .seal_in_place_append_tag(Nonce::assume_unique_for_key([0; 12]), Aad::from(&rec[..40]), &mut body)
        .unwrap();
    assert_eq!(&rec[40..], &body[..]);
}

// ---------------------------------------------------------------------------------------------------------
// Keyring.

#[test]
fn keyring_fixture() {
    let bytes = fixture("keyring.bin");
    let want = fixture_keyring();
    // 32 header + 6 * 32 tags + 6 * 32 keys + 16 GCM tag + 32 checksum.
    assert_eq!(bytes.len(), 32 + 64 * 6 + 16 + 32);
    assert_eq!(&bytes[..4], KEYRING_MAGIC);
    assert_eq!(
        &bytes[4..8],
        &[1, 0, 1, 1],
        "version 1 (u16 LE), hash id 1 = BLAKE3, cipher id 1 = AES-256-GCM"
    );
    assert_eq!(&bytes[8..12], &4096u32.to_le_bytes(), "chunk size");
    assert_eq!(&bytes[12..20], &(5 * 4096 + 1000u64).to_le_bytes(), "image length");
    for (i, t) in want.tags().iter().enumerate() {
        assert_eq!(&bytes[32 + 32 * i..64 + 32 * i], &t.0, "tag {i} in clear");
    }
    assert!(want.get(ChunkIndex(1)).is_none() && want.get(ChunkIndex(3)).is_none());
    assert_eq!(&bytes[bytes.len() - 32..], blake3::hash(&bytes[..bytes.len() - 32]).as_bytes(), "checksum");

    let opened = Keyring::open(&bytes, &keyroot()).unwrap();
    assert_eq!(opened, want, "the fixture decodes to the keyring of today's encoder");
    assert_eq!(opened.chunk_len(ChunkIndex(5)), 1000);
    let tags = KeyringTags::parse(&bytes).unwrap();
    assert_eq!(tags.tags, want.tags());
    assert_eq!(tags.stored_tags().count(), 4);
    assert!(Keyring::open(&bytes, &Keyroot([0; 32])).is_err());

    let nonce: [u8; 12] = bytes[20..32].try_into().unwrap();
    assert!(reference_keyring(&keyroot(), &want, nonce) == bytes, "fixture differs from the specification");
    // Sealing today gives the same layout; only the nonce and what it encrypts differ.
    let resealed = want.seal(&keyroot());
    assert_eq!(resealed.len(), bytes.len());
    assert_eq!(&resealed[..20], &bytes[..20]);
    assert_eq!(&resealed[32..32 + 6 * 32], &bytes[32..32 + 6 * 32]);
    let nonce2: [u8; 12] = resealed[20..32].try_into().unwrap();
    assert!(reference_keyring(&keyroot(), &want, nonce2) == resealed);
}

// ---------------------------------------------------------------------------------------------------------
// Manifest.

/// Format 1 (legacy, unbound): written by builds before manifests were bound; must keep opening.
#[test]
fn manifest_fixture() {
    let bytes = fixture("manifest.bin");
    let want = fixture_manifest(&fixture("keyring.bin"));
    assert_eq!(&bytes[..8], b"ISRM\x01\x00\x00\x00", "magic, version 1 (u16 LE), reserved");
    let body_len = u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
    assert_eq!(bytes.len(), 12 + body_len + 64);
    assert_eq!(std::str::from_utf8(&bytes[12..12 + body_len]).unwrap(), MANIFEST_JSON);
    let end = 12 + body_len;
    assert_eq!(&bytes[end..end + 32], blake3::hash(&bytes[..end]).as_bytes(), "checksum");
    let mac_key = blake3::derive_key("isr 2026-11 manifest mac v1", &keyroot().0);
    assert_eq!(&bytes[end + 32..], blake3::keyed_hash(&mac_key, &bytes[..end]).as_bytes(), "MAC");

    let unbound = ManifestContents { manifest: want.clone(), binding: None };
    let any = fixture_binding();
    assert_eq!(Manifest::open_bound(&bytes, &keyroot(), &any, LegacyManifest::Accept).unwrap(), unbound);
    assert!(matches!(
        Manifest::open_bound(&bytes, &keyroot(), &any, LegacyManifest::Refuse),
        Err(ManifestError::Unbound { .. })
    ));
    assert_eq!(Manifest::open_without_binding_check(&bytes, &keyroot()).unwrap(), unbound);
    assert_eq!(Manifest::parse_unauthenticated(&bytes).unwrap(), unbound);
    assert!(Manifest::open_bound(&bytes, &Keyroot([0; 32]), &any, LegacyManifest::Accept).is_err());
    assert_eq!(want.image(ImageKind::Disk).unwrap().keyring, Tag::of(&fixture("keyring.bin")));
    // Legacy sealing is deterministic: today's legacy encoder writes the fixture byte for byte.
    assert!(want.seal_legacy_unbound(&keyroot()).unwrap() == bytes);
}

/// Format 2: the same manifest bound to `fixture_binding()`, re-derived from the specification.
#[test]
fn bound_manifest_fixture() {
    let bytes = fixture("manifest_v2.bin");
    let want = fixture_manifest(&fixture("keyring.bin"));
    let binding = fixture_binding();
    assert_eq!(&bytes[..8], b"ISRM\x02\x00\x00\x00", "magic, version 2 (u16 LE), reserved");
    let body_len = u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
    assert_eq!(&bytes[12..20], &3u64.to_le_bytes(), "version number");
    assert_eq!(&bytes[20..22], &[11, 13], "user and parcel name lengths");
    assert_eq!(&bytes[22..46], b"golden-usergolden-parcel");
    let start = 46;
    assert_eq!(bytes.len(), start + body_len + 64);
    assert_eq!(std::str::from_utf8(&bytes[start..start + body_len]).unwrap(), MANIFEST_JSON);
    let end = start + body_len;
    assert_eq!(&bytes[end..end + 32], blake3::hash(&bytes[..end]).as_bytes(), "checksum");
    let mac_key = blake3::derive_key("isr 2026-11 manifest mac v2", &keyroot().0);
    assert_eq!(&bytes[end + 32..], blake3::keyed_hash(&mac_key, &bytes[..end]).as_bytes(), "MAC");

    let bound = ManifestContents { manifest: want.clone(), binding: Some(binding.clone()) };
    for legacy in [LegacyManifest::Accept, LegacyManifest::Refuse] {
        assert_eq!(Manifest::open_bound(&bytes, &keyroot(), &binding, legacy).unwrap(), bound);
    }
    assert_eq!(Manifest::parse_unauthenticated(&bytes).unwrap(), bound);
    assert!(matches!(
        Manifest::open_bound(&bytes, &Keyroot([0; 32]), &binding, LegacyManifest::Accept),
        Err(ManifestError::Mac)
    ));
    for other in [
        Binding::new("golden-user", "golden-parcel", 2),
        Binding::new("golden-user", "golden-parcel", 4),
        Binding::new("golden-user", "other-parcel", 3),
        Binding::new("other-user", "golden-parcel", 3),
    ] {
        assert!(
            matches!(
                Manifest::open_bound(&bytes, &keyroot(), &other, LegacyManifest::Accept),
                Err(ManifestError::WrongBinding { .. })
            ),
            "opened as {other}"
        );
    }
    // Sealing is deterministic: today's encoder writes the fixture byte for byte.
    assert!(want.seal(&keyroot(), &binding).unwrap() == bytes);
    // Every flipped byte of the fixture is detected.
    for i in 0..bytes.len() {
        let mut bad = bytes.clone();
        bad[i] ^= 0x01;
        assert!(
            Manifest::open_bound(&bad, &keyroot(), &binding, LegacyManifest::Accept).is_err(),
            "flip at {i} undetected"
        );
    }
}

#[test]
fn fixture_files_are_unchanged() {
    let mut pins = Pins::default();
    for (name, hash) in FIXTURE_HASHES {
        pins.check(name, blake3::hash(&fixture(name)).to_hex(), hash);
    }
    pins.finish();
}

/// Writes the fixture files. Run only when the format version changes (see the module documentation).
#[test]
#[ignore = "writes tests/data; run by hand when the format version changes"]
fn regenerate_fixtures() {
    let dir = data_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let keyring = fixture_keyring().seal(&keyroot());
    std::fs::write(dir.join("keyring.bin"), &keyring).unwrap();
    let manifest = fixture_manifest(&keyring);
    std::fs::write(dir.join("manifest.bin"), manifest.seal_legacy_unbound(&keyroot()).unwrap()).unwrap();
    std::fs::write(dir.join("manifest_v2.bin"), manifest.seal(&keyroot(), &fixture_binding()).unwrap())
        .unwrap();
    let s = UserSecrets::derive("golden-user", "golden password", SMALL_KDF).unwrap();
    std::fs::write(dir.join("wrapped_password.bin"), WrappedKeyroot::wrap(&keyroot(), &s.wrap).0).unwrap();
    let sealed = WrappedKeyroot::seal_for_recovery(&keyroot(), &recovery_secret().public_key());
    std::fs::write(dir.join("wrapped_recovery.bin"), sealed.0).unwrap();
}
