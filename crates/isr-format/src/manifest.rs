//! A version's manifest: the VM description and the images (disk, memory, kernel, initrd) it is made of,
//! bound to the parcel and the version number it was sealed for.
//!
//! Format 2 (written by [`Manifest::seal`]):
//! ```text
//! 0        4   magic "ISRM"
//! 4        2   format version, u16 LE (2)
//! 6        2   reserved (0)
//! 8        4   body length L, u32 LE (at most 1 MiB)
//! 12       8   version number N, u64 LE (at least 1)
//! 20       1   user name length U (1..=255)
//! 21       1   parcel name length P (1..=255)
//! 22       U   user name, UTF-8
//! 22+U     P   parcel name, UTF-8
//! 22+U+P   L   body: UTF-8 JSON (see [`Manifest`])
//! E        32  checksum: BLAKE3 of bytes 0..E, where E = 22+U+P+L (anyone can detect corruption)
//! E+32     32  MAC: keyed BLAKE3 under the keyroot subkey "... manifest mac v2" over bytes 0..E
//! ```
//! Format 1 (legacy, still read; [`Manifest::seal_legacy_unbound`] writes it for tests only) has no binding:
//! ```text
//! 0       4   magic "ISRM"
//! 4       2   format version, u16 LE (1)
//! 6       2   reserved (0)
//! 8       4   body length L, u32 LE (at most 1 MiB)
//! 12      L   body: UTF-8 JSON
//! 12+L    32  checksum: BLAKE3 of bytes 0..12+L
//! 44+L    32  MAC: keyed BLAKE3 under the keyroot subkey "... manifest mac v1" over bytes 0..12+L
//! ```
//! Each image names its keyring by the BLAKE3 hash of the sealed keyring bytes, so the MAC covers the keyrings.
//! Because the MAC of format 2 covers the binding, a manifest replayed for another version or parcel is
//! detected by [`Manifest::open_bound`]; a format 1 manifest can be told apart from nothing, so the caller
//! decides whether it may still be accepted ([`LegacyManifest`]).

use crate::keys::Keyroot;
use crate::tag::Tag;
use crate::units::{ChunkSize, ImageLen};
use serde::{Deserialize, Serialize};

pub const MANIFEST_MAGIC: &[u8; 4] = b"ISRM";
/// The format [`Manifest::seal`] writes: bound to user, parcel and version number.
pub const MANIFEST_VERSION: u16 = 2;
/// The first format: no binding. Still read, never written outside tests.
pub const MANIFEST_VERSION_LEGACY: u16 = 1;
pub const MAX_MANIFEST_BODY: usize = 1 << 20;
/// Longest user or parcel name a binding can hold (its length is one byte).
pub const MAX_BINDING_NAME: usize = 255;
const MAC_CONTEXT_LEGACY: &str = "isr 2026-11 manifest mac v1";
const MAC_CONTEXT: &str = "isr 2026-11 manifest mac v2";
const TRAILER: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest integrity: {0}")]
    Malformed(&'static str),
    #[error("manifest integrity: checksum mismatch")]
    Checksum,
    #[error("manifest integrity: authentication failed (wrong parcel key or altered manifest)")]
    Mac,
    #[error("manifest body is invalid: {0}")]
    Body(String),
    #[error("cannot bind a manifest: {0}")]
    InvalidBinding(&'static str),
    #[error(
        "manifest integrity: expected the manifest of {expected}, but the one served is sealed for {found} \
         (a replayed or misplaced manifest)"
    )]
    WrongBinding { expected: Binding, found: Binding },
    #[error(
        "manifest integrity: expected the manifest of {expected}, but the one served is in the legacy format \
         that names no parcel or version, where only a bound manifest can be right (a replayed manifest?)"
    )]
    Unbound { expected: Binding },
}

/// What a format 2 manifest is bound to: the parcel (owner and name) and the version number it was sealed
/// for. Covered by the MAC, so only a holder of the keyroot can make a manifest claim another binding.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Binding {
    pub user: String,
    pub parcel: String,
    pub version: u64,
}

