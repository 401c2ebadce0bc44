//! A version's manifest: the VM description and the images (disk, memory, kernel, initrd) it is made of.
//!
//! ```text
//! 0       4   magic "ISRM"
//! 4       2   format version, u16 LE (1)
//! 6       2   reserved (0)
//! 8       4   body length L, u32 LE (at most 1 MiB)
//! 12      L   body: UTF-8 JSON (see [`Manifest`])
//! 12+L    32  checksum: BLAKE3 of bytes 0..12+L (anyone can detect corruption)
//! 44+L    32  MAC: keyed BLAKE3 under a keyroot subkey over bytes 0..12+L (only the parcel's owner can forge)
//! ```
//! Each image names its keyring by the BLAKE3 hash of the sealed keyring bytes, so the MAC covers the keyrings.

use crate::keys::Keyroot;
use crate::tag::Tag;
use crate::units::{ChunkSize, ImageLen};
use serde::{Deserialize, Serialize};

pub const MANIFEST_MAGIC: &[u8; 4] = b"ISRM";
pub const MANIFEST_VERSION: u16 = 1;
pub const MAX_MANIFEST_BODY: usize = 1 << 20;
const MAC_CONTEXT: &str = "isr 2026-11 manifest mac v1";

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
    /// What new parcels get.
    pub const CURRENT: DeviceModel = DeviceModel::DESKTOP_1;

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

    /// Serialize and authenticate with the parcel's keyroot.
    pub fn seal(&self, keyroot: &Keyroot) -> Result<Vec<u8>, ManifestError> {
        self.validate()?;
        let body = serde_json::to_vec(self).map_err(|e| ManifestError::Body(e.to_string()))?;
        if body.len() > MAX_MANIFEST_BODY {
            return Err(ManifestError::Body("manifest body larger than 1 MiB".into()));
        }
        let mut out = Vec::with_capacity(12 + body.len() + 64);
        out.extend_from_slice(MANIFEST_MAGIC);
        out.extend_from_slice(&MANIFEST_VERSION.to_le_bytes());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
        let sum = blake3::hash(&out);
        let mac = blake3::keyed_hash(&keyroot.subkey(MAC_CONTEXT), &out);
        out.extend_from_slice(sum.as_bytes());
        out.extend_from_slice(mac.as_bytes());
        Ok(out)
    }

    /// Parse without the keyroot, checking structure and checksum only (what the server can do).
    pub fn parse_unauthenticated(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        let body_end = Self::check_frame(bytes)?;
        let m: Manifest =
            serde_json::from_slice(&bytes[12..body_end]).map_err(|e| ManifestError::Body(e.to_string()))?;
        m.validate()?;
        Ok(m)
    }

    /// Parse an untrusted manifest and verify it was written by a holder of `keyroot`.
    pub fn open(bytes: &[u8], keyroot: &Keyroot) -> Result<Manifest, ManifestError> {
        let body_end = Self::check_frame(bytes)?;
        let mac = blake3::keyed_hash(&keyroot.subkey(MAC_CONTEXT), &bytes[..body_end]);
        // blake3::Hash compares in constant time.
        if mac != blake3::Hash::from_bytes(bytes[body_end + 32..].try_into().expect("32")) {
            return Err(ManifestError::Mac);
        }
        Self::parse_unauthenticated(bytes)
    }

    fn check_frame(bytes: &[u8]) -> Result<usize, ManifestError> {
        if bytes.len() < 12 + 64 {
            return Err(ManifestError::Malformed("shorter than header and trailer"));
        }
        if &bytes[..4] != MANIFEST_MAGIC {
            return Err(ManifestError::Malformed("bad magic"));
        }
        if u16::from_le_bytes([bytes[4], bytes[5]]) != MANIFEST_VERSION {
            return Err(ManifestError::Malformed("unsupported version"));
        }
        if bytes[6..8] != [0, 0] {
            return Err(ManifestError::Malformed("reserved bytes set"));
        }
        let len = u32::from_le_bytes(bytes[8..12].try_into().expect("4")) as usize;
        if len > MAX_MANIFEST_BODY {
            return Err(ManifestError::Malformed("body larger than 1 MiB"));
        }
        if bytes.len() != 12 + len + 64 {
            return Err(ManifestError::Malformed("length does not match header"));
        }
        let body_end = 12 + len;
        if blake3::hash(&bytes[..body_end]).as_bytes() != &bytes[body_end..body_end + 32] {
            return Err(ManifestError::Checksum);
        }
        Ok(body_end)
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

    #[test]
    fn roundtrip_and_mac() {
        let kr = Keyroot::random();
        let bytes = sample().seal(&kr).unwrap();
        assert_eq!(Manifest::open(&bytes, &kr).unwrap(), sample());
        assert_eq!(Manifest::parse_unauthenticated(&bytes).unwrap(), sample());
        assert!(matches!(Manifest::open(&bytes, &Keyroot::random()), Err(ManifestError::Mac)));
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let kr = Keyroot::random();
        let bytes = sample().seal(&kr).unwrap();
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x04;
            assert!(Manifest::open(&bad, &kr).is_err(), "flip at {i} undetected");
        }
    }

    #[test]
    fn invalid_bodies_are_refused() {
        let kr = Keyroot::random();
        let mut m = sample();
        m.vm.cpus = 0;
        assert!(m.seal(&kr).is_err());
        let mut m = sample();
        m.kernel = None;
        m.initrd = Some(m.disk);
        assert!(m.seal(&kr).is_err());
    }

    proptest! {
        #[test]
        fn parse_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = Manifest::parse_unauthenticated(&bytes);
            let _ = Manifest::open(&bytes, &Keyroot([5; 32]));
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
    }
}
