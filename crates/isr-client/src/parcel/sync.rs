//! `isr sync`: plan (the keyring diff), upload (the chunks the server lacks) and commit (keyrings, manifest, the version).

use super::common::*;
use super::{Client, Opened};
use crate::control::{ControlReply, ControlRequest, SyncDone};
use crate::error::ClientError;
use crate::home::{now_unix, write_atomic};
use crate::image::WorkingImage;
use crate::manifests::{self, Asked, ParcelKey};
use crate::run::is_running;
use crate::transport::Transport;
use crate::trickle::Trickle;
use bytes::Bytes;
use isr_format::{ImageKind, ImageLen, ImageRef, Manifest, Tag};
use std::collections::HashSet;
use std::sync::atomic::Ordering;

/// One image of the version a sync makes.
#[derive(Debug, Clone)]
pub(super) struct PlannedImage {
    kind: ImageKind,
    image_ref: ImageRef,
    /// The sealed keyring (the working one when the image changed, else the base's).
    sealed: Vec<u8>,
    changed: bool,
}

impl PlannedImage {
    /// An image of `len` bytes whose sealed keyring is `sealed`.
    fn new(kind: ImageKind, len: ImageLen, sealed: Vec<u8>, changed: bool) -> PlannedImage {
        let keyring = Tag(*blake3::hash(&sealed).as_bytes());
        PlannedImage { kind, image_ref: ImageRef { len, keyring }, sealed, changed }
    }
}

/// The keyring diff of an opened parcel against its base, from local files alone: every image of the
/// version a sync would make, and the chunks made here.
#[derive(Debug, Clone, Default)]
pub(super) struct KeyringDiff {
    images: Vec<PlannedImage>,
    /// Chunks in a working keyring and not in the base, each once (the zero chunk never).
    pub(super) new_tags: Vec<Tag>,
    modified: bool,
}

/// A sync of one parcel, planned ([`Client::plan_sync`]) and then carried out in steps that can run
/// separately: [`Client::upload_planned`] sends the chunks the server lacks (any number of times: each call
/// sends only what is still missing), [`Client::commit_planned`] uploads the keyrings and the manifest and
/// commits the version. [`Client::sync`] is the three in a row.
#[derive(Debug)]
pub struct SyncPlan {
    opened: Opened,
    diff: KeyringDiff,
    /// The chunks the server lacked when the plan was made, until the first upload sends them; `None`:
    /// ask the server again.
    known_missing: Option<Vec<Tag>>,
    /// What the uploads of this plan sent so far.
    uploaded: Transfer,
}

impl SyncPlan {
    /// The parcel the plan syncs.
    pub fn parcel(&self) -> &str {
        &self.opened.state.parcel
    }

    /// The opened parcel the plan was made from.
    pub fn opened(&self) -> &Opened {
        &self.opened
    }

    /// Whether the parcel differs from its base (else there is nothing to commit).
    pub fn is_modified(&self) -> bool {
        self.diff.modified
    }

    /// The chunks made here since the base, each once.
    pub fn new_chunks(&self) -> &[Tag] {
        &self.diff.new_tags
    }

    /// The chunks the server lacked when the plan was made, while no upload has run yet.
    pub fn missing_at_plan(&self) -> Option<&[Tag]> {
        self.known_missing.as_deref()
    }

    /// What the uploads of this plan sent so far.
    pub fn uploaded(&self) -> Transfer {
        self.uploaded
    }
}

impl Client {
    /// Encode what changed in the parcel's runtime images into its working keyrings (what a sync then plans
    /// from). The parcel must not be running.
    pub(super) async fn encode_local_changes(&self, o: &Opened) -> Result<(), ClientError> {
        for kind in ImageKind::ALL {
            if !o.files.runtime_image(kind).exists() {
                continue;
            }
            let img = self.working_image_from(o, kind, self.sources(None)?)?;
            img.encode_changes().await?;
            img.close().await?;
        }
        Ok(())
    }

