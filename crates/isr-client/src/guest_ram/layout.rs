//! The memory image of a VM whose RAM is a shared file (`x-ignore-shared`): the RAM itself, then the device
//! state QEMU saved beside it, in one image, so that the two are always of the same version.
//!
//! ```text
//! offset                      length            content
//! 0                           ram_len           guest RAM, byte for byte (QEMU's `pc.ram`)
//! ram_len                     4096              header (below)
//! ram_len + 4096              state_len         device state: a QEMU migration stream without the RAM
//! ram_len + 4096 + state_len  trace_len         access trace: the order of first touches ([`crate::access_trace`])
//! ... + trace_len             up to the end     zero
//! image length: ram_len + DEVICE_REGION (64 MiB)
//!
//! header      offset  length  field
//!             0       16      magic "isr-ram+devices\0"
//!             16      4       format version, u32 LE (1)
//!             20      4       zero
//!             24      8       ram_len, u64 LE (the VM's memory size; a multiple of 1 MiB)
//!             32      8       state_len, u64 LE (at most DEVICE_REGION - 4096)
//!             40      32      BLAKE3 of the device state
//!             72      8       trace_len, u64 LE (a multiple of 8; state_len + trace_len <= DEVICE_REGION - 4096)
//!             80      32      BLAKE3 of the access trace
//!             112     3984    zero
//! ```
//!
//! With the default chunk size (128 KiB) `ram_len` (whole MiB) ends on a chunk boundary, so no RAM shares a
//! chunk with the device state: a chunk of RAM the guest did not change keeps its tag from one suspend to the
//! next. The unused rest of the
//! region is zero chunks, which cost a keyring entry and nothing else. An image without the header (its length
//! differs, or the magic is not there) is a whole QEMU memory image (`mapped-ram`) of an earlier isr.

use std::sync::Arc;

use crate::error::ClientError;
use crate::image::WorkingImage;

/// The room after the RAM for the header and the device state.
pub const DEVICE_REGION: u64 = 64 << 20;
/// The header's length (one page).
pub const HEADER_LEN: usize = 4096;
const MAGIC: &[u8; 16] = b"isr-ram+devices\0";
const VERSION: u32 = 1;

/// The length of the memory image of a VM with `ram_len` bytes of RAM.
pub fn image_len(ram_len: u64) -> u64 {
    ram_len + DEVICE_REGION
}

/// The most device state the region holds.
pub const MAX_STATE: u64 = DEVICE_REGION - HEADER_LEN as u64;

/// What a header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub ram_len: u64,
    pub state_len: u64,
    pub state_hash: [u8; 32],
    pub trace_len: u64,
    pub trace_hash: [u8; 32],
}

/// What the device region holds besides the RAM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Saved {
    /// QEMU's device state (a migration stream without the RAM).
    pub state: Vec<u8>,
    /// The access trace of the run that saved it.
    pub trace: Vec<crate::access_trace::Touch>,
}

impl Header {
    pub fn of(ram_len: u64, state: &[u8], trace: &[u8]) -> Header {
        Header {
            ram_len,
            state_len: state.len() as u64,
            state_hash: *blake3::hash(state).as_bytes(),
            trace_len: trace.len() as u64,
            trace_hash: *blake3::hash(trace).as_bytes(),
        }
    }

    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..16].copy_from_slice(MAGIC);
        b[16..20].copy_from_slice(&VERSION.to_le_bytes());
        b[24..32].copy_from_slice(&self.ram_len.to_le_bytes());
        b[32..40].copy_from_slice(&self.state_len.to_le_bytes());
        b[40..72].copy_from_slice(&self.state_hash);
        b[72..80].copy_from_slice(&self.trace_len.to_le_bytes());
        b[80..112].copy_from_slice(&self.trace_hash);
        b
    }

    /// `None`: not a header (no magic); an error: a header that is damaged or of a newer isr.
    pub fn parse(b: &[u8]) -> Option<Result<Header, String>> {
        if b.len() < HEADER_LEN || &b[..16] != MAGIC {
            return None;
        }
        let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
        let version = u32::from_le_bytes(b[16..20].try_into().expect("4 bytes"));
        Some(if version != VERSION {
            Err(format!("format version {version} (this isr reads {VERSION}: upgrade isr)"))
        } else if b[20..24] != [0; 4] || b[112..HEADER_LEN].iter().any(|&x| x != 0) {
            Err("reserved bytes are not zero".into())
        } else if u64_at(32).checked_add(u64_at(72)).is_none_or(|n| n > MAX_STATE) {
            Err(format!(
                "a device state of {} bytes and a trace of {} do not fit their region",
                u64_at(32),
                u64_at(72)
            ))
        } else {
            Ok(Header {
                ram_len: u64_at(24),
                state_len: u64_at(32),
                state_hash: b[40..72].try_into().expect("32"),
                trace_len: u64_at(72),
                trace_hash: b[80..112].try_into().expect("32"),
            })
        })
    }
}

