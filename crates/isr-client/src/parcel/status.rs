//! `isr stat`, `isr ls`, `isr versions` and the chunk map: what is where, locally and on the server.

use super::{Client, Opened};
use crate::error::ClientError;
use crate::home::valid_parcel_name;
use crate::network::SeenPolicy;
use crate::parcel_files::ParcelFiles;
use crate::run::is_running;
use crate::runtime::RuntimeImage;
use crate::transport::{LockInfo, ParcelSummary, VersionInfo};
use isr_format::{ChunkIndex, ImageKind, Tag};
use serde::Serialize;
use std::collections::HashSet;

/// A parcel's local state (SPEC.md's `"state"` of `isr stat --json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LocalStateName {
    /// Not on this client.
    Absent,
    /// Checked out, equal to the version it came from.
    Unmodified,
    /// A VM or disk export of it is active.
    Running,
    /// Suspended or exported with changes not yet checked in.
    Modified,
}

impl LocalStateName {
    pub fn as_str(self) -> &'static str {
        match self {
            LocalStateName::Absent => "absent",
            LocalStateName::Unmodified => "unmodified",
            LocalStateName::Running => "running",
            LocalStateName::Modified => "modified",
        }
    }
}

impl std::fmt::Display for LocalStateName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// Parcels as `isr ls` shows them; `offline` says why the server's view is missing (then only the parcels
/// checked out here are listed, with what this client knows).
#[derive(Debug, Clone)]
pub struct Listing {
    pub parcels: Vec<(ParcelSummary, LocalStateName)>,
    pub offline: Option<String>,
}

/// One character per chunk of an image: [`ChunkMap::ABSENT`] (not on this client), [`ChunkMap::CACHED`],
/// [`ChunkMap::DIRTY`] (changed here, not on the server yet), [`ChunkMap::UPLOADED`] (changed here, on the
/// server), [`ChunkMap::ZERO`] (nothing stored).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChunkMap {
    pub disk: String,
    pub memory: String,
}

impl ChunkMap {
    pub const ABSENT: char = '.';
    pub const CACHED: char = 'c';
    pub const DIRTY: char = 'd';
    pub const UPLOADED: char = 'u';
    pub const ZERO: char = 'z';
}

/// The local state of a parcel, as `isr stat` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct ParcelStatus {
    pub parcel: String,
    pub state: LocalStateName,
    pub head_version: Option<u64>,
    pub base_version: Option<u64>,
    pub chunks: ChunkCounts,
    pub lock: Option<LockInfo>,
    pub memory_image: bool,
    /// Bytes of chunks changed here that the server does not have yet (0 when offline: unknown).
    pub pending_upload_bytes: u64,
    /// IT's network policy: the server's (`unset`, `none`, `nat`); offline, the one last seen here (`null`
    /// when never seen).
    pub network_policy: Option<SeenPolicy>,
    /// Set when the server could not be reached: head and lock are then unknown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offline: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ChunkCounts {
    pub cached: u64,
    pub dirty: u64,
    pub total: u64,
}

/// Whether a checked-out parcel has changes not in its base: a working keyring, or dirty runtime chunks.
pub(crate) fn has_local_changes(files: &ParcelFiles) -> Result<bool, ClientError> {
    for kind in ImageKind::ALL {
        if files.work_keyring(kind).exists()
            || RuntimeImage::summary(&files.runtime_image(kind))?.is_some_and(|s| s.dirty > 0)
        {
            return Ok(true);
        }
    }
    Ok(false)
}