    /// The keyring diff of `o` against its base: every image of the new version and the chunks made here.
    pub(super) fn keyring_diff(&self, o: &Opened) -> Result<KeyringDiff, ClientError> {
        let mut diff = KeyringDiff::default();
        let mut seen = HashSet::new();
        for kind in ImageKind::ALL {
            if kind == ImageKind::Memory && o.state.memory_dropped && !o.files.work_keyring(kind).exists() {
                // Powered off since the base: the new version has no memory image.
                diff.modified = true;
                continue;
            }
            let Some((base, work, modified)) = self.keyrings(o, kind)? else { continue };
            diff.modified |= modified;
            let base_set: HashSet<&Tag> = base.tags().iter().collect();
            for tag in work.tags() {
                if !tag.is_zero() && !base_set.contains(tag) && seen.insert(*tag) {
                    diff.new_tags.push(*tag);
                }
            }
            let sealed = if modified {
                read_file(&o.files.work_keyring(kind))?
            } else {
                read_file(&o.files.base_keyring(kind))?
            };
            diff.images.push(PlannedImage::new(kind, work.image_len(), sealed, modified));
        }
        Ok(diff)
    }

    /// The manifest of the version a diff makes.
    pub(super) fn planned_manifest(o: &Opened, diff: &KeyringDiff, comment: &str) -> Manifest {
        let mut manifest = o.manifest.clone();
        manifest.memory = None;
        for img in &diff.images {
            let r = img.image_ref;
            match img.kind {
                ImageKind::Disk => manifest.disk = r,
                ImageKind::Memory => manifest.memory = Some(r),
                ImageKind::Kernel => manifest.kernel = Some(r),
                ImageKind::Initrd => manifest.initrd = Some(r),
            }
        }
        manifest.created_unix = now_unix();
        manifest.comment = comment.to_owned();
        manifest
    }

    /// Upload the keyrings of a diff under `name`'s lock: all of them with `every_keyring` (for a parcel that
    /// has none yet), else those that changed.
    pub(super) async fn put_keyrings(
        &self,
        t: &Transport,
        name: &str,
        lock_id: &str,
        diff: &KeyringDiff,
        every_keyring: bool,
    ) -> Result<(), ClientError> {
        for img in diff.images.iter().filter(|i| every_keyring || i.changed) {
            t.put_keyring(name, lock_id, &img.image_ref.keyring, Bytes::from(img.sealed.clone())).await?;
        }
        Ok(())
    }

    /// Plan a sync of `name` (step 1 of 3): encode what changed in its runtime images (unless it is running:
    /// then its own process does), diff the keyrings against the base, and ask the server which of the
    /// chunks made here it lacks. Nothing is sent.
    pub async fn plan_sync(&mut self, name: &str) -> Result<SyncPlan, ClientError> {
        let o = self.open(name)?;
        self.plan_opened(o).await
    }

    async fn plan_opened(&mut self, o: Opened) -> Result<SyncPlan, ClientError> {
        if !is_running(o.files.dir()) {
            self.encode_local_changes(&o).await?;
        }
        let diff = self.keyring_diff(&o)?;
        let known_missing = if diff.modified {
            let t = self.connect().await?;
            Some(t.missing(&diff.new_tags).await.map_err(|e| lock_guidance(&o.state.parcel, e))?)
        } else {
            Some(Vec::new())
        };
        Ok(SyncPlan { opened: o, diff, known_missing, uploaded: Transfer::default() })
    }

    /// Send the chunks of a plan that the server lacks (step 2 of 3). Idempotent and resumable: a call after
    /// an interrupted one (or after a complete one) sends only what the server still lacks. It needs neither
    /// the lock nor a stopped parcel. Returns what this call sent ([`SyncPlan::uploaded`] sums every call).
    pub async fn upload_planned(&mut self, plan: &mut SyncPlan) -> Result<Transfer, ClientError> {
        let name = plan.opened.state.parcel.clone();
        let t = self.connect().await?;
        let missing = match plan.known_missing.take() {
            Some(m) => m,
            None => t.missing(&plan.diff.new_tags).await.map_err(|e| lock_guidance(&name, e))?,
        };
        let mut sent = Transfer::default();
        let uploaded =
            upload_from_cache(self.progress.as_ref(), &t, &self.cache()?, &missing, &mut sent).await;
        plan.uploaded.add(sent);
        uploaded.map_err(|e| lock_guidance(&name, e))?;
        Ok(sent)
    }