/// The device state and trace of `img` when it is a memory image of this layout for `ram_len` bytes of RAM
/// (verified against its header); `None` when it is not of this layout (a whole QEMU memory image).
pub async fn read_saved(img: &Arc<WorkingImage>, ram_len: u64) -> Result<Option<Saved>, ClientError> {
    if img.len() != image_len(ram_len) {
        return Ok(None);
    }
    let (page, r) = img.read_owned(ram_len, vec![0u8; HEADER_LEN]).await;
    r.map_err(|e| ClientError::io("reading the memory image's device header", e))?;
    let header = match Header::parse(&page) {
        None => return Ok(None),
        Some(Err(why)) => {
            return Err(ClientError::Integrity(format!("the memory image's device header: {why}")))
        }
        Some(Ok(h)) => h,
    };
    if header.ram_len != ram_len {
        return Err(ClientError::Integrity(format!(
            "the memory image is of a VM with {} MiB of RAM, this VM has {} MiB",
            header.ram_len >> 20,
            ram_len >> 20
        )));
    }
    let at = ram_len + HEADER_LEN as u64;
    let (mut both, r) = img.read_owned(at, vec![0u8; (header.state_len + header.trace_len) as usize]).await;
    r.map_err(|e| ClientError::io("reading the memory image's device state", e))?;
    let trace_bytes = both.split_off(header.state_len as usize);
    let state = both;
    if blake3::hash(&state).as_bytes() != &header.state_hash {
        return Err(ClientError::Integrity(
            "the memory image's device state does not match its header".into(),
        ));
    }
    if blake3::hash(&trace_bytes).as_bytes() != &header.trace_hash {
        return Err(ClientError::Integrity(
            "the memory image's access trace does not match its header".into(),
        ));
    }
    let trace = crate::access_trace::decode(&trace_bytes)
        .map_err(|why| ClientError::Integrity(format!("the memory image's access trace: {why}")))?;
    Ok(Some(Saved { state, trace }))
}

/// Store `saved` after the RAM of `img` (a memory image of this layout), and zero the rest of the region.
pub async fn write_saved(img: &WorkingImage, ram_len: u64, saved: &Saved) -> Result<(), ClientError> {
    let state = &saved.state;
    let mut trace = crate::access_trace::encode(&saved.trace);
    // The trace is a hint: cut to what fits beside the state.
    trace.truncate((MAX_STATE.saturating_sub(state.len() as u64) as usize) / 8 * 8);
    if img.len() != image_len(ram_len) {
        return Err(ClientError::Other(format!(
            "the memory image is {} bytes, not {} for {} MiB of RAM",
            img.len(),
            image_len(ram_len),
            ram_len >> 20
        )));
    }
    if state.len() as u64 > MAX_STATE {
        return Err(ClientError::Other(format!(
            "QEMU saved {} MiB of device state; at most {} MiB fit the memory image",
            state.len() >> 20,
            MAX_STATE >> 20
        )));
    }
    let mut region = Header::of(ram_len, state, &trace).to_bytes().to_vec();
    region.extend_from_slice(state);
    region.extend_from_slice(&trace);
    let end = ram_len + region.len() as u64;
    img.write(ram_len, &region).await.map_err(|e| ClientError::io("writing the device state", e))?;
    img.write_zeroes(end, img.len() - end)
        .await
        .map_err(|e| ClientError::io("zeroing the device region", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_bytes_are_as_documented() {
        let h = Header::of(256 << 20, b"QEVM state", &[7, 0, 0, 0, 1, 0, 0, 0]);
        let b = h.to_bytes();
        assert_eq!(&b[..16], b"isr-ram+devices\0");
        assert_eq!(b[16..20], [1, 0, 0, 0]);
        assert_eq!(b[24..32], (256u64 << 20).to_le_bytes());
        assert_eq!(b[32..40], 10u64.to_le_bytes());
        assert_eq!(&b[40..72], blake3::hash(b"QEVM state").as_bytes());
        assert_eq!(b[72..80], 8u64.to_le_bytes());
        assert_eq!(&b[80..112], blake3::hash(&[7, 0, 0, 0, 1, 0, 0, 0]).as_bytes());
        assert!(b[112..].iter().all(|&x| x == 0));
        assert_eq!(Header::parse(&b), Some(Ok(h)));
    }

    #[test]
    fn other_bytes_are_not_a_header_and_damage_is_named() {
        assert_eq!(Header::parse(&[0u8; HEADER_LEN]), None);
        assert_eq!(Header::parse(b"isr-ram+devices\0"), None, "too short");
        let good = Header::of(1 << 20, b"x", b"").to_bytes();
        let mut v2 = good;
        v2[16] = 2;
        assert!(Header::parse(&v2).unwrap().unwrap_err().contains("version 2"));
        let mut junk = good;
        junk[4000] = 1;
        assert!(Header::parse(&junk).unwrap().unwrap_err().contains("reserved"));
        let mut huge = good;
        huge[32..40].copy_from_slice(&DEVICE_REGION.to_le_bytes());
        assert!(Header::parse(&huge).unwrap().unwrap_err().contains("do not fit"));
        let mut wraps = good;
        wraps[72..80].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(Header::parse(&wraps).unwrap().unwrap_err().contains("do not fit"));
    }
}
