//! `isr create`: import a disk image as version 1 of a new parcel.

use super::common::*;
use super::Client;
use crate::error::ClientError;
use crate::home::{now_unix, valid_parcel_name};
use crate::manifests::{self, ParcelKey};
use crate::progress::Progress;
use crate::transport::Transport;
use bytes::Bytes;
use futures::StreamExt;
use isr_format::{
    ChunkIndex, ChunkSize, ConvergenceSecret, ImageKind, ImageLen, ImageRef, Keyring, Keyroot, Manifest,
    RecoveryPublicKey, Tag, VmDescription, WrappedKeyroot,
};
use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};

/// What `isr create` needs besides the disk image.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub memory_mib: u32,
    pub cpus: u32,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub append: Option<String>,
    pub chunk_size: ChunkSize,
    pub comment: String,
}

impl Client {
    /// Import a disk image (raw, or anything `qemu-img` reads) as version 1 of a new parcel. Everything is
    /// checked before the server hears of the parcel, and a create that fails later deletes the parcel again:
    /// nothing half-made remains (a create killed outright leaves a parcel without versions, which the next
    /// `isr create` of that name finishes).
    pub async fn create(
        &mut self,
        name: &str,
        disk: &Path,
        opts: &CreateOptions,
    ) -> Result<(u64, Transfer), ClientError> {
        valid_parcel_name(name)?;
        let vm = VmDescription {
            memory_mib: opts.memory_mib,
            cpus: opts.cpus,
            append: opts.append.clone(),
            devices: isr_format::DeviceModel::CURRENT,
        };
        vm.validate().map_err(|e| ClientError::Usage(format!("{e}")))?;
        if opts.comment.len() > 4096 {
            return Err(ClientError::Usage("the message is longer than 4096 bytes".into()));
        }
        if opts.initrd.is_some() && opts.kernel.is_none() {
            return Err(ClientError::Usage("--initrd needs --kernel".into()));
        }
        for (what, path) in
            [("kernel", opts.kernel.as_deref()), ("initrd", opts.initrd.as_deref())].into_iter()
        {
            if let Some(p) = path {
                check_input_file(p, what)?;
            }
        }
        check_input_file(disk, "disk image")?;
        let raw = RawImage::open(disk, &self.home.root().join("tmp"))?;
        check_input_file(raw.path(), "disk image")?;
        let t = self.connect().await?;
        let id = self.home.identity()?;
        let wrap = self.secrets()?.wrap.clone();
        let (keyroot, lock_id) = {
            let keyroot = Keyroot::random();
            let wrapped = WrappedKeyroot::wrap(&keyroot, &wrap);
            let recovery = self.recovery_seal(&keyroot)?;
            match t
                .create_parcel(
                    name,
                    &wrapped.0,
                    recovery.as_ref().map(|r| r.0.as_slice()),
                    &id.name,
                    &id.client_id,
                )
                .await
            {
                Ok(lock_id) => (keyroot, lock_id),
                Err(ClientError::Exists(msg)) => {
                    // An interrupted create leaves a parcel without versions: finish it with its own keyroot.
                    let detail = t.parcel(name).await?;
                    if detail.head != 0 {
                        return Err(ClientError::Exists(msg));
                    }
                    let keyroot = unwrap_keyroot(&detail.wrapped_keyroot, &wrap, "the server")?;
                    (keyroot, t.lock(name, &id.name, &id.client_id).await?)
                }
                Err(e) => return Err(e),
            }
        };
        let made = self.upload_first_version(&t, name, &raw, opts, vm, &keyroot, &lock_id, &id.name).await;
        match made {
            Ok(done) => {
                t.unlock(name, &lock_id).await?;
                Ok(done)
            }
            Err(e) => {
                if let Err(undo) = t.delete_unfinished_parcel(name, &id.client_id).await {
                    tracing::warn!(parcel = name, error = %undo, "could not delete the unfinished parcel");
                }
                Err(e)
            }
        }
    }