impl Binding {
    pub fn new(user: impl Into<String>, parcel: impl Into<String>, version: u64) -> Binding {
        Binding { user: user.into(), parcel: parcel.into(), version }
    }

    fn validate(&self) -> Result<(), ManifestError> {
        if self.user.is_empty() || self.user.len() > MAX_BINDING_NAME {
            return Err(ManifestError::InvalidBinding("user name must be 1 to 255 bytes"));
        }
        if self.parcel.is_empty() || self.parcel.len() > MAX_BINDING_NAME {
            return Err(ManifestError::InvalidBinding("parcel name must be 1 to 255 bytes"));
        }
        if self.version == 0 {
            return Err(ManifestError::InvalidBinding("version numbers start at 1"));
        }
        Ok(())
    }
}

impl std::fmt::Display for Binding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "version {} of {}/{}", self.version, self.user, self.parcel)
    }
}

/// Whether [`Manifest::open_bound`] may accept a legacy (format 1, unbound) manifest. Only the caller knows:
/// it depends on what it has seen of the parcel before (see `docs/design.md`, "Manifest").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LegacyManifest {
    Accept,
    Refuse,
}

/// A parsed manifest and the binding it carries (`None` for a legacy manifest).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestContents {
    pub manifest: Manifest,
    pub binding: Option<Binding>,
}

/// Where the parts of a framed manifest are; every range is within the bytes.
struct Frame {
    /// End of the checksummed and MACed part.
    signed_end: usize,
    body: std::ops::Range<usize>,
    binding: Option<Binding>,
    mac_context: &'static str,
}

/// How to run the VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDescription {
    pub memory_mib: u32,
    pub cpus: u32,
    /// Kernel command line for direct kernel boot (used when the manifest has a kernel image).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub append: Option<String>,
    /// The emulated devices besides CPU, RAM, disk and serial port: part of a saved memory image, so a parcel
    /// resumes with the devices it was created with on every client. See [`DeviceModel`].
    #[serde(default, skip_serializing_if = "DeviceModel::is_serial_only")]
    pub devices: DeviceModel,
}

/// The device model of a VM (numbered; a number never changes meaning).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DeviceModel(pub u32);

impl DeviceModel {
    /// Serial console only (parcels made before the desktop devices existed).
    pub const SERIAL_ONLY: DeviceModel = DeviceModel(0);
    /// A desktop: standard VGA, USB tablet (absolute pointer) and PS/2 keyboard, and a virtio-serial channel
    /// for the QEMU guest agent.
    pub const DESKTOP_1: DeviceModel = DeviceModel(1);
    /// [`DeviceModel::DESKTOP_1`] and a virtio NIC (user-mode NAT, or no way out under IT's policy `none`).
    pub const DESKTOP_2: DeviceModel = DeviceModel(2);
    /// What new parcels get.
    pub const CURRENT: DeviceModel = DeviceModel::DESKTOP_2;

    pub fn is_serial_only(&self) -> bool {
        *self == DeviceModel::SERIAL_ONLY
    }

    /// A display adapter, tablet and keyboard.
    pub fn has_display(self) -> bool {
        self.0 >= 1
    }

    /// A virtio-serial port for the guest agent.
    pub fn has_agent_channel(self) -> bool {
        self.0 >= 1
    }

    /// A virtio NIC.
    pub fn has_nic(self) -> bool {
        self.0 >= 2
    }
}

