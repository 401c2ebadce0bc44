//! A light look at a memory image's header, to refuse an image that does not fit the VM before QEMU loads
//! it. Needed because QEMU 10 does not compare RAM sizes when loading a `mapped-ram` image: a 256 MiB image
//! loads "successfully" into a 512 MiB VM.

use std::io::Read;
use std::path::Path;

/// What the start of a memory image says.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MemoryImageInfo {
    /// The machine type it was saved from (e.g. `pc-i440fx-10.0`), from its configuration section.
    pub machine_type: Option<String>,
    /// Size of the main RAM block (`pc.ram`) in bytes, i.e. the VM's memory size.
    pub ram_bytes: Option<u64>,
    /// The migration capabilities it was saved with (its configuration section lists them), e.g.
    /// `mapped-ram`, or `x-ignore-shared` for an image of the device state only (the RAM was a shared file).
    pub capabilities: Vec<String>,
}

impl MemoryImageInfo {
    /// Saved with `x-ignore-shared`: the image holds no RAM, which must come from the shared RAM file.
    pub fn devices_only(&self) -> bool {
        self.capabilities.iter().any(|c| c == "x-ignore-shared")
    }
}

const MAGIC: &[u8; 4] = b"QEVM";
const SECTION_CONFIGURATION: u8 = 0x07;
const HEADER_SCAN: usize = 64 * 1024;

/// Reads the header of a memory image. Fails when the file cannot be read or is not a QEMU migration
/// stream; fields it cannot find are `None`.
pub fn inspect_memory_image(path: &Path) -> std::io::Result<MemoryImageInfo> {
    let mut head = Vec::with_capacity(HEADER_SCAN);
    std::fs::File::open(path)?.take(HEADER_SCAN as u64).read_to_end(&mut head)?;
    parse_header(&head)
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "not a QEMU memory image"))
}

fn parse_header(head: &[u8]) -> Option<MemoryImageInfo> {
    if head.len() < 8 || &head[..4] != MAGIC {
        return None;
    }
    let mut info = MemoryImageInfo::default();
    // QEVM, be32 version, then (since QEMU 2.x) the configuration section: 0x07, be32 len, machine name
    let rest = &head[8..];
    if rest.first() == Some(&SECTION_CONFIGURATION) && rest.len() >= 5 {
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        if let Some(name) = rest.get(5..5usize.saturating_add(len)) {
            info.machine_type = std::str::from_utf8(name).ok().map(str::to_owned);
        }
    }
    // the capabilities subsection: 0x05, u8 len, name, be32 version, be32 count, count x (u8 len, name)
    const CAPS: &[u8] = b"\x05\x1aconfiguration/capabilities";
    if let Some(at) = head.windows(CAPS.len()).position(|w| w == CAPS) {
        let mut p = at + CAPS.len() + 4;
        let count = head.get(p..p + 4).map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
        p += 4;
        for _ in 0..count.unwrap_or(0).min(64) {
            let Some(&len) = head.get(p) else { break };
            let Some(name) = head.get(p + 1..p + 1 + len as usize) else { break };
            info.capabilities.push(String::from_utf8_lossy(name).into_owned());
            p += 1 + len as usize;
        }
    }
    // the RAM section lists its blocks as: u8 idlen, id, be64 used_length
    const BLOCK: &[u8] = b"\x06pc.ram";
    if let Some(at) = head.windows(BLOCK.len()).position(|w| w == BLOCK) {
        let len = head.get(at + BLOCK.len()..at + BLOCK.len() + 8);
        info.ram_bytes = len.and_then(|l| l.try_into().ok()).map(u64::from_be_bytes);
    }
    Some(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_qemu10_header() {
        // the first bytes of a real image of a 256 MiB pc-i440fx-10.0 VM
        let mut h = b"QEVM\0\0\0\x03\x07\0\0\0\x0epc-i440fx-10.0\x05\x1aconfiguration/capabilities".to_vec();
        h.extend_from_slice(b"\0\0\0\x01\0\0\0\x01\x0amapped-ram\x01\0\0\0\x01\x03ram\0\0\0\0\0\0\0\x04");
        h.extend_from_slice(b"\0\0\0\0\x10\x08\x20\x04\x06pc.ram\0\0\0\0\x10\0\0\0\0\0\0\0\0\x01");
        let info = parse_header(&h).unwrap();
        assert_eq!(info.machine_type.as_deref(), Some("pc-i440fx-10.0"));
        assert_eq!(info.ram_bytes, Some(256 << 20));
        assert_eq!(info.capabilities, ["mapped-ram"]);
        assert!(!info.devices_only());
    }

    #[test]
    fn parses_a_device_state_header() {
        // the first bytes of a real image saved with x-ignore-shared (RAM in a shared file)
        let mut h = b"QEVM\0\0\0\x03\x07\0\0\0\x0epc-i440fx-10.0\x05\x1aconfiguration/capabilities".to_vec();
        h.extend_from_slice(
            b"\0\0\0\x01\0\0\0\x01\x0fx-ignore-shared\x01\0\0\0\x01\x03ram\0\0\0\0\0\0\0\x04",
        );
        h.extend_from_slice(b"\0\0\0\0\x10\x08\x20\x04\x06pc.ram\0\0\0\0\x10\0\0\0\0\0\0\0\0\0");
        let info = parse_header(&h).unwrap();
        assert_eq!(info.capabilities, ["x-ignore-shared"]);
        assert!(info.devices_only());
        assert_eq!(info.ram_bytes, Some(256 << 20));
        // a count that runs past the end stops quietly
        let cut = &h[..h.windows(4).position(|w| w == b"x-ig").unwrap() + 2];
        assert!(parse_header(cut).unwrap().capabilities.is_empty());
    }

    #[test]
    fn rejects_other_files() {
        assert_eq!(parse_header(b"hello world"), None);
        assert_eq!(parse_header(&[0x5a; 4096]), None);
        assert_eq!(parse_header(b""), None);
        // magic only: an image, nothing known
        assert_eq!(parse_header(b"QEVM\0\0\0\x03"), Some(MemoryImageInfo::default()));
        // truncated fields do not panic
        assert_eq!(parse_header(b"QEVM\0\0\0\x03\x07\0\0\0\xffpc").unwrap().machine_type, None);
        assert_eq!(parse_header(b"QEVM\0\0\0\x03\x06pc.ram\0\0").unwrap().ram_bytes, None);
    }
}