    /// Commit a plan (step 3 of 3): upload its changed keyrings and the manifest, commit the version (chunks
    /// the server still lacks are sent first, as the commit asks), and make it the local base. `None` when
    /// the plan has nothing to commit.
    pub async fn commit_planned(
        &mut self,
        plan: SyncPlan,
        comment: &str,
    ) -> Result<Option<(u64, Transfer)>, ClientError> {
        let SyncPlan { opened: o, diff, uploaded: mut transfer, .. } = plan;
        if !diff.modified {
            return Ok(None);
        }
        let name = o.state.parcel.as_str();
        let t = self.connect().await?;
        let id = self.home.identity()?;
        self.put_keyrings(&t, name, &o.state.lock_id, &diff, false)
            .await
            .map_err(|e| lock_guidance(name, e))?;
        let manifest = Self::planned_manifest(&o, &diff, comment);
        let key = ParcelKey { user: &self.user, parcel: name, keyroot: &o.keyroot };
        let base = o.state.head_at_checkout;
        let sealed = manifests::seal_for_commit(&manifest, key, base)?;
        let committed = match manifests::check_commit_base(&self.home, key, base) {
            Ok(()) => {
                commit_with_retry(
                    &t,
                    &self.cache()?,
                    name,
                    &o.state.lock_id,
                    base,
                    &sealed,
                    &id.name,
                    comment,
                    &mut transfer,
                    None,
                )
                .await
            }
            Err(e) => Err(e),
        };
        let (version, base_manifest) = match committed {
            Ok(v) => (v, sealed),
            Err(ClientError::StaleBase(msg)) => {
                // A previous sync may have committed exactly this state and died before recording it.
                let head_m = manifests::fetch(&t, &self.home, key, Asked::Head { at_least: base }).await?;
                let head = head_m.version;
                let same = head_m.manifest.images().map(|(k, r)| (k, r.keyring)).collect::<Vec<_>>()
                    == manifest.images().map(|(k, r)| (k, r.keyring)).collect::<Vec<_>>();
                if !same {
                    return Err(ClientError::StaleBase(format!(
                        "{msg}: {name}'s head is version {head}, but the changes here are based on version {} \
                         (the lock was broken and someone else checked in meanwhile?). Keep them as a new parcel \
                         with `isr checkin {name} --as NEWNAME`, or drop them with `isr discard {name}`",
                        o.state.head_at_checkout
                    )));
                }
                // Its manifest (bound to its own number) becomes the base.
                (head, head_m.bytes.to_vec())
            }
            Err(e) => return Err(lock_guidance(name, e)),
        };
        manifests::record_commit(&self.home, key, version)?;
        // Record the new base: keyrings first, then the manifest, then the state that points at them.
        for img in &diff.images {
            write_atomic(&o.files.base_keyring(img.kind), &img.sealed)?;
        }
        if manifest.memory.is_none() {
            let _ = std::fs::remove_file(o.files.base_keyring(ImageKind::Memory));
        }
        write_atomic(&o.files.base_manifest(), &base_manifest)?;
        let mut st = o.state.clone();
        st.base_version = version;
        st.head_at_checkout = version;
        st.memory_dropped = false;
        self.home.save_local_state(&st)?;
        for img in &diff.images {
            // Only a working keyring that is still what was committed: one rewritten since the plan (by a
            // parcel running meanwhile) holds changes of the next sync.
            let work = o.files.work_keyring(img.kind);
            if std::fs::read(&work).is_ok_and(|now| now == img.sealed) {
                let _ = std::fs::remove_file(&work);
            }
        }
        Ok(Some((version, transfer)))
    }

    /// Upload local changes as a new version and keep the lock: plan, upload and commit in a row. A parcel
    /// that runs here is synced by its own process ([`Self::sync_running`], over its control socket): a
    /// crash-consistent version of its disk, without a memory image.
    pub async fn sync(&mut self, name: &str, comment: &str) -> Result<Option<(u64, Transfer)>, ClientError> {
        let o = self.open(name)?;
        if is_running(o.files.dir()) {
            return self.ask_running_sync(&o, comment).await;
        }
        let t = self.connect().await?;
        // A broken lock is told before anything is sent; the local changes stay as they are.
        t.confirm_lock(name, &o.state.lock_id).await.map_err(|e| lock_guidance(name, e))?;
        let mut plan = self.plan_opened(o).await?;
        if !plan.is_modified() {
            return Ok(None);
        }
        self.upload_planned(&mut plan).await?;
        let files = plan.opened.files.clone();
        let done = self.commit_planned(plan, comment).await?;
        // Everything is on the server now (`isr ls -l`).
        crate::running::UnsentRecord::write(&files, 0);
        Ok(done)
    }