impl VmDescription {
    /// The limits every VM description must keep (checked before a parcel is created, and at every seal).
    pub fn validate(&self) -> Result<(), ManifestError> {
        let bad = |m: &str| Err(ManifestError::Body(m.to_owned()));
        if !(16..=1 << 20).contains(&self.memory_mib) {
            return bad("memory must be between 16 MiB and 1 TiB");
        }
        if !(1..=256).contains(&self.cpus) {
            return bad("cpus must be between 1 and 256");
        }
        if self.append.as_ref().is_some_and(|a| a.len() > 4096) {
            return bad("kernel command line longer than 4096 bytes");
        }
        if self.devices.0 > DeviceModel::CURRENT.0 {
            return bad("device model newer than this isr knows (upgrade isr)");
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageKind {
    Disk,
    Memory,
    Kernel,
    Initrd,
}

impl ImageKind {
    pub const ALL: [ImageKind; 4] =
        [ImageKind::Disk, ImageKind::Memory, ImageKind::Kernel, ImageKind::Initrd];
    pub fn name(self) -> &'static str {
        match self {
            ImageKind::Disk => "disk",
            ImageKind::Memory => "memory",
            ImageKind::Kernel => "kernel",
            ImageKind::Initrd => "initrd",
        }
    }
}

/// One image of a version: its length and the hash of its sealed keyring.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRef {
    pub len: ImageLen,
    pub keyring: Tag,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub vm: VmDescription,
    pub chunk_size: ChunkSize,
    pub disk: ImageRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<ImageRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<ImageRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<ImageRef>,
    /// Seconds since the Unix epoch, as the client saw it.
    pub created_unix: i64,
    #[serde(default)]
    pub comment: String,
}

impl Manifest {
    pub fn image(&self, kind: ImageKind) -> Option<&ImageRef> {
        match kind {
            ImageKind::Disk => Some(&self.disk),
            ImageKind::Memory => self.memory.as_ref(),
            ImageKind::Kernel => self.kernel.as_ref(),
            ImageKind::Initrd => self.initrd.as_ref(),
        }
    }

    pub fn images(&self) -> impl Iterator<Item = (ImageKind, &ImageRef)> {
        ImageKind::ALL.into_iter().filter_map(|k| self.image(k).map(|r| (k, r)))
    }

    fn validate(&self) -> Result<(), ManifestError> {
        let bad = |m: &str| Err(ManifestError::Body(m.to_owned()));
        self.vm.validate()?;
        if self.comment.len() > 4096 {
            return bad("comment longer than 4096 bytes");
        }
        if self.disk.len.0 == 0 {
            return bad("disk image is empty");
        }
        if self.initrd.is_some() && self.kernel.is_none() {
            return bad("an initrd needs a kernel");
        }
        Ok(())
    }

    /// Serialize and authenticate with the parcel's keyroot, bound to `binding` (format 2).
    pub fn seal(&self, keyroot: &Keyroot, binding: &Binding) -> Result<Vec<u8>, ManifestError> {
        binding.validate()?;
        let body = self.body()?;
        let mut out =
            Vec::with_capacity(22 + binding.user.len() + binding.parcel.len() + body.len() + TRAILER);
        out.extend_from_slice(MANIFEST_MAGIC);
        out.extend_from_slice(&MANIFEST_VERSION.to_le_bytes());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&binding.version.to_le_bytes());
        out.push(binding.user.len() as u8);
        out.push(binding.parcel.len() as u8);
        out.extend_from_slice(binding.user.as_bytes());
        out.extend_from_slice(binding.parcel.as_bytes());
        out.extend_from_slice(&body);
        Ok(Self::append_trailer(out, keyroot, MAC_CONTEXT))
    }

    /// Serialize in the legacy format 1, which binds nothing. Only for tests and fixtures that must show how
    /// old manifests are read: real commits always use [`Manifest::seal`].
    pub fn seal_legacy_unbound(&self, keyroot: &Keyroot) -> Result<Vec<u8>, ManifestError> {
        let body = self.body()?;
        let mut out = Vec::with_capacity(12 + body.len() + TRAILER);
        out.extend_from_slice(MANIFEST_MAGIC);
        out.extend_from_slice(&MANIFEST_VERSION_LEGACY.to_le_bytes());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
        Ok(Self::append_trailer(out, keyroot, MAC_CONTEXT_LEGACY))
    }

    fn body(&self) -> Result<Vec<u8>, ManifestError> {
        self.validate()?;
        let body = serde_json::to_vec(self).map_err(|e| ManifestError::Body(e.to_string()))?;
        if body.len() > MAX_MANIFEST_BODY {
            return Err(ManifestError::Body("manifest body larger than 1 MiB".into()));
        }
        Ok(body)
    }

