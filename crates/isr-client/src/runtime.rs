//! The runtime image: one image of a checked-out parcel (its disk) decoded for use, encrypted at rest per
//! 4 KiB sector with AES-256-XTS (as dm-crypt/LUKS do), with a persistent map saying per chunk whether it is
//! present (decoded here) and whether it is dirty (changed since the working keyring).
//!
//! The convergent chunks stay what travels and what the server stores; this file is what the running VM
//! reads and writes. A read of a present chunk is a pread and a decrypt of the sectors asked for; a write is
//! an encrypt and a pwrite of the sectors written. A flush is one `fdatasync` of this one file (data and map
//! alike). Everything here is blocking file I/O; [`crate::image::WorkingImage`] schedules it.
//!
//! Layout (all integers little-endian; docs/design.md has the table):
//! ```text
//! 0      4096  identity block: magic "ISRRTIM1", version, chunk size, image length, chunk count, map and data
//!              offsets, the XTS key sealed (AES-256-GCM) under a key derived from the parcel keyroot,
//!              BLAKE3 checksum. Written once, when the file is made.
//! 4096   4096  session block: open flag, boot id of the session that opened it, checksum.
//! 8192   32*N  map: per chunk [state u8][MAC form u8][2 zero][tag MAC 12][content MAC 16].
//! D      ...   data: chunk i at D + i * chunk_size, sector s of the image encrypted with tweak s.
//! ```
//! Crash rules (see [`RuntimeImage::open`]): a chunk dirtied after the last flush is dropped after a crash
//! (its last flushed content is the keyring's), and after a crash of the host every present clean chunk is
//! verified against its content MAC.

use isr_format::{ChunkIndex, ChunkKey, ChunkSize, ConvergenceSecret, ImageLen, Keyroot, Tag};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::xts::Xts;

pub use crate::xts::SECTOR;
const MAGIC: &[u8; 8] = b"ISRRTIM1";
const VERSION: u16 = 1;
const IDENTITY_AT: u64 = 0;
const SESSION_AT: u64 = 4096;
const MAP_AT: u64 = 8192;
const ENTRY_LEN: usize = 32;
/// Data starts on a 1 MiB boundary after the map.
const DATA_ALIGN: u64 = 1 << 20;
const SEALED_KEY_LEN: usize = 12 + 64 + 16;

/// Chunk state bits in the map.
pub mod state {
    /// Decoded here: the data region holds the chunk (or it is all zero, see [`ZERO`]).
    pub const PRESENT: u8 = 1;
    /// Changed since the working keyring: only this file has it.
    pub const DIRTY: u8 = 2;
    /// Dirty, and that was made durable by a flush (a dirty chunk without it is dropped after a crash).
    pub const FLUSHED: u8 = 4;
    /// All zero: nothing stored in the data region.
    pub const ZERO: u8 = 8;
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("runtime image {path} is corrupt: {why}")]
    Corrupt { path: PathBuf, why: String },
    #[error(
        "runtime image {path} does not open with this parcel's key (another parcel's file, or tampered)"
    )]
    WrongKey { path: PathBuf },
    #[error("runtime image {path} is in use by another isr process")]
    Busy { path: PathBuf },
    #[error("runtime image {path} is for an image of {have} bytes in {have_chunk}-byte chunks, not {want} in {want_chunk}")]
    Geometry { path: PathBuf, have: u64, have_chunk: u32, want: u64, want_chunk: u32 },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RuntimeError {
    let what = what.into();
    move |source| RuntimeError::Io { what, source }
}

/// What a present clean chunk's content MAC covers (byte 1 of its map entry).
pub mod mac_form {
    /// The plaintext itself: entries written before the chunk-key form (still verified, never written).
    pub const PLAINTEXT: u8 = 0;
    /// The chunk's convergent key, itself a keyed BLAKE3 of the plaintext: known without hashing the
    /// plaintext when a chunk is filled from the keyring or encoded, recomputed from it when verified.
    pub const CHUNK_KEY: u8 = 1;
}

/// One chunk's map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Entry {
    pub state: u8,
    /// What `content_mac` covers ([`mac_form`]).
    pub mac_form: u8,
    /// Keyed MAC of the tag whose content a present clean chunk holds.
    pub tag_mac: [u8; 12],
    /// Keyed MAC of a present clean chunk's content and index (checked after a crash of the host, and by
    /// `isr check --full`).
    pub content_mac: [u8; 16],
}

impl Entry {
    pub fn is(&self, bits: u8) -> bool {
        self.state & bits == bits
    }
    fn encode(&self) -> [u8; ENTRY_LEN] {
        let mut b = [0u8; ENTRY_LEN];
        b[0] = self.state;
        b[1] = self.mac_form;
        b[4..16].copy_from_slice(&self.tag_mac);
        b[16..32].copy_from_slice(&self.content_mac);
        b
    }
    fn decode(b: &[u8]) -> Entry {
        Entry {
            state: b[0],
            mac_form: b[1],
            tag_mac: b[4..16].try_into().expect("12"),
            content_mac: b[16..32].try_into().expect("16"),
        }
    }
}