    async fn ask_running_sync(
        &mut self,
        o: &Opened,
        comment: &str,
    ) -> Result<Option<(u64, Transfer)>, ClientError> {
        let name = &o.state.parcel;
        let sock = o.files.control_socket();
        if !sock.exists() {
            return Err(ClientError::Other(format!(
                "{name} is running, but its process takes no requests (a transient run, a read-only or \
                 disconnected `isr disk`, or one of an older isr): suspend it (or stop `isr disk`) before syncing"
            )));
        }
        let req = ControlRequest::Sync { message: comment.to_owned() };
        match crate::control::request(&sock, &req).await? {
            ControlReply::Synced(SyncDone { version: Some(v), chunks, bytes }) => {
                Ok(Some((v, Transfer { chunks, bytes, image_bytes: 0 })))
            }
            ControlReply::Synced(SyncDone { version: None, .. }) => Ok(None),
            ControlReply::Failed { message, exit_code } => Err(match exit_code {
                2 => ClientError::Usage(message),
                3 => ClientError::Locked(message),
                4 => ClientError::Auth(message),
                5 => ClientError::Integrity(message),
                6 => ClientError::Unreachable { url: self.server_url().unwrap_or_default(), detail: message },
                _ => ClientError::Other(message),
            }),
        }
    }

    /// Sync a parcel that runs in this process: commit a version whose disk is a point-in-time copy of the
    /// running `disk` (every write so far flushed, [`Trickle::snapshot_and_send`]) and that has no memory
    /// image (it boots when resumed), and make it the base. The VM goes on running meanwhile; the chunks
    /// written since the copy stay dirty for the next sync. `None`: the disk did not change since the base.
    pub async fn sync_running(
        &mut self,
        name: &str,
        disk: &WorkingImage,
        memory: Option<&WorkingImage>,
        trickle: &Trickle,
        comment: &str,
    ) -> Result<Option<(u64, Transfer)>, ClientError> {
        let o = self.open(name)?;
        self.connect()
            .await?
            .confirm_lock(name, &o.state.lock_id)
            .await
            .map_err(|e| lock_guidance(name, e))?;
        let sent_before = trickle.stats.bytes_sent.load(Ordering::Relaxed);
        let chunks_before = trickle.stats.chunks_sent.load(Ordering::Relaxed);
        let ring = trickle.snapshot_and_send().await?;
        let transfer = Transfer {
            chunks: trickle.stats.chunks_sent.load(Ordering::Relaxed) - chunks_before,
            bytes: trickle.stats.bytes_sent.load(Ordering::Relaxed) - sent_before,
            image_bytes: 0,
        };
        let mut diff = KeyringDiff::default();
        let mut seen = HashSet::new();
        for kind in [ImageKind::Disk, ImageKind::Kernel, ImageKind::Initrd] {
            let Some((base, work, _)) = self.keyrings(&o, kind)? else { continue };
            let (ring, changed) = match kind {
                ImageKind::Disk => {
                    let changed = ring.tags() != base.tags();
                    (ring.clone(), changed)
                }
                _ => (work, false),
            };
            let sealed = if changed {
                diff.modified = true;
                let base_set: HashSet<&Tag> = base.tags().iter().collect();
                diff.new_tags.extend(
                    ring.tags()
                        .iter()
                        .filter(|t| !t.is_zero() && !base_set.contains(t) && seen.insert(**t))
                        .copied(),
                );
                ring.seal(&o.keyroot)
            } else {
                read_file(&o.files.base_keyring(kind))?
            };
            diff.images.push(PlannedImage::new(kind, ring.image_len(), sealed, changed));
        }
        if !diff.modified {
            return Ok(None);
        }
        // The memory of a running VM is not part of this version. Its runtime image stays tied to the keyring
        // it was decoded from: that keyring becomes the working one, so the next suspend still stores only
        // the memory chunks that changed.
        let (base_mem, work_mem) =
            (o.files.base_keyring(ImageKind::Memory), o.files.work_keyring(ImageKind::Memory));
        if !o.state.memory_dropped && base_mem.exists() && !work_mem.exists() {
            write_atomic(&work_mem, &read_file(&base_mem)?)?;
        }
        let plan = SyncPlan { opened: o, diff, known_missing: None, uploaded: transfer };
        let done = self.commit_planned(plan, comment).await?;
        disk.rebase(ring.tags().to_vec()).await?;
        if let Some(memory) = memory {
            // Its base has no memory image now: whatever the suspend stores is a change.
            memory.rebase(Vec::new()).await?;
        }
        Ok(done)
    }
}