    fn append_trailer(mut out: Vec<u8>, keyroot: &Keyroot, mac_context: &str) -> Vec<u8> {
        let sum = blake3::hash(&out);
        let mac = blake3::keyed_hash(&keyroot.subkey(mac_context), &out);
        out.extend_from_slice(sum.as_bytes());
        out.extend_from_slice(mac.as_bytes());
        out
    }

    /// Parse without the keyroot, checking structure and checksum only (what the server can do). The binding
    /// is returned as claimed: nothing but the MAC proves it.
    pub fn parse_unauthenticated(bytes: &[u8]) -> Result<ManifestContents, ManifestError> {
        let frame = Self::check_frame(bytes)?;
        let manifest: Manifest =
            serde_json::from_slice(&bytes[frame.body]).map_err(|e| ManifestError::Body(e.to_string()))?;
        manifest.validate()?;
        Ok(ManifestContents { manifest, binding: frame.binding })
    }

    /// Parse an untrusted manifest and verify it was written by a holder of `keyroot` for exactly `expected`
    /// (user, parcel and version). A legacy manifest carries no binding: it is accepted only when `legacy`
    /// says so, and then returned with `binding: None`.
    pub fn open_bound(
        bytes: &[u8],
        keyroot: &Keyroot,
        expected: &Binding,
        legacy: LegacyManifest,
    ) -> Result<ManifestContents, ManifestError> {
        let contents = Self::open_without_binding_check(bytes, keyroot)?;
        match &contents.binding {
            Some(found) if found != expected => {
                Err(ManifestError::WrongBinding { expected: expected.clone(), found: found.clone() })
            }
            Some(_) => Ok(contents),
            None if legacy == LegacyManifest::Accept => Ok(contents),
            None => Err(ManifestError::Unbound { expected: expected.clone() }),
        }
    }

    /// Parse an untrusted manifest and verify its MAC, but not what it is bound to: the caller must compare
    /// the returned binding with what it asked for. Prefer [`Manifest::open_bound`].
    pub fn open_without_binding_check(
        bytes: &[u8],
        keyroot: &Keyroot,
    ) -> Result<ManifestContents, ManifestError> {
        let frame = Self::check_frame(bytes)?;
        let end = frame.signed_end;
        let mac = blake3::keyed_hash(&keyroot.subkey(frame.mac_context), &bytes[..end]);
        // blake3::Hash compares in constant time.
        if mac != blake3::Hash::from_bytes(bytes[end + 32..end + 64].try_into().expect("32")) {
            return Err(ManifestError::Mac);
        }
        Self::parse_unauthenticated(bytes)
    }

    fn check_frame(bytes: &[u8]) -> Result<Frame, ManifestError> {
        if bytes.len() < 12 + TRAILER {
            return Err(ManifestError::Malformed("shorter than header and trailer"));
        }
        if &bytes[..4] != MANIFEST_MAGIC {
            return Err(ManifestError::Malformed("bad magic"));
        }
        let format = u16::from_le_bytes([bytes[4], bytes[5]]);
        if format != MANIFEST_VERSION && format != MANIFEST_VERSION_LEGACY {
            return Err(ManifestError::Malformed("unsupported version"));
        }
        if bytes[6..8] != [0, 0] {
            return Err(ManifestError::Malformed("reserved bytes set"));
        }
        let len = u32::from_le_bytes(bytes[8..12].try_into().expect("4")) as usize;
        if len > MAX_MANIFEST_BODY {
            return Err(ManifestError::Malformed("body larger than 1 MiB"));
        }
        let (body_start, binding, mac_context) = if format == MANIFEST_VERSION_LEGACY {
            (12, None, MAC_CONTEXT_LEGACY)
        } else {
            let (binding, end) = Self::parse_binding(bytes)?;
            (end, Some(binding), MAC_CONTEXT)
        };
        if bytes.len() != body_start + len + TRAILER {
            return Err(ManifestError::Malformed("length does not match header"));
        }
        let signed_end = body_start + len;
        if blake3::hash(&bytes[..signed_end]).as_bytes() != &bytes[signed_end..signed_end + 32] {
            return Err(ManifestError::Checksum);
        }
        Ok(Frame { signed_end, body: body_start..signed_end, binding, mac_context })
    }