    /// The keyroot sealed for the deployment's recovery key, when the server announced one.
    pub(super) fn recovery_seal(&self, keyroot: &Keyroot) -> Result<Option<WrappedKeyroot>, ClientError> {
        let Some(hexkey) = self.session.as_ref().and_then(|s| s.recovery_pubkey.clone()) else {
            return Ok(None);
        };
        let key = RecoveryPublicKey::from_hex(&hexkey)
            .map_err(|e| ClientError::Server(format!("the server's recovery key is malformed: {e}")))?;
        Ok(Some(WrappedKeyroot::seal_for_recovery(keyroot, &key)))
    }

    /// Encode and upload the images of a new parcel, then commit them as version 1.
    #[allow(clippy::too_many_arguments)]
    async fn upload_first_version(
        &mut self,
        t: &Transport,
        name: &str,
        raw: &RawImage,
        opts: &CreateOptions,
        vm: VmDescription,
        keyroot: &Keyroot,
        lock_id: &str,
        client_name: &str,
    ) -> Result<(u64, Transfer), ClientError> {
        let secret = self.convergence_secret()?;
        let mut transfer = Transfer::default();
        let mut images: Vec<(ImageKind, Keyring)> = Vec::new();
        let disk_ring = upload_image(
            self.progress.as_ref(),
            t,
            &secret,
            raw.path(),
            opts.chunk_size,
            "disk",
            &mut transfer,
        )
        .await?;
        images.push((ImageKind::Disk, disk_ring));
        if let Some(k) = &opts.kernel {
            images.push((
                ImageKind::Kernel,
                upload_image(self.progress.as_ref(), t, &secret, k, opts.chunk_size, "kernel", &mut transfer)
                    .await?,
            ));
        }
        if let Some(i) = &opts.initrd {
            images.push((
                ImageKind::Initrd,
                upload_image(self.progress.as_ref(), t, &secret, i, opts.chunk_size, "initrd", &mut transfer)
                    .await?,
            ));
        }
        let mut refs = std::collections::HashMap::new();
        for (kind, ring) in &images {
            let sealed = Bytes::from(ring.seal(keyroot));
            let hash = Tag(*blake3::hash(&sealed).as_bytes());
            t.put_keyring(name, lock_id, &hash, sealed).await?;
            refs.insert(*kind, ImageRef { len: ring.image_len(), keyring: hash });
        }
        let manifest = Manifest {
            vm,
            chunk_size: opts.chunk_size,
            disk: refs[&ImageKind::Disk],
            memory: None,
            kernel: refs.get(&ImageKind::Kernel).copied(),
            initrd: refs.get(&ImageKind::Initrd).copied(),
            created_unix: now_unix(),
            comment: opts.comment.clone(),
        };
        let key = ParcelKey { user: &self.user, parcel: name, keyroot };
        let sealed = manifests::seal_for_commit(&manifest, key, 0)?;
        let version = commit_with_retry(
            t,
            &self.cache()?,
            name,
            lock_id,
            0,
            &sealed,
            client_name,
            &opts.comment,
            &mut transfer,
            Some(&images),
        )
        .await?;
        manifests::record_commit(&self.home, key, version)?;
        Ok((version, transfer))
    }
}