impl Client {
    /// Every parcel of the user with its local state; offline, the parcels checked out here as far as this
    /// client knows them (`Listing::offline` says why), or the error when none is.
    pub async fn list(&mut self) -> Result<Listing, ClientError> {
        let server = match self.connect().await {
            Ok(t) => t.parcels().await,
            Err(e) => Err(e),
        };
        let (parcels, offline) = match server {
            Ok(p) => (p, None),
            Err(e @ ClientError::Unreachable { .. }) if !self.home.local_states(&self.user)?.is_empty() => {
                let local = self
                    .home
                    .local_states(&self.user)?
                    .into_iter()
                    .map(|st| ParcelSummary {
                        name: st.parcel,
                        head: st.head_at_checkout,
                        created_unix: 0,
                        lock: None,
                    })
                    .collect();
                (local, Some(e.to_string()))
            }
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        for p in parcels {
            let state = self.local_state_name(&p.name)?;
            out.push((p, state));
        }
        Ok(Listing { parcels: out, offline })
    }

    pub async fn versions(&mut self, name: &str) -> Result<Vec<VersionInfo>, ClientError> {
        valid_parcel_name(name)?;
        let t = self.connect().await?;
        t.versions(name).await
    }

    /// The local state of a parcel, from its files alone.
    pub fn local_state_name(&self, name: &str) -> Result<LocalStateName, ClientError> {
        let Some(st) = self.home.local_state(&self.user, name)? else { return Ok(LocalStateName::Absent) };
        let files = self.home.parcel_files(&self.user, name);
        if is_running(files.dir()) {
            return Ok(LocalStateName::Running);
        }
        let modified = st.memory_dropped || has_local_changes(&files)?;
        Ok(if modified { LocalStateName::Modified } else { LocalStateName::Unmodified })
    }

    /// Disk chunks available locally, changed since the base, and in all (no server contact).
    pub async fn local_chunk_counts(&mut self, o: &Opened) -> Result<(u64, u64, u64), ClientError> {
        let cache = self.cache()?;
        let Some((base, work, _)) = self.keyrings(o, ImageKind::Disk)? else { return Ok((0, 0, 0)) };
        let mut cached = 0;
        for tag in work.tags() {
            if tag.is_zero() || cache.contains(tag).await? {
                cached += 1;
            }
        }
        let mut changed: HashSet<u64> = work.diff(&base).into_iter().map(|i| i.0).collect();
        changed.extend(RuntimeImage::dirty_in(&o.files.runtime_image(ImageKind::Disk))?);
        Ok((cached, changed.len() as u64, work.chunk_count()))
    }

    /// The state of a parcel; without the server, what this client knows (`offline` says why).
    pub async fn stat(&mut self, name: &str) -> Result<ParcelStatus, ClientError> {
        valid_parcel_name(name)?;
        self.clean_stale_runs(name)?;
        let state = self.local_state_name(name)?;
        let server = match self.connect().await {
            Ok(t) => t.parcel(name).await,
            Err(e) => Err(e),
        };
        let (head, lock, policy, offline) = match server {
            Ok(d) => (Some(d.head), d.lock, Some(SeenPolicy::from_server(d.network_policy.as_deref())), None),
            Err(e @ ClientError::Unreachable { .. }) if state != LocalStateName::Absent => {
                (None, None, None, Some(e.to_string()))
            }
            Err(e) => return Err(e),
        };
        let connected = offline.is_none();
        let mut status = ParcelStatus {
            parcel: name.to_owned(),
            state,
            head_version: head,
            base_version: None,
            chunks: ChunkCounts::default(),
            lock,
            memory_image: false,
            pending_upload_bytes: 0,
            network_policy: policy,
            offline,
        };
        if state == LocalStateName::Absent {
            return Ok(status);
        }
        let o = self.open(name)?;
        status.base_version = Some(o.state.base_version);
        status.network_policy = status.network_policy.or(o.state.network_policy);
        let (cached, dirty, total) = self.local_chunk_counts(&o).await?;
        status.chunks = ChunkCounts { cached, dirty, total };
        status.memory_image = !o.state.memory_dropped
            && (o.manifest.memory.is_some() || o.files.work_keyring(ImageKind::Memory).exists());
        if connected {
            status.pending_upload_bytes = self.pending_upload_bytes(&o).await?;
        }
        Ok(status)
    }

    /// Bytes of changes the server does not have yet: the chunks made here (not in the base) that it lacks,
    /// and the plaintext of the runtime images' dirty chunks (not encoded yet: while the parcel runs, the
    /// background upload sends them once a flush made them durable).
    async fn pending_upload_bytes(&mut self, o: &Opened) -> Result<u64, ClientError> {
        let mut pending = 0;
        for kind in ImageKind::ALL {
            pending += RuntimeImage::dirty_bytes_in(&o.files.runtime_image(kind))?;
        }
        let diff = self.keyring_diff(o)?;
        if !diff.new_tags.is_empty() {
            let t = self.connect().await?;
            let cache = self.cache()?;
            pending += t
                .missing(&diff.new_tags)
                .await?
                .iter()
                .filter_map(|tag| std::fs::metadata(cache.store().path_of(tag)).ok())
                .map(|m| m.len())
                .sum::<u64>();
        }
        Ok(pending)
    }

    /// Bytes of changes to `name` not yet on the server ([`ParcelStatus::pending_upload_bytes`]), recorded
    /// for `isr ls -l` (at the end of a run; `stat` itself writes nothing).
    pub async fn pending_upload(&mut self, name: &str) -> Result<u64, ClientError> {
        let o = self.open(name)?;
        let pending = self.pending_upload_bytes(&o).await?;
        crate::running::UnsentRecord::write(&o.files, pending);
        Ok(pending)
    }

    /// The state of every chunk of the disk and memory images of a checked-out parcel, for the chunk map.
    pub async fn chunk_map(&mut self, name: &str) -> Result<ChunkMap, ClientError> {
        let o = self.open(name)?;
        let cache = self.cache()?;
        let mut map = ChunkMap::default();
        // Which changed chunks the server has already (connected only).
        let diff = self.keyring_diff(&o)?;
        let on_server: HashSet<Tag> = match self.connect().await {
            Ok(t) => {
                let missing: HashSet<Tag> = t.missing(&diff.new_tags).await?.into_iter().collect();
                diff.new_tags.iter().filter(|t| !missing.contains(t)).copied().collect()
            }
            Err(_) => HashSet::new(),
        };
        for kind in [ImageKind::Disk, ImageKind::Memory] {
            let Some((base, work, _)) = self.keyrings(&o, kind)? else { continue };
            let mut states = String::with_capacity(work.chunk_count() as usize);
            for i in 0..work.chunk_count() {
                let idx = ChunkIndex(i);
                let tag = work.get(idx).map(|(t, _)| t);
                let base_tag = (i < base.chunk_count()).then(|| base.get(idx).map(|(t, _)| t)).flatten();
                let changed = tag != base_tag;
                states.push(match tag {
                    None => ChunkMap::ZERO,
                    Some(t) if changed && on_server.contains(&t) => ChunkMap::UPLOADED,
                    Some(_) if changed => ChunkMap::DIRTY,
                    Some(t) if cache.contains(&t).await? => ChunkMap::CACHED,
                    Some(_) => ChunkMap::ABSENT,
                });
            }
            match kind {
                ImageKind::Disk => map.disk = states,
                _ => map.memory = states,
            }
        }
        Ok(map)
    }
}