    /// The binding of a format 2 manifest (bytes 12..), and where the body starts.
    fn parse_binding(bytes: &[u8]) -> Result<(Binding, usize), ManifestError> {
        // At least the fixed part of the binding and the trailer must be there before anything is read.
        if bytes.len() < 22 + TRAILER {
            return Err(ManifestError::Malformed("shorter than header, binding and trailer"));
        }
        let version = u64::from_le_bytes(bytes[12..20].try_into().expect("8"));
        let (user_len, parcel_len) = (bytes[20] as usize, bytes[21] as usize);
        let names_end = 22 + user_len + parcel_len;
        if bytes.len() < names_end + TRAILER {
            return Err(ManifestError::Malformed("binding longer than the manifest"));
        }
        let name = |range: std::ops::Range<usize>, what| {
            std::str::from_utf8(&bytes[range]).map(str::to_owned).map_err(|_| ManifestError::Malformed(what))
        };
        let binding = Binding {
            user: name(22..22 + user_len, "user name is not UTF-8")?,
            parcel: name(22 + user_len..names_end, "parcel name is not UTF-8")?,
            version,
        };
        binding.validate().map_err(|e| match e {
            ManifestError::InvalidBinding(m) => ManifestError::Malformed(m),
            other => other,
        })?;
        Ok((binding, names_end))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn sample() -> Manifest {
        Manifest {
            vm: VmDescription {
                memory_mib: 256,
                cpus: 1,
                append: Some("console=ttyS0".into()),
                devices: DeviceModel::SERIAL_ONLY,
            },
            chunk_size: ChunkSize::DEFAULT,
            disk: ImageRef { len: ImageLen(64 << 20), keyring: Tag([1; 32]) },
            memory: None,
            kernel: Some(ImageRef { len: ImageLen(9_000_000), keyring: Tag([2; 32]) }),
            initrd: None,
            created_unix: 1_800_000_000,
            comment: "first".into(),
        }
    }

    fn binding() -> Binding {
        Binding::new("alice", "work-vm", 7)
    }

    fn open(bytes: &[u8], kr: &Keyroot) -> Result<ManifestContents, ManifestError> {
        Manifest::open_bound(bytes, kr, &binding(), LegacyManifest::Refuse)
    }

    #[test]
    fn roundtrip_and_mac() {
        let kr = Keyroot::random();
        let bytes = sample().seal(&kr, &binding()).unwrap();
        let want = ManifestContents { manifest: sample(), binding: Some(binding()) };
        assert_eq!(open(&bytes, &kr).unwrap(), want);
        assert_eq!(Manifest::parse_unauthenticated(&bytes).unwrap(), want);
        assert_eq!(Manifest::open_without_binding_check(&bytes, &kr).unwrap(), want);
        assert!(matches!(open(&bytes, &Keyroot::random()), Err(ManifestError::Mac)));
    }

    #[test]
    fn another_binding_is_refused() {
        let kr = Keyroot::random();
        let bytes = sample().seal(&kr, &binding()).unwrap();
        for other in [
            Binding::new("alice", "work-vm", 6),
            Binding::new("alice", "work-vm", 8),
            Binding::new("alice", "work-vm2", 7),
            Binding::new("bob", "work-vm", 7),
        ] {
            for legacy in [LegacyManifest::Accept, LegacyManifest::Refuse] {
                match Manifest::open_bound(&bytes, &kr, &other, legacy) {
                    Err(ManifestError::WrongBinding { expected, found }) => {
                        assert_eq!((expected, found), (other.clone(), binding()));
                    }
                    r => panic!("{other} opened as {r:?}"),
                }
            }
        }
        let msg =
            Manifest::open_bound(&bytes, &kr, &Binding::new("alice", "work-vm", 8), LegacyManifest::Refuse)
                .unwrap_err()
                .to_string();
        assert!(
            msg.contains("version 8 of alice/work-vm") && msg.contains("version 7 of alice/work-vm"),
            "{msg}"
        );
    }

    #[test]
    fn legacy_manifests_open_only_when_the_caller_allows() {
        let kr = Keyroot::random();
        let bytes = sample().seal_legacy_unbound(&kr).unwrap();
        assert_eq!(&bytes[4..6], &[1, 0]);
        let opened = Manifest::open_bound(&bytes, &kr, &binding(), LegacyManifest::Accept).unwrap();
        assert_eq!(opened, ManifestContents { manifest: sample(), binding: None });
        assert!(matches!(open(&bytes, &kr), Err(ManifestError::Unbound { .. })));
        assert!(matches!(
            Manifest::open_bound(&bytes, &Keyroot::random(), &binding(), LegacyManifest::Accept),
            Err(ManifestError::Mac)
        ));
    }

    #[test]
    fn a_legacy_frame_cannot_pass_for_a_bound_one() {
        // Same body and key, but the format field is under the MAC and the MAC keys differ per format.
        let kr = Keyroot::random();
        let mut bytes = sample().seal_legacy_unbound(&kr).unwrap();
        bytes[4] = 2;
        let end = bytes.len() - TRAILER;
        let sum = blake3::hash(&bytes[..end]);
        bytes[end..end + 32].copy_from_slice(sum.as_bytes());
        assert!(Manifest::open_without_binding_check(&bytes, &kr).is_err());
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let kr = Keyroot::random();
        for bytes in [sample().seal(&kr, &binding()).unwrap(), sample().seal_legacy_unbound(&kr).unwrap()] {
            for i in 0..bytes.len() {
                let mut bad = bytes.clone();
                bad[i] ^= 0x04;
                assert!(
                    Manifest::open_bound(&bad, &kr, &binding(), LegacyManifest::Accept).is_err(),
                    "flip at {i} of format {} undetected",
                    bytes[4]
                );
            }
        }
    }

    #[test]
    fn invalid_bodies_and_bindings_are_refused() {
        let kr = Keyroot::random();
        let mut m = sample();
        m.vm.cpus = 0;
        assert!(m.seal(&kr, &binding()).is_err());
        assert!(m.seal_legacy_unbound(&kr).is_err());
        let mut m = sample();
        m.kernel = None;
        m.initrd = Some(m.disk);
        assert!(m.seal(&kr, &binding()).is_err());
        for bad in [
            Binding::new("", "p", 1),
            Binding::new("u", "", 1),
            Binding::new("u", "p", 0),
            Binding::new("u".repeat(256), "p", 1),
            Binding::new("u", "p".repeat(256), 1),
        ] {
            assert!(matches!(sample().seal(&kr, &bad), Err(ManifestError::InvalidBinding(_))), "{bad:?}");
        }
        assert!(sample().seal(&kr, &Binding::new("u".repeat(255), "p".repeat(255), u64::MAX)).is_ok());
    }

    #[test]
    fn malformed_bindings_are_refused_before_the_body() {
        // Frames whose checksum is right but whose binding is not: each is refused as malformed.
        let frame = |version: u64, user: &[u8], parcel: &[u8], declared: (u8, u8)| {
            let body = serde_json::to_vec(&sample()).unwrap();
            let mut b = MANIFEST_MAGIC.to_vec();
            b.extend_from_slice(&[2, 0, 0, 0]);
            b.extend_from_slice(&(body.len() as u32).to_le_bytes());
            b.extend_from_slice(&version.to_le_bytes());
            b.extend_from_slice(&[declared.0, declared.1]);
            b.extend_from_slice(user);
            b.extend_from_slice(parcel);
            b.extend_from_slice(&body);
            let sum = blake3::hash(&b);
            b.extend_from_slice(sum.as_bytes());
            b.extend_from_slice(&[0; 32]);
            b
        };
        assert!(Manifest::parse_unauthenticated(&frame(3, b"u", b"p", (1, 1))).is_ok());
        for bad in [
            frame(0, b"u", b"p", (1, 1)),
            frame(3, b"", b"p", (0, 1)),
            frame(3, b"u", b"", (1, 0)),
            frame(3, b"\xff", b"p", (1, 1)),
            frame(3, b"u", b"\xc3", (1, 1)),
            frame(3, b"u", b"p", (200, 200)),
        ] {
            assert!(
                matches!(Manifest::parse_unauthenticated(&bad), Err(ManifestError::Malformed(_))),
                "{:?}",
                Manifest::parse_unauthenticated(&bad)
            );
        }
    }

    proptest! {
        #[test]
        fn parse_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = Manifest::parse_unauthenticated(&bytes);
            let _ = Manifest::open_without_binding_check(&bytes, &Keyroot([5; 32]));
        }

        #[test]
        fn parse_framed_arbitrary_body_never_panics(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut bytes = Vec::new();
            bytes.extend_from_slice(MANIFEST_MAGIC);
            bytes.extend_from_slice(&[1, 0, 0, 0]);
            bytes.extend_from_slice(&(body.len() as u32).to_le_bytes());
            bytes.extend_from_slice(&body);
            let sum = blake3::hash(&bytes);
            bytes.extend_from_slice(sum.as_bytes());
            bytes.extend_from_slice(&[0; 32]);
            prop_assert!(Manifest::parse_unauthenticated(&bytes).is_err() || serde_json::from_slice::<Manifest>(&body).is_ok());
        }

        /// Arbitrary binding bytes after a format 2 header, with a valid checksum: never a panic, and whatever
        /// parses reports exactly the names and number that were framed.
        #[test]
        fn parse_framed_arbitrary_binding(
            version in any::<u64>(),
            user in proptest::collection::vec(any::<u8>(), 0..300),
            parcel in proptest::collection::vec(any::<u8>(), 0..300),
            declared in any::<(u8, u8)>(),
        ) {
            let body = serde_json::to_vec(&sample()).unwrap();
            let mut bytes = MANIFEST_MAGIC.to_vec();
            bytes.extend_from_slice(&[2, 0, 0, 0]);
            bytes.extend_from_slice(&(body.len() as u32).to_le_bytes());
            bytes.extend_from_slice(&version.to_le_bytes());
            bytes.extend_from_slice(&[declared.0, declared.1]);
            bytes.extend_from_slice(&user);
            bytes.extend_from_slice(&parcel);
            bytes.extend_from_slice(&body);
            let sum = blake3::hash(&bytes);
            bytes.extend_from_slice(sum.as_bytes());
            bytes.extend_from_slice(&[0; 32]);
            if let Ok(c) = Manifest::parse_unauthenticated(&bytes) {
                let b = c.binding.expect("format 2 is bound");
                prop_assert_eq!(b.version, version);
                prop_assert_eq!(declared.0 as usize, user.len());
                prop_assert_eq!(declared.1 as usize, parcel.len());
                prop_assert_eq!(b.user.as_bytes(), &user[..]);
                prop_assert_eq!(b.parcel.as_bytes(), &parcel[..]);
                prop_assert_eq!(c.manifest, sample());
            }
        }

        /// Whatever binding is sealed opens to itself and to nothing else.
        #[test]
        fn sealed_bindings_roundtrip(
            user in "[a-z0-9._-]{1,64}",
            parcel in "[a-zA-Z0-9._-]{1,64}",
            version in 1..u64::MAX,
        ) {
            let kr = Keyroot([9; 32]);
            let b = Binding::new(user, parcel, version);
            let bytes = sample().seal(&kr, &b).unwrap();
            prop_assert_eq!(Manifest::open_bound(&bytes, &kr, &b, LegacyManifest::Refuse).unwrap().binding, Some(b.clone()));
            let next = Binding { version: version + 1, ..b };
            let refused = matches!(
                Manifest::open_bound(&bytes, &kr, &next, LegacyManifest::Accept),
                Err(ManifestError::WrongBinding { .. })
            );
            prop_assert!(refused);
        }
    }
}