/// What opening found and mended.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// The previous session did not close the file (isr was killed, or the host crashed).
    pub unclean: bool,
    /// ... and the host rebooted since (so writes after the last flush may be torn): clean chunks were verified.
    pub host_crashed: bool,
    /// Chunks dirtied after the last flush, dropped (back to the keyring's content).
    pub dropped_unflushed: u64,
    /// Present clean chunks whose content did not match their MAC, dropped (fetched again when read).
    pub dropped_unverified: u64,
    /// Present chunks of another keyring state (after a discard or a new base), dropped.
    pub dropped_stale: u64,
}

/// Counts read from a runtime image's map without its key (for `stat`, and to refuse a rollback).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MapSummary {
    pub chunks: u64,
    pub present: u64,
    pub dirty: u64,
}

#[derive(Debug, Clone, Copy)]
struct Geometry {
    chunk_size: ChunkSize,
    image_len: ImageLen,
    chunk_count: u64,
    data_at: u64,
}

impl Geometry {
    fn new(chunk_size: ChunkSize, image_len: ImageLen) -> Geometry {
        let chunk_count = chunk_size.chunk_count(image_len);
        let map_end = MAP_AT + chunk_count * ENTRY_LEN as u64;
        Geometry { chunk_size, image_len, chunk_count, data_at: map_end.div_ceil(DATA_ALIGN) * DATA_ALIGN }
    }
    /// Bytes of chunk `i` in the data region: its length rounded up to whole sectors.
    fn stored_len(&self, i: u64) -> usize {
        self.chunk_size.chunk_len(self.image_len, ChunkIndex(i)).div_ceil(SECTOR) * SECTOR
    }
    fn chunk_at(&self, i: u64) -> u64 {
        self.data_at + i * self.chunk_size.bytes() as u64
    }
    fn file_len(&self) -> u64 {
        self.data_at + self.image_len.0.div_ceil(SECTOR as u64) * SECTOR as u64
    }
}

fn boot_id() -> [u8; 16] {
    let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let mut out = [0u8; 16];
    out.copy_from_slice(&blake3::hash(text.trim().as_bytes()).as_bytes()[..16]);
    out
}

fn wrap_key(keyroot: &Keyroot) -> LessSafeKey {
    let k = blake3::derive_key("isr 2026-12 runtime image key wrap v1", &keyroot.0);
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &k).expect("32-byte key"))
}

/// A runtime image opened read-write (exclusively: a second opener gets [`RuntimeError::Busy`]).
pub struct RuntimeImage {
    path: PathBuf,
    file: File,
    geo: Geometry,
    xts: Xts,
    mac_key: [u8; 32],
    /// The deployment's convergence secret: a chunk's key, the content MAC's input, is derived under it.
    secret: ConvergenceSecret,
    entries: Mutex<Vec<Entry>>,
    /// Held around every write of the file. A buffered write holds the file's inode lock in the kernel,
    /// so writes never ran in parallel anyway; but threads waiting there spin on the CPU (ext4's rwsem
    /// spins while its owner runs), and a write that allocates page cache can take long. Waiting here
    /// sleeps instead, leaving the CPU to decodes and the guest.
    writes: Mutex<()>,
    /// Tests simulate a crash by dropping without the clean close.
    #[cfg(test)]
    crashed: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for RuntimeImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeImage")
            .field("path", &self.path)
            .field("chunks", &self.geo.chunk_count)
            .finish()
    }
}