/// An input file of `isr create`: a regular, readable, non-empty file.
fn check_input_file(path: &Path, what: &str) -> Result<(), ClientError> {
    let meta =
        std::fs::metadata(path).map_err(|e| ClientError::Usage(format!("{what} {}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(ClientError::Usage(format!("{what} {} is not a regular file", path.display())));
    }
    if meta.len() == 0 {
        return Err(ClientError::Usage(format!("{what} {} is empty", path.display())));
    }
    std::fs::File::open(path).map_err(|e| ClientError::Usage(format!("{what} {}: {e}", path.display())))?;
    Ok(())
}

/// A raw image to import: the file itself, or a raw conversion made with `qemu-img` for other formats.
struct RawImage {
    path: PathBuf,
    temp: bool,
}

impl RawImage {
    fn open(path: &Path, tmp_dir: &Path) -> Result<RawImage, ClientError> {
        let meta = std::fs::metadata(path)
            .map_err(|e| ClientError::io(format!("disk image {}", path.display()), e))?;
        if !meta.is_file() {
            return Err(ClientError::Usage(format!("disk image {} is not a regular file", path.display())));
        }
        let format = detect_format(path)?;
        if format == "raw" {
            return Ok(RawImage { path: path.to_owned(), temp: false });
        }
        std::fs::create_dir_all(tmp_dir).map_err(|e| ClientError::io("creating temp dir", e))?;
        let out = tmp_dir.join(format!("import-{}.raw", std::process::id()));
        let status = std::process::Command::new("qemu-img")
            .args(["convert", "-f", &format, "-O", "raw"])
            .arg(path)
            .arg(&out)
            .status()
            .map_err(|e| ClientError::io("running qemu-img (install qemu-utils)", e))?;
        if !status.success() {
            let _ = std::fs::remove_file(&out);
            return Err(ClientError::Other(format!(
                "qemu-img could not convert {} from {format}",
                path.display()
            )));
        }
        Ok(RawImage { path: out, temp: true })
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RawImage {
    fn drop(&mut self) {
        if self.temp {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The image format by its magic bytes (qcow2, vmdk, vdi, vhdx; anything else is raw).
fn detect_format(path: &Path) -> Result<String, ClientError> {
    let mut head = [0u8; 512];
    let mut f =
        std::fs::File::open(path).map_err(|e| ClientError::io(format!("opening {}", path.display()), e))?;
    let n = f.read(&mut head).map_err(|e| ClientError::io("reading image header", e))?;
    let h = &head[..n];
    Ok(if h.starts_with(b"QFI\xfb") {
        "qcow2"
    } else if h.starts_with(b"KDMV") {
        "vmdk"
    } else if h.len() >= 68 && h[64..68] == [0x7f, 0x10, 0xda, 0xbe] {
        "vdi"
    } else if h.starts_with(b"vhdxfile") {
        "vhdx"
    } else {
        "raw"
    }
    .to_owned())
}

/// Stream a file through the encoder on all cores and upload the chunks the server lacks.
async fn upload_image(
    progress: &dyn Progress,
    t: &Transport,
    secret: &ConvergenceSecret,
    path: &Path,
    chunk_size: ChunkSize,
    what: &str,
    transfer: &mut Transfer,
) -> Result<Keyring, ClientError> {
    let len = std::fs::metadata(path).map_err(|e| ClientError::io(format!("{}", path.display()), e))?.len();
    if len == 0 {
        return Err(ClientError::Usage(format!("{} is empty", path.display())));
    }
    let mut ring = Keyring::new(chunk_size, ImageLen(len))?;
    let (tx, mut rx) =
        tokio::sync::mpsc::channel::<Result<(u64, Option<isr_format::EncodedChunk>), ClientError>>(64);
    let workers = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    let path_owned = path.to_owned();
    let secret = secret.clone();
    let producer =
        tokio::task::spawn_blocking(move || encode_file(&path_owned, chunk_size, len, workers, secret, tx));
    let bar = progress.task(what, len);
    let mut uploaded: HashSet<Tag> = HashSet::new();
    let mut batch: Vec<isr_format::EncodedChunk> = Vec::new();
    transfer.image_bytes += len;
    loop {
        let next = rx.recv().await;
        let done = next.is_none();
        if let Some(item) = next {
            let (i, enc) = item?;
            bar.advance(ring.chunk_len(ChunkIndex(i)) as u64);
            if let Some(e) = enc {
                ring.set(ChunkIndex(i), Some((e.tag, e.key.clone())));
                if uploaded.insert(e.tag) {
                    batch.push(e);
                }
            }
        }
        if batch.len() >= 256 || (done && !batch.is_empty()) {
            let tags: Vec<Tag> = batch.iter().map(|e| e.tag).collect();
            let missing: HashSet<Tag> = t.missing(&tags).await?.into_iter().collect();
            let to_send: Vec<_> =
                std::mem::take(&mut batch).into_iter().filter(|e| missing.contains(&e.tag)).collect();
            let sent = futures::stream::iter(to_send)
                .map(|e| async move {
                    let n = e.stored.len() as u64;
                    t.put_chunk(&e.tag, Bytes::from(e.stored)).await.map(|_| n)
                })
                .buffer_unordered(UPLOADS_IN_FLIGHT)
                .collect::<Vec<_>>()
                .await;
            for r in sent {
                transfer.bytes += r?;
                transfer.chunks += 1;
            }
        }
        if done {
            break;
        }
    }
    producer.await.map_err(|e| ClientError::Other(format!("reader task: {e}")))??;
    drop(bar);
    Ok(ring)
}