impl RuntimeImage {
    /// Open the runtime image at `path` (made, empty, when there is none) for an image of `image_len` bytes
    /// whose current chunks have `tags` (the working keyring's). Mends what a crash left (see [`Recovery`])
    /// and drops present chunks that hold another state than `tags` say.
    pub fn open(
        path: &Path,
        keyroot: &Keyroot,
        secret: &ConvergenceSecret,
        chunk_size: ChunkSize,
        image_len: ImageLen,
        tags: &[Tag],
    ) -> Result<(RuntimeImage, Recovery), RuntimeError> {
        let geo = Geometry::new(chunk_size, image_len);
        if !path.exists() {
            create(path, keyroot, geo)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io(format!("opening {}", path.display())))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(RuntimeError::Busy { path: path.into() }),
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(io(format!("locking {}", path.display()))(e));
            }
        }
        let corrupt = |why: String| RuntimeError::Corrupt { path: path.into(), why };
        let mut ident = [0u8; 4096];
        file.read_exact_at(&mut ident, IDENTITY_AT).map_err(|e| corrupt(format!("identity block: {e}")))?;
        let found = parse_identity(&ident).map_err(|w| corrupt(w.into()))?;
        if found.chunk_size != chunk_size || found.image_len != image_len {
            return Err(RuntimeError::Geometry {
                path: path.into(),
                have: found.image_len.0,
                have_chunk: found.chunk_size.bytes(),
                want: image_len.0,
                want_chunk: chunk_size.bytes(),
            });
        }
        let mut sealed = ident[48..48 + SEALED_KEY_LEN].to_vec();
        let nonce: [u8; 12] = sealed[..12].try_into().expect("12");
        let aad = ident[..48].to_vec();
        let key = wrap_key(keyroot)
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(&aad), &mut sealed[12..])
            .map_err(|_| RuntimeError::WrongKey { path: path.into() })?
            .to_vec();
        let xts = Xts::new(key.as_slice().try_into().map_err(|_| corrupt("sealed key length".into()))?);
        let mac_key = blake3::derive_key("isr 2026-12 runtime image map MAC v1", &key);
        let mut map = vec![0u8; geo.chunk_count as usize * ENTRY_LEN];
        file.read_exact_at(&mut map, MAP_AT).map_err(|e| corrupt(format!("map: {e}")))?;
        let entries: Vec<Entry> = map.chunks_exact(ENTRY_LEN).map(Entry::decode).collect();
        if let Some(i) =
            entries.iter().position(|e| e.state & !0x0f != 0 || (e.is(state::DIRTY) && !e.is(state::PRESENT)))
        {
            return Err(corrupt(format!(
                "map entry of chunk {i} has an impossible state {:#x}",
                entries[i].state
            )));
        }
        if let Some(i) = entries.iter().position(|e| e.mac_form > mac_form::CHUNK_KEY) {
            return Err(corrupt(format!(
                "map entry of chunk {i} has an unknown MAC form {}",
                entries[i].mac_form
            )));
        }
        let img = RuntimeImage {
            path: path.into(),
            file,
            geo,
            xts,
            mac_key,
            secret: secret.clone(),
            entries: Mutex::new(entries),
            writes: Mutex::new(()),
            #[cfg(test)]
            crashed: Default::default(),
        };
        let recovery = img.recover(tags)?;
        img.write_session(true)?;
        img.sync()?;
        Ok((img, recovery))
    }

    /// Counts of the map at `path` (no key needed: states are not secret); `None` when there is no file.
    pub fn summary(path: &Path) -> Result<Option<MapSummary>, RuntimeError> {
        Ok(Self::states(path)?.map(|states| MapSummary {
            chunks: states.len() as u64,
            present: states.iter().filter(|s| *s & state::PRESENT != 0).count() as u64,
            dirty: states.iter().filter(|s| *s & state::DIRTY != 0).count() as u64,
        }))
    }

    /// The chunks the map at `path` says are dirty (no key needed); empty when there is no file.
    pub fn dirty_in(path: &Path) -> Result<Vec<u64>, RuntimeError> {
        Ok(Self::states(path)?
            .unwrap_or_default()
            .iter()
            .enumerate()
            .filter(|(_, s)| *s & state::DIRTY != 0)
            .map(|(i, _)| i as u64)
            .collect())
    }

    /// Plaintext bytes of the chunks the map at `path` says are dirty (changed here, not yet encoded, so not
    /// on the server); 0 when there is no file. No key needed.
    pub fn dirty_bytes_in(path: &Path) -> Result<u64, RuntimeError> {
        let Some((geo, states)) = Self::geometry_and_states(path)? else { return Ok(0) };
        Ok(states
            .iter()
            .enumerate()
            .filter(|(_, s)| *s & state::DIRTY != 0)
            .map(|(i, _)| geo.chunk_size.chunk_len(geo.image_len, ChunkIndex(i as u64)) as u64)
            .sum())
    }

    fn states(path: &Path) -> Result<Option<Vec<u8>>, RuntimeError> {
        Ok(Self::geometry_and_states(path)?.map(|(_, states)| states))
    }

    fn geometry_and_states(path: &Path) -> Result<Option<(Identity, Vec<u8>)>, RuntimeError> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(format!("opening {}", path.display()))(e)),
        };
        let corrupt = |why: String| RuntimeError::Corrupt { path: path.into(), why };
        let mut ident = [0u8; 4096];
        file.read_exact_at(&mut ident, IDENTITY_AT).map_err(|e| corrupt(format!("identity block: {e}")))?;
        let geo = parse_identity(&ident).map_err(|w| corrupt(w.into()))?;
        let mut map = vec![0u8; geo.chunk_count as usize * ENTRY_LEN];
        file.read_exact_at(&mut map, MAP_AT).map_err(|e| corrupt(format!("map: {e}")))?;
        Ok(Some((geo, map.chunks_exact(ENTRY_LEN).map(|e| e[0]).collect())))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn chunk_count(&self) -> u64 {
        self.geo.chunk_count
    }

    pub fn entry(&self, i: u64) -> Entry {
        self.entries.lock().expect("runtime map")[i as usize]
    }

    /// Indices of the chunks with all of `bits` set.
    pub fn chunks_with(&self, bits: u8) -> Vec<u64> {
        let entries = self.entries.lock().expect("runtime map");
        entries.iter().enumerate().filter(|(_, e)| e.is(bits)).map(|(i, _)| i as u64).collect()
    }

    pub fn tag_mac(&self, tag: &Tag) -> [u8; 12] {
        let mut h = blake3::Hasher::new_keyed(&self.mac_key);
        h.update(b"tag");
        h.update(&tag.0);
        h.finalize().as_bytes()[..12].try_into().expect("12")
    }

    /// The content MAC of chunk `i` holding the plaintext whose convergent key is `key`
    /// ([`mac_form::CHUNK_KEY`]).
    pub fn content_mac(&self, i: u64, key: &ChunkKey) -> [u8; 16] {
        let mut h = blake3::Hasher::new_keyed(&self.mac_key);
        h.update(b"chunk key");
        h.update(&i.to_le_bytes());
        h.update(&key.0);
        h.finalize().as_bytes()[..16].try_into().expect("16")
    }

    /// The content MAC of the older form ([`mac_form::PLAINTEXT`]), for entries that have it.
    fn plaintext_mac(&self, i: u64, plaintext: &[u8]) -> [u8; 16] {
        let mut h = blake3::Hasher::new_keyed(&self.mac_key);
        h.update(b"chunk");
        h.update(&i.to_le_bytes());
        h.update(plaintext);
        h.finalize().as_bytes()[..16].try_into().expect("16")
    }

    /// Whether chunk `i` holds the current content: dirty, or present and of the state whose tag is `tag`.
    pub fn holds(&self, e: &Entry, tag: &Tag) -> bool {
        e.is(state::DIRTY) || (e.is(state::PRESENT) && e.tag_mac == self.tag_mac(tag))
    }

    /// Change chunk `i`'s map entry (in memory and in the file; durable at the next [`Self::sync`]).
    pub fn set_entry(&self, i: u64, e: Entry) -> Result<(), RuntimeError> {
        let mut entries = self.entries.lock().expect("runtime map");
        if entries[i as usize] == e {
            return Ok(());
        }
        // Written while the lock is held, so the file's entry never goes back to an older one.
        let _w = self.writes.lock().expect("runtime writes");
        self.file
            .write_all_at(&e.encode(), MAP_AT + i * ENTRY_LEN as u64)
            .map_err(io(format!("writing the map of {}", self.path.display())))?;
        entries[i as usize] = e;
        Ok(())
    }

    /// Chunk `i` as present and clean, holding the content of `tag` whose convergent key is `key` (unused
    /// for the zero tag). The caller vouches for the pair: the keyring's, or just encoded.
    pub fn clean_entry(&self, i: u64, tag: &Tag, key: &ChunkKey) -> Entry {
        let zero = tag.is_zero();
        Entry {
            state: state::PRESENT | if zero { state::ZERO } else { 0 },
            mac_form: mac_form::CHUNK_KEY,
            tag_mac: self.tag_mac(tag),
            content_mac: if zero { [0; 16] } else { self.content_mac(i, key) },
        }
    }

    fn first_sector(&self, i: u64, offset_in_chunk: usize) -> u128 {
        ((i * self.geo.chunk_size.bytes() as u64 + offset_in_chunk as u64) / SECTOR as u64) as u128
    }

    /// Read `out.len()` bytes of chunk `i` from `offset` (the chunk must be present and not zero).
    pub fn read(&self, i: u64, offset: usize, out: &mut [u8]) -> Result<(), RuntimeError> {
        let first = offset / SECTOR * SECTOR;
        let end = (offset + out.len()).div_ceil(SECTOR) * SECTOR;
        let at = self.geo.chunk_at(i) + first as u64;
        let what = || format!("reading chunk {i} of {}", self.path.display());
        if first == offset && end == offset + out.len() {
            // Whole sectors: read and decrypt in place.
            self.file.read_exact_at(out, at).map_err(io(what()))?;
            self.xts.decrypt_sectors(out, self.first_sector(i, first));
            return Ok(());
        }
        let mut buf = vec![0u8; end - first];
        self.file.read_exact_at(&mut buf, at).map_err(io(what()))?;
        self.xts.decrypt_sectors(&mut buf, self.first_sector(i, first));
        out.copy_from_slice(&buf[offset - first..offset - first + out.len()]);
        Ok(())
    }

    /// Write `data` into chunk `i` at `offset` (the chunk must be present and not zero); a sector written only
    /// in part is read, decrypted and merged first.
    pub fn write(&self, i: u64, offset: usize, data: &[u8]) -> Result<(), RuntimeError> {
        if offset.is_multiple_of(SECTOR) && data.len().is_multiple_of(SECTOR) {
            return self.seal_and_store(i, offset, data);
        }
        let first = offset / SECTOR * SECTOR;
        let end = (offset + data.len()).div_ceil(SECTOR) * SECTOR;
        let mut buf = vec![0u8; end - first];
        let head_partial = first != offset;
        if head_partial {
            self.read(i, first, &mut buf[..SECTOR])?;
        }
        // The tail sector, unless it is the head sector just read.
        if offset + data.len() < end && !(head_partial && buf.len() == SECTOR) {
            let last = buf.len() - SECTOR;
            self.read(i, end - SECTOR, &mut buf[last..])?;
        }
        buf[offset - first..offset - first + data.len()].copy_from_slice(data);
        self.store_sectors(i, first, buf)
    }

    /// Encrypt `sectors` (whole sectors of plaintext) in place and write them at `offset` of chunk `i`.
    fn store_sectors(&self, i: u64, offset: usize, mut sectors: Vec<u8>) -> Result<(), RuntimeError> {
        self.xts.encrypt_sectors(&mut sectors, self.first_sector(i, offset));
        let _w = self.writes.lock().expect("runtime writes");
        self.file
            .write_all_at(&sectors, self.geo.chunk_at(i) + offset as u64)
            .map_err(io(format!("writing chunk {i} of {}", self.path.display())))
    }

    /// Store the whole plaintext of chunk `i` (its length; the tail of the last sector is zero-padded).
    pub fn write_chunk(&self, i: u64, plain: &[u8]) -> Result<(), RuntimeError> {
        self.seal_and_store(i, 0, plain)
    }

    /// Encrypt `plain` (from sector-aligned `offset` of chunk `i`; a partial last sector is zero-padded, as
    /// only the chunk's end may be) into a reused per-thread buffer and write it: the plaintext is read once,
    /// no copy of it is made.
    fn seal_and_store(&self, i: u64, offset: usize, plain: &[u8]) -> Result<(), RuntimeError> {
        thread_local! {
            static SEALED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let stored = plain.len().div_ceil(SECTOR) * SECTOR;
        SEALED.with(|sealed| {
            let mut sealed = sealed.borrow_mut();
            let whole = plain.len() / SECTOR * SECTOR;
            // Every byte is overwritten below: only growth is zero-filled.
            sealed.resize(stored, 0);
            self.xts.encrypt_sectors_from(
                &plain[..whole],
                &mut sealed[..whole],
                self.first_sector(i, offset),
            );
            if whole < stored {
                // The zero-padded last sector.
                let (tail, pad) = sealed[whole..].split_at_mut(plain.len() - whole);
                tail.copy_from_slice(&plain[whole..]);
                pad.fill(0);
                self.xts.encrypt_sectors(&mut sealed[whole..], self.first_sector(i, offset + whole));
            }
            let _w = self.writes.lock().expect("runtime writes");
            self.file
                .write_all_at(&sealed, self.geo.chunk_at(i) + offset as u64)
                .map_err(io(format!("writing chunk {i} of {}", self.path.display())))
        })
    }

    /// Free chunk `i`'s data (its entry says what it is).
    pub fn punch(&self, i: u64) -> Result<(), RuntimeError> {
        use rustix::fs::{fallocate, FallocateFlags};
        fallocate(
            &self.file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            self.geo.chunk_at(i),
            self.geo.stored_len(i) as u64,
        )
        .map_err(|e| io(format!("freeing chunk {i} of {}", self.path.display()))(e.into()))
    }

    /// Make every write and map change so far durable: dirty chunks are marked flushed, then one fdatasync.
    pub fn flush(&self) -> Result<(), RuntimeError> {
        {
            let mut entries = self.entries.lock().expect("runtime map");
            let _w = self.writes.lock().expect("runtime writes");
            for (i, e) in entries.iter_mut().enumerate() {
                if e.is(state::DIRTY) && !e.is(state::FLUSHED) {
                    e.state |= state::FLUSHED;
                    self.file
                        .write_all_at(&e.encode(), MAP_AT + i as u64 * ENTRY_LEN as u64)
                        .map_err(io(format!("writing the map of {}", self.path.display())))?;
                }
            }
        }
        self.sync()
    }

    fn sync(&self) -> Result<(), RuntimeError> {
        self.file.sync_data().map_err(io(format!("syncing {}", self.path.display())))
    }

    /// Flush and mark the file closed cleanly (the next open needs no recovery).
    pub fn close(&self) -> Result<(), RuntimeError> {
        self.flush()?;
        self.write_session(false)?;
        self.sync()
    }

    /// Whether chunk `i`'s stored plaintext matches its content MAC (present clean chunks only).
    pub fn verify(&self, i: u64, e: &Entry) -> Result<bool, RuntimeError> {
        if e.is(state::ZERO) {
            return Ok(true);
        }
        let clen = self.geo.chunk_size.chunk_len(self.geo.image_len, ChunkIndex(i));
        let mut buf = vec![0u8; clen];
        match self.read(i, 0, &mut buf) {
            Ok(()) => Ok(match e.mac_form {
                mac_form::PLAINTEXT => self.plaintext_mac(i, &buf) == e.content_mac,
                _ => self.content_mac(i, &ChunkKey::derive(&self.secret, &buf)) == e.content_mac,
            }),
            Err(RuntimeError::Io { source, .. }) if source.kind() == std::io::ErrorKind::UnexpectedEof => {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Present clean chunks whose plaintext fails its MAC (for `isr check --full`).
    pub fn verify_all(&self) -> Result<Vec<u64>, RuntimeError> {
        let present: Vec<(u64, Entry)> = {
            let entries = self.entries.lock().expect("runtime map");
            entries
                .iter()
                .enumerate()
                .filter(|(_, e)| e.is(state::PRESENT) && !e.is(state::DIRTY))
                .map(|(i, e)| (i as u64, *e))
                .collect()
        };
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let bad = Mutex::new(Vec::new());
        let failure = Mutex::new(None);
        std::thread::scope(|s| {
            for part in present.chunks(present.len().div_ceil(threads).max(1)) {
                let (bad, failure) = (&bad, &failure);
                s.spawn(move || {
                    for (i, e) in part {
                        match self.verify(*i, e) {
                            Ok(true) => {}
                            Ok(false) => bad.lock().expect("list").push(*i),
                            Err(err) => *failure.lock().expect("slot") = Some(err),
                        }
                    }
                });
            }
        });
        if let Some(e) = failure.into_inner().expect("slot") {
            return Err(e);
        }
        let mut bad = bad.into_inner().expect("list");
        bad.sort_unstable();
        Ok(bad)
    }

    /// Drop every dirty chunk (back to the keyring's content), durably; returns how many.
    pub fn drop_dirty(&self) -> Result<usize, RuntimeError> {
        let dirty = self.chunks_with(state::DIRTY);
        for &i in &dirty {
            self.drop_chunk(i)?;
        }
        self.sync()?;
        Ok(dirty.len())
    }

    /// Make chunk `i` absent (its entry first, then its data freed).
    pub fn drop_chunk(&self, i: u64) -> Result<(), RuntimeError> {
        self.set_entry(i, Entry::default())?;
        self.punch(i)
    }

    fn recover(&self, tags: &[Tag]) -> Result<Recovery, RuntimeError> {
        let mut r = Recovery::default();
        let mut session = [0u8; 4096];
        let readable = self.file.read_exact_at(&mut session, SESSION_AT).is_ok();
        let sum_ok = readable && blake3::hash(&session[..4064]).as_bytes()[..] == session[4064..];
        // An unreadable session block counts as unclean: the checks below are safe to run on any file.
        r.unclean = !sum_ok || session[0] == 1;
        r.host_crashed = r.unclean && (!sum_ok || session[1..17] != boot_id());
        let entries = self.entries.lock().expect("runtime map").clone();
        for (i, e) in entries.iter().enumerate() {
            let i = i as u64;
            if r.unclean && e.is(state::DIRTY) && !e.is(state::FLUSHED) {
                self.drop_chunk(i)?;
                r.dropped_unflushed += 1;
            } else if e.is(state::PRESENT) && !e.is(state::DIRTY) {
                let tag = tags.get(i as usize).copied().unwrap_or(Tag::ZERO);
                if e.tag_mac != self.tag_mac(&tag) {
                    self.drop_chunk(i)?;
                    r.dropped_stale += 1;
                }
            }
        }
        if r.host_crashed {
            for i in self.verify_all()? {
                self.drop_chunk(i)?;
                r.dropped_unverified += 1;
            }
        }
        Ok(r)
    }

    fn write_session(&self, open: bool) -> Result<(), RuntimeError> {
        let mut b = [0u8; 4096];
        b[0] = u8::from(open);
        b[1..17].copy_from_slice(&boot_id());
        let sum = blake3::hash(&b[..4064]);
        b[4064..].copy_from_slice(sum.as_bytes());
        self.file
            .write_all_at(&b, SESSION_AT)
            .map_err(io(format!("writing the session block of {}", self.path.display())))
    }
}

impl Drop for RuntimeImage {
    /// Closing cleanly spares the next open its recovery; a failure here only means that recovery runs.
    fn drop(&mut self) {
        #[cfg(test)]
        if self.crashed.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let _ = self.close();
    }
}

struct Identity {
    chunk_size: ChunkSize,
    image_len: ImageLen,
    chunk_count: u64,
}

fn parse_identity(b: &[u8; 4096]) -> Result<Identity, &'static str> {
    if &b[..8] != MAGIC {
        return Err("not a runtime image (bad magic)");
    }
    if blake3::hash(&b[..4064]).as_bytes()[..] != b[4064..] {
        return Err("identity block checksum mismatch");
    }
    if u16::from_le_bytes([b[8], b[9]]) != VERSION {
        return Err("unknown runtime image version");
    }
    let chunk_size = ChunkSize::new(u32::from_le_bytes(b[12..16].try_into().expect("4")) as u64)
        .map_err(|_| "invalid chunk size")?;
    let image_len = ImageLen(u64::from_le_bytes(b[16..24].try_into().expect("8")));
    let chunk_count = u64::from_le_bytes(b[24..32].try_into().expect("8"));
    let geo = Geometry::new(chunk_size, image_len);
    if chunk_count != geo.chunk_count
        || u64::from_le_bytes(b[32..40].try_into().expect("8")) != MAP_AT
        || u64::from_le_bytes(b[40..48].try_into().expect("8")) != geo.data_at
    {
        return Err("inconsistent geometry");
    }
    Ok(Identity { chunk_size, image_len, chunk_count })
}

/// Make an empty runtime image (every chunk absent) with a new random XTS key, durably, at `path`.
fn create(path: &Path, keyroot: &Keyroot, geo: Geometry) -> Result<(), RuntimeError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    let mut b = [0u8; 4096];
    b[..8].copy_from_slice(MAGIC);
    b[8..10].copy_from_slice(&VERSION.to_le_bytes());
    b[12..16].copy_from_slice(&geo.chunk_size.bytes().to_le_bytes());
    b[16..24].copy_from_slice(&geo.image_len.0.to_le_bytes());
    b[24..32].copy_from_slice(&geo.chunk_count.to_le_bytes());
    b[32..40].copy_from_slice(&MAP_AT.to_le_bytes());
    b[40..48].copy_from_slice(&geo.data_at.to_le_bytes());
    let key: [u8; 64] = isr_format::random_bytes();
    let nonce: [u8; 12] = isr_format::random_bytes();
    let mut sealed = key.to_vec();
    let aad = b[..48].to_vec();
    let gcm = wrap_key(keyroot)
        .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(&aad), &mut sealed)
        .expect("64 bytes seal");
    b[48..60].copy_from_slice(&nonce);
    b[60..124].copy_from_slice(&sealed);
    b[124..140].copy_from_slice(gcm.as_ref());
    let sum = blake3::hash(&b[..4064]);
    b[4064..].copy_from_slice(sum.as_bytes());
    // Made under a temporary name and renamed: a crash never leaves a half-made file under the real name.
    let tmp = path.with_extension("new");
    let file = {
        use std::os::unix::fs::OpenOptionsExt;
        // Encrypted, but the user's own all the same.
        OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)
    }
    .map_err(io(format!("creating {}", tmp.display())))?;
    file.set_len(geo.file_len()).map_err(io(format!("sizing {}", tmp.display())))?;
    file.write_all_at(&b, IDENTITY_AT).map_err(io(format!("writing {}", tmp.display())))?;
    let mut session = [0u8; 4096];
    let sum = blake3::hash(&session[..4064]);
    session[4064..].copy_from_slice(sum.as_bytes());
    file.write_all_at(&session, SESSION_AT).map_err(io(format!("writing {}", tmp.display())))?;
    file.sync_all().map_err(io(format!("syncing {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(io(format!("renaming {}", tmp.display())))?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(format!("syncing {}", dir.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: ConvergenceSecret = ConvergenceSecret([4; 32]);

    fn key_of(plain: &[u8]) -> ChunkKey {
        ChunkKey::derive(&SECRET, plain)
    }

    fn setup(len: u64) -> (tempfile::TempDir, PathBuf, Keyroot, Vec<Tag>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.rt");
        let n = ChunkSize::DEFAULT.chunk_count(ImageLen(len)) as usize;
        (dir, path, Keyroot([7; 32]), vec![Tag([1; 32]); n])
    }

    #[test]
    fn encrypting_into_a_buffer_is_encrypting_in_place() {
        let xts = Xts::new(&[3u8; 64]);
        let plain: Vec<u8> = (0..3 * SECTOR).map(|i| (i * 7 % 253) as u8).collect();
        let mut in_place = plain.clone();
        xts.encrypt_sectors(&mut in_place, 41);
        let mut out = vec![0xEE; plain.len()];
        xts.encrypt_sectors_from(&plain, &mut out, 41);
        assert_eq!(out, in_place);
        assert_ne!(out, plain);
        xts.decrypt_sectors(&mut out, 41);
        assert_eq!(out, plain);
    }

    #[test]
    fn a_short_last_chunk_is_stored_zero_padded_and_reads_back() {
        let len = (1 << 20) + 1000;
        let (_d, path, kr, tags) = setup(len);
        let (img, _) =
            RuntimeImage::open(&path, &kr, &SECRET, ChunkSize::DEFAULT, ImageLen(len), &tags).unwrap();
        let last = img.chunk_count() - 1;
        // A longer chunk first: the per-thread buffer must not carry its bytes into the short one.
        img.write_chunk(0, &[0x5A; 128 * 1024]).unwrap();
        img.write_chunk(last, &[0xC3; 1000]).unwrap();
        let mut back = vec![0u8; 1000];
        img.read(last, 0, &mut back).unwrap();
        assert_eq!(back, vec![0xC3; 1000]);
        let mut sector = vec![0u8; SECTOR];
        img.read(last, 0, &mut sector).unwrap();
        assert!(sector[1000..].iter().all(|&b| b == 0), "the pad is zeroes");
    }

    #[test]
    fn sectors_round_trip_and_are_encrypted_at_rest() {
        let (_d, path, kr, tags) = setup(1 << 20);
        let (img, r) =
            RuntimeImage::open(&path, &kr, &SECRET, ChunkSize::DEFAULT, ImageLen(1 << 20), &tags).unwrap();
        assert!(!r.unclean);
        let plain: Vec<u8> = (0..128 * 1024).map(|i| (i % 251) as u8).collect();
        img.write_chunk(3, &plain).unwrap();
        // Unaligned write across a sector boundary, merged with what is there.
        img.write(3, 4000, &[0xAA; 200]).unwrap();
        let mut expect = plain.clone();
        expect[4000..4200].fill(0xAA);
        let mut back = vec![0u8; 128 * 1024];
        img.read(3, 0, &mut back).unwrap();
        assert_eq!(back, expect);
        let mut part = vec![0u8; 333];
        img.read(3, 3999, &mut part).unwrap();
        assert_eq!(part, &expect[3999..4332]);
        drop(img);
        let raw = std::fs::read(&path).unwrap();
        assert!(!raw.windows(64).any(|w| w == &plain[8192..8256]), "plaintext on disk");
    }

    #[test]
    fn wrong_key_and_second_opener_are_refused() {
        let (_d, path, kr, tags) = setup(1 << 20);
        let (img, _) =
            RuntimeImage::open(&path, &kr, &SECRET, ChunkSize::DEFAULT, ImageLen(1 << 20), &tags).unwrap();
        let busy = RuntimeImage::open(&path, &kr, &SECRET, ChunkSize::DEFAULT, ImageLen(1 << 20), &tags)
            .unwrap_err();
        assert!(matches!(busy, RuntimeError::Busy { .. }), "{busy}");
        drop(img);
        let wrong = RuntimeImage::open(
            &path,
            &Keyroot([8; 32]),
            &SECRET,
            ChunkSize::DEFAULT,
            ImageLen(1 << 20),
            &tags,
        )
        .unwrap_err();
        assert!(matches!(wrong, RuntimeError::WrongKey { .. }), "{wrong}");
        let geo = RuntimeImage::open(&path, &kr, &SECRET, ChunkSize::DEFAULT, ImageLen(2 << 20), &tags)
            .unwrap_err();
        assert!(matches!(geo, RuntimeError::Geometry { .. }), "{geo}");
    }

    #[test]
    fn a_crash_drops_unflushed_dirty_chunks_and_keeps_flushed_ones() {
        let (_d, path, kr, tags) = setup(1 << 20);
        let (img, _) =
            RuntimeImage::open(&path, &kr, &SECRET, ChunkSize::DEFAULT, ImageLen(1 << 20), &tags).unwrap();
        let dirty = Entry { state: state::PRESENT | state::DIRTY, ..Default::default() };
        img.set_entry(1, dirty).unwrap();
        img.write_chunk(1, &[5; 128 * 1024]).unwrap();
        img.flush().unwrap();
        img.set_entry(2, dirty).unwrap();
        img.write_chunk(2, &[6; 128 * 1024]).unwrap();
        let clean = img.clean_entry(4, &tags[4], &key_of(&[9; 128 * 1024]));
        img.write_chunk(4, &[9; 128 * 1024]).unwrap();
        img.set_entry(4, clean).unwrap();
        // A crash: the file is not closed cleanly.
        img.crashed.store(true, std::sync::atomic::Ordering::Relaxed);
        drop(img);
        let (img, r) =
            RuntimeImage::open(&path, &kr, &SECRET, ChunkSize::DEFAULT, ImageLen(1 << 20), &tags).unwrap();
        assert!(r.unclean);
        assert_eq!(r.dropped_unflushed, 1);
        assert!(img.entry(1).is(state::DIRTY | state::FLUSHED));
        assert_eq!(img.entry(2), Entry::default());
        assert!(img.holds(&img.entry(4), &tags[4]));
        assert_eq!(img.verify_all().unwrap(), Vec::<u64>::new());
        // A present chunk of another state (after a discard) is dropped at open.
        drop(img);
        let mut other = tags.clone();
        other[4] = Tag([2; 32]);
        let (img, r) =
            RuntimeImage::open(&path, &kr, &SECRET, ChunkSize::DEFAULT, ImageLen(1 << 20), &other).unwrap();
        assert_eq!((r.unclean, r.dropped_stale), (false, 1));
        assert_eq!(img.entry(4), Entry::default());
    }

    #[test]
    fn verification_checks_the_content_against_its_index_and_both_mac_forms() {
        let (_d, path, kr, tags) = setup(1 << 20);
        let (img, _) =
            RuntimeImage::open(&path, &kr, &SECRET, ChunkSize::DEFAULT, ImageLen(1 << 20), &tags).unwrap();
        let (a, b) = (vec![1u8; 128 * 1024], vec![2u8; 128 * 1024]);
        img.write_chunk(0, &a).unwrap();
        img.set_entry(0, img.clean_entry(0, &tags[0], &key_of(&a))).unwrap();
        // The older form, a MAC of the plaintext, still verifies.
        img.write_chunk(1, &b).unwrap();
        let legacy = Entry {
            mac_form: mac_form::PLAINTEXT,
            content_mac: img.plaintext_mac(1, &b),
            ..img.clean_entry(1, &tags[1], &key_of(&b))
        };
        img.set_entry(1, legacy).unwrap();
        // Another chunk's content, or the key of other content: both fail.
        img.write_chunk(2, &a).unwrap();
        img.set_entry(2, img.clean_entry(2, &tags[2], &key_of(&b))).unwrap();
        img.write_chunk(3, &b).unwrap();
        img.set_entry(
            3,
            Entry {
                content_mac: img.content_mac(0, &key_of(&b)),
                ..img.clean_entry(3, &tags[3], &key_of(&b))
            },
        )
        .unwrap();
        img.write_chunk(4, &a).unwrap();
        img.set_entry(4, Entry { content_mac: img.plaintext_mac(4, &b), ..legacy }).unwrap();
        assert_eq!(img.verify_all().unwrap(), vec![2, 3, 4]);
        // An unknown MAC form is a corrupt map, refused at open.
        img.set_entry(5, Entry { mac_form: 2, ..legacy }).unwrap();
        drop(img);
        let e = RuntimeImage::open(&path, &kr, &SECRET, ChunkSize::DEFAULT, ImageLen(1 << 20), &tags)
            .unwrap_err();
        assert!(e.to_string().contains("unknown MAC form"), "{e}");
    }

    #[test]
    fn verification_finds_a_tampered_clean_chunk() {
        let (_d, path, kr, tags) = setup(1 << 20);
        let (img, _) =
            RuntimeImage::open(&path, &kr, &SECRET, ChunkSize::DEFAULT, ImageLen(1 << 20), &tags).unwrap();
        let plain = vec![3u8; 128 * 1024];
        img.write_chunk(0, &plain).unwrap();
        img.set_entry(0, img.clean_entry(0, &tags[0], &key_of(&plain))).unwrap();
        // One byte of ciphertext flipped (not overwritten: a random key makes any given value possible).
        let at = img.geo.chunk_at(0) + 100;
        let mut b = [0u8];
        img.file.read_exact_at(&mut b, at).unwrap();
        img.file.write_all_at(&[b[0] ^ 0xFF], at).unwrap();
        assert_eq!(img.verify_all().unwrap(), vec![0]);
        drop(img);
        assert_eq!(
            RuntimeImage::summary(&path).unwrap(),
            Some(MapSummary { chunks: 8, present: 1, dirty: 0 })
        );
    }
}
