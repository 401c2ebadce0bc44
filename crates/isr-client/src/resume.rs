//! Resume and suspend a parcel's VM: the disk over NBD from this process, QEMU driven over QMP, the memory
//! image saved by migration to a file (mapped-ram: RAM at fixed offsets) and chunked like the disk.
//!
//! Plaintext never lands on the client's disk: the memory image and the kernel/initrd files QEMU needs live in
//! a private directory on tmpfs (`/dev/shm`) when there is one, and are removed as soon as QEMU is done.

use crate::cache::ChunkCache;
use crate::error::ClientError;
use crate::home::write_atomic;
use crate::image::ImageDevice;
use crate::parcel::{work_keyring_path, Client, Opened, RunGuard};
use futures::StreamExt;
use isr_format::{ChunkDecoder, ChunkIndex, ChunkSize, ConvergenceSecret, ImageKind, ImageLen, Keyring, Tag};
use isr_vmm::{Accel, Display, Start, Vm, VmConfig, VmmError};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Why a running VM should stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopRequest {
    /// Save memory and stop (`isr suspend`, SIGINT, SIGTERM).
    Suspend,
    /// Stop without saving memory (`isr poweroff`).
    Poweroff,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccelChoice {
    /// Try KVM, fall back to TCG.
    Auto,
    Kvm,
    Tcg,
}

#[derive(Debug, Clone)]
pub struct ResumeOptions {
    pub display: Display,
    pub disconnected: bool,
    pub accel: AccelChoice,
    pub qemu: Option<PathBuf>,
}

/// How a resume ended, with timings for the user.
#[derive(Debug, Clone)]
pub struct ResumeReport {
    pub outcome: &'static str,
    pub accel: Accel,
    pub console_log: Option<PathBuf>,
    pub restore: Duration,
    pub prepare: Duration,
    pub suspend: Duration,
    pub memory_image_bytes: u64,
    pub memory_chunks_stored: u64,
    pub fetched_chunks: u64,
}

/// A private directory for plaintext files QEMU needs, on tmpfs when possible.
fn private_dir() -> Result<tempfile::TempDir, ClientError> {
    let shm = Path::new("/dev/shm");
    let builder = tempfile::Builder::new().prefix("isr-").tempdir_in(if shm.is_dir() {
        shm
    } else {
        Path::new("/tmp")
    });
    builder
        .or_else(|_| tempfile::Builder::new().prefix("isr-").tempdir())
        .map_err(|e| ClientError::io("creating a private directory", e))
}

/// Decode an image into a sparse file (zero chunks stay holes).
pub async fn write_image_file(
    ring: &Keyring,
    cache: &ChunkCache,
    server: Option<&crate::transport::Transport>,
    path: &Path,
) -> Result<(), ClientError> {
    write_image_files(&[(ring, path)], cache, server).await
}

/// Chunks fetched from the server at once while decoding images to files.
const FETCH_PARALLELISM: usize = 8;

thread_local! {
    /// A zstd context per thread, for chunks that had to be fetched (decoded on tokio's blocking pool).
    static DECODER: std::cell::RefCell<ChunkDecoder> = std::cell::RefCell::new(ChunkDecoder::new());
}

/// One image being decoded into a file.
struct OutImage {
    ring: Keyring,
    file: std::fs::File,
}

/// What the decoding threads and the fetcher share.
struct Decoding {
    images: Vec<OutImage>,
    /// (image, chunk) of every non-zero chunk, in file order.
    work: Vec<(usize, u64)>,
    next: std::sync::atomic::AtomicUsize,
    failed: std::sync::atomic::AtomicBool,
    cache: ChunkCache,
}

impl Decoding {
    /// Verify and decode `stored` as chunk `i` of image `img` into `buf` and write it at its offset. All-zero
    /// 4 KiB pages are skipped, so they stay holes of the sparse file like zero chunks do.
    fn decode_write(
        &self,
        decoder: &mut ChunkDecoder,
        buf: &mut Vec<u8>,
        (img, i): (usize, u64),
        stored: &[u8],
    ) -> Result<(), ClientError> {
        use std::os::unix::fs::FileExt;
        let out = &self.images[img];
        let idx = ChunkIndex(i);
        let (tag, key) = out.ring.get(idx).ok_or_else(|| ClientError::Other(format!("chunk {i} is zero")))?;
        let len = out.ring.chunk_len(idx);
        buf.resize(len, 0);
        decoder.decode_into(&tag, key, stored, &mut buf[..len]).map_err(|e| ClientError::chunk(&tag, e))?;
        let base = out.ring.chunk_size().offset_of(idx).0;
        let mut pos = 0;
        while pos < len {
            // The next run of non-zero pages.
            let page_end = |p: usize| (p + PAGE).min(len);
            while pos < len && isr_format::codec::is_zero(&buf[pos..page_end(pos)]) {
                pos = page_end(pos);
            }
            let start = pos;
            while pos < len && !isr_format::codec::is_zero(&buf[pos..page_end(pos)]) {
                pos = page_end(pos);
            }
            if pos > start {
                out.file
                    .write_all_at(&buf[start..pos], base + start as u64)
                    .map_err(|e| ClientError::io("writing image file", e))?;
            }
        }
        Ok(())
    }

    /// One decoding thread: take the next chunk, read it from the cache, verify, decode and write it, with one
    /// decoder and one buffer for all; chunks not in the cache go to the fetcher.
    fn run_cached(
        &self,
        missing: &tokio::sync::mpsc::UnboundedSender<(usize, u64)>,
    ) -> Result<(), ClientError> {
        use std::sync::atomic::Ordering;
        let mut decoder = ChunkDecoder::new();
        let mut buf = Vec::new();
        loop {
            if self.failed.load(Ordering::Relaxed) {
                return Ok(());
            }
            let Some(&(img, i)) = self.work.get(self.next.fetch_add(1, Ordering::Relaxed)) else {
                return Ok(());
            };
            let Some((tag, _)) = self.images[img].ring.get(ChunkIndex(i)) else {
                continue;
            };
            let r = match self.cache.read_blocking(&tag) {
                Ok(Some(stored)) => self.decode_write(&mut decoder, &mut buf, (img, i), &stored),
                Ok(None) => {
                    // The fetcher only stops once every sender is gone, so this cannot fail while we run.
                    let _ = missing.send((img, i));
                    Ok(())
                }
                Err(e) => Err(e),
            };
            if r.is_err() {
                self.failed.store(true, Ordering::Relaxed);
                return r;
            }
        }
    }
}

/// Bytes checked for zero at a time when writing decoded chunks (holes are kept at page granularity).
const PAGE: usize = 4096;

/// Decode images into sparse files (zero chunks, and zero pages, stay holes), all at once: cached chunks are
/// read, verified and decoded in one blocking step on one thread per core, each reusing its decoder and
/// buffer; chunks missing from the cache are fetched meanwhile (verified, cached) and decoded as they arrive.
pub async fn write_image_files(
    images: &[(&Keyring, &Path)],
    cache: &ChunkCache,
    server: Option<&crate::transport::Transport>,
) -> Result<(), ClientError> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let mut out = Vec::with_capacity(images.len());
    let mut work = Vec::new();
    for (n, (ring, path)) in images.iter().enumerate() {
        let file = std::fs::File::create(path)
            .map_err(|e| ClientError::io(format!("creating {}", path.display()), e))?;
        file.set_len(ring.image_len().0).map_err(|e| ClientError::io("sizing image file", e))?;
        work.extend((0..ring.chunk_count()).filter(|&i| ring.get(ChunkIndex(i)).is_some()).map(|i| (n, i)));
        out.push(OutImage { ring: (*ring).clone(), file });
    }
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).min(work.len()).max(1);
    let shared = Arc::new(Decoding {
        images: out,
        work,
        next: AtomicUsize::new(0),
        failed: AtomicBool::new(false),
        cache: cache.clone(),
    });
    let (missing_tx, mut missing_rx) = tokio::sync::mpsc::unbounded_channel();
    let decoders: Vec<_> = (0..threads)
        .map(|_| {
            let (s, tx) = (shared.clone(), missing_tx.clone());
            tokio::task::spawn_blocking(move || s.run_cached(&tx))
        })
        .collect();
    drop(missing_tx);

    let missing = futures::stream::poll_fn(move |cx| missing_rx.poll_recv(cx));
    let fetched = missing
        .map(|(img, i)| {
            let shared = shared.clone();
            async move {
                let Some((tag, _)) = shared.images[img].ring.get(ChunkIndex(i)) else {
                    return Ok(());
                };
                let r = async {
                    let stored = cache.get_or_fetch(&tag, server).await?;
                    let s = shared.clone();
                    tokio::task::spawn_blocking(move || {
                        DECODER
                            .with(|d| s.decode_write(&mut d.borrow_mut(), &mut Vec::new(), (img, i), &stored))
                    })
                    .await
                    .map_err(|e| ClientError::Other(format!("decode task: {e}")))?
                }
                .await;
                if r.is_err() {
                    shared.failed.store(true, Ordering::Relaxed);
                }
                r
            }
        })
        .buffer_unordered(FETCH_PARALLELISM)
        .collect::<Vec<_>>();
    let (decoded, fetched) = futures::join!(futures::future::join_all(decoders), fetched);
    for d in decoded {
        d.map_err(|e| ClientError::Other(format!("decode task: {e}")))??;
    }
    fetched.into_iter().collect::<Result<Vec<()>, _>>()?;
    Ok(())
}

/// Encode a file into the cache (durably) on all cores and return its keyring.
pub async fn store_image_file(
    path: &Path,
    chunk_size: ChunkSize,
    secret: &ConvergenceSecret,
    cache: &ChunkCache,
) -> Result<(Keyring, u64), ClientError> {
    let len = std::fs::metadata(path).map_err(|e| ClientError::io(format!("{}", path.display()), e))?.len();
    let mut ring = Keyring::new(chunk_size, ImageLen(len))?;
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let workers = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    let (p, s) = (path.to_owned(), secret.clone());
    let producer =
        tokio::task::spawn_blocking(move || crate::parcel::encode_file(&p, chunk_size, len, workers, s, tx));
    let mut stored = 0u64;
    while let Some(item) = rx.recv().await {
        let (i, enc) = item?;
        if let Some(e) = enc {
            if !cache.contains(&e.tag).await? {
                cache.put_durable(&e.tag, bytes::Bytes::from(e.stored)).await?;
                stored += 1;
            }
            ring.set(ChunkIndex(i), Some((e.tag, e.key)));
        }
    }
    producer.await.map_err(|e| ClientError::Other(format!("reader task: {e}")))??;
    Ok((ring, stored))
}

fn vmm_error(e: VmmError) -> ClientError {
    match e {
        VmmError::MemoryImageRejected { .. } => ClientError::Other(format!(
            "{e}\nthe saved memory image cannot be resumed; `isr poweroff PARCEL` drops it so the next resume boots \
             cold from the disk (which is unchanged)"
        )),
        other => ClientError::Other(format!("VM: {other}")),
    }
}

impl Client {
    /// Run the parcel's VM in the foreground until it is suspended, powered off or shut down by the guest.
    pub async fn resume(
        &mut self,
        name: &str,
        opts: &ResumeOptions,
        mut stop: tokio::sync::mpsc::Receiver<StopRequest>,
    ) -> Result<ResumeReport, ClientError> {
        let t0 = Instant::now();
        if self.home.local_state(&self.user, name)?.is_none() {
            if opts.disconnected {
                return Err(ClientError::Other(format!(
                    "{name} is not checked out here; --disconnected needs a hoarded parcel"
                )));
            }
            self.checkout(name, None).await?;
        }
        let o = self.open(name)?;
        tracing::debug!(elapsed = ?t0.elapsed(), "resume: parcel opened (keyroot unwrapped)");
        if opts.disconnected {
            let missing = self.missing_locally(&o).await?;
            if missing > 0 {
                return Err(ClientError::Other(format!(
                    "{missing} chunks of {name} are not in the local cache: run `isr hoard {name}` before resuming disconnected"
                )));
            }
        }
        let _guard = RunGuard::acquire(&o.dir)?;
        write_atomic(&o.dir.join("run.pid"), std::process::id().to_string().as_bytes())?;
        let server = if opts.disconnected { None } else { Some(self.connect().await?) };
        let cache = ChunkCache::open(&self.home.cache_dir())?;
        let private = private_dir()?;
        tracing::debug!(elapsed = ?t0.elapsed(), "resume: connected");

        // Kernel and initrd for direct boot, and the memory image unless the VM was powered off since: all
        // decoded at once.
        let mut rings = Vec::new();
        for kind in [ImageKind::Kernel, ImageKind::Initrd] {
            if let Some((_, ring, _)) = self.keyrings(&o, kind)? {
                rings.push((kind, ring));
            }
        }
        let memory = if o.state.memory_dropped {
            None
        } else {
            self.keyrings(&o, ImageKind::Memory)?.map(|(_, w, _)| w)
        };
        let mem_path = private.path().join("memory");
        let files: std::collections::HashMap<ImageKind, PathBuf> =
            rings.iter().map(|(kind, _)| (*kind, private.path().join(kind.name()))).collect();
        let mut outputs: Vec<(&Keyring, &Path)> =
            rings.iter().filter_map(|(kind, ring)| Some((ring, files.get(kind)?.as_path()))).collect();
        if let Some(ring) = &memory {
            outputs.push((ring, &mem_path));
        }
        write_image_files(&outputs, &cache, server.as_ref()).await?;
        tracing::debug!(elapsed = ?t0.elapsed(), "resume: images decoded");

        // The disk over NBD from this process.
        let image = self.working_image(&o, ImageKind::Disk, opts.disconnected).await?;
        tracing::debug!(elapsed = ?t0.elapsed(), "resume: working disk image opened");
        let sock = private.path().join("disk.sock");
        let listener = tokio::net::UnixListener::bind(&sock)
            .map_err(|e| ClientError::io(format!("binding {}", sock.display()), e))?;
        let (nbd_stop_tx, nbd_stop_rx) = tokio::sync::oneshot::channel::<()>();
        let device = Arc::new(ImageDevice(image.clone()));
        let nbd = tokio::spawn(isr_nbd::serve(listener, device, async move {
            let _ = nbd_stop_rx.await;
        }));

        let qemu = opts.qemu.clone().unwrap_or_else(|| PathBuf::from(isr_vmm::DEFAULT_QEMU));
        let accel = match opts.accel {
            AccelChoice::Kvm => Accel::Kvm,
            AccelChoice::Tcg => Accel::Tcg,
            AccelChoice::Auto => {
                let d = isr_vmm::detect_accel(&qemu).await;
                eprintln!("isr: using {} ({})", d.accel, d.reason);
                d.accel
            }
        };
        let mut config = VmConfig::new(o.manifest.vm.memory_mib, &sock);
        config.cpus = o.manifest.vm.cpus;
        config.kernel = files.get(&ImageKind::Kernel).cloned();
        config.initrd = files.get(&ImageKind::Initrd).cloned();
        config.append = o.manifest.vm.append.clone();
        config.accel = accel;
        config.qemu = qemu;
        config.display = opts.display.clone();
        let console = o.dir.join("console.log");
        if opts.display == Display::None {
            config.console_log = Some(console.clone());
            eprintln!("isr: console of {name}: {}", console.display());
        }
        let prepare = t0.elapsed();
        tracing::debug!(elapsed = ?prepare, "resume: prepared");
        let t_restore = Instant::now();
        let start = if memory.is_some() {
            Start::Incoming { memory_image_path: mem_path.clone() }
        } else {
            Start::Cold
        };
        let started = Vm::start(config, start).await;
        let _ = std::fs::remove_file(&mem_path);
        let mut vm = match started {
            Ok(vm) => vm,
            Err(e) => {
                let _ = nbd_stop_tx.send(());
                let _ = nbd.await;
                return Err(vmm_error(e));
            }
        };
        let restore = t_restore.elapsed();

        let request = tokio::select! {
            exit = vm.wait() => { Err(exit) }
            req = stop.recv() => { Ok(req.unwrap_or(StopRequest::Suspend)) }
        };
        let mut report = ResumeReport {
            outcome: "",
            accel,
            console_log: (opts.display == Display::None).then_some(console),
            restore,
            prepare,
            suspend: Duration::ZERO,
            memory_image_bytes: 0,
            memory_chunks_stored: 0,
            fetched_chunks: 0,
        };
        let t_suspend = Instant::now();
        let saved_memory = match request {
            Ok(StopRequest::Suspend) => {
                let info = vm.suspend(&mem_path).await.map_err(vmm_error);
                match info {
                    Ok(info) => {
                        report.memory_image_bytes = info.file_size;
                        report.outcome = "suspended";
                        true
                    }
                    Err(e) => {
                        let _ = vm.poweroff().await;
                        let _ = nbd_stop_tx.send(());
                        let _ = nbd.await;
                        image.flush().await?;
                        return Err(e);
                    }
                }
            }
            Ok(StopRequest::Poweroff) => {
                vm.poweroff().await.map_err(vmm_error)?;
                report.outcome = "powered off";
                false
            }
            Err(exit) => {
                let exit = exit.map_err(vmm_error)?;
                report.outcome =
                    if exit.guest_initiated() { "shut down by the guest" } else { "QEMU exited" };
                false
            }
        };
        let _ = nbd_stop_tx.send(());
        let _ = nbd.await;
        image.flush().await?;
        report.fetched_chunks = image.stats.fetched_chunks.load(std::sync::atomic::Ordering::Relaxed);

        let mut st = self
            .home
            .local_state(&self.user, name)?
            .ok_or_else(|| ClientError::Other("local state vanished".into()))?;
        let mem_work = work_keyring_path(&o.dir, ImageKind::Memory);
        if saved_memory {
            let secret = self.convergence_secret_pub()?;
            let encoded = store_image_file(&mem_path, o.manifest.chunk_size, &secret, &cache).await;
            let _ = std::fs::remove_file(&mem_path);
            let (ring, stored) = encoded?;
            report.memory_chunks_stored = stored;
            let base_tags: Option<Vec<Tag>> =
                self.keyrings(&o, ImageKind::Memory)?.map(|(b, _, _)| b.tags().to_vec());
            if base_tags.as_deref() == Some(ring.tags()) && o.manifest.memory.is_some() {
                let _ = std::fs::remove_file(&mem_work);
            } else {
                write_atomic(&mem_work, &ring.seal(&o.keyroot))?;
            }
            st.memory_dropped = false;
        } else {
            let _ = std::fs::remove_file(&mem_work);
            st.memory_dropped = o.manifest.memory.is_some();
        }
        self.home.save_local_state(&st)?;
        let _ = std::fs::remove_file(o.dir.join("run.pid"));
        report.suspend = t_suspend.elapsed();
        Ok(report)
    }

    /// Ask the process running `name` to stop (suspend or power off) and wait until it has.
    pub async fn stop_running(
        &mut self,
        name: &str,
        how: StopRequest,
        timeout: Duration,
    ) -> Result<bool, ClientError> {
        let dir = self.home.parcel_dir(&self.user, name);
        if !crate::parcel::is_running(&dir) {
            return Ok(false);
        }
        let pid: i32 = std::fs::read_to_string(dir.join("run.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| ClientError::Other(format!("{name} is running but its process id is unknown")))?;
        let sig = match how {
            StopRequest::Suspend => libc::SIGTERM,
            StopRequest::Poweroff => libc::SIGUSR1,
        };
        // SAFETY: kill(2) with a pid read from our own run file; no memory is touched.
        #[allow(unsafe_code)]
        let r = unsafe { libc::kill(pid, sig) };
        if r != 0 {
            return Err(ClientError::io(
                format!("signalling process {pid}"),
                std::io::Error::last_os_error(),
            ));
        }
        let deadline = Instant::now() + timeout;
        while crate::parcel::is_running(&dir) {
            if Instant::now() > deadline {
                return Err(ClientError::Other(format!("{name} did not stop within {}s", timeout.as_secs())));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(true)
    }

    /// Drop the saved memory image of a parcel that is not running: the next resume boots cold.
    pub fn drop_memory(&mut self, o: &Opened) -> Result<(), ClientError> {
        let _ = std::fs::remove_file(work_keyring_path(&o.dir, ImageKind::Memory));
        let mut st = o.state.clone();
        st.memory_dropped = o.manifest.memory.is_some();
        self.home.save_local_state(&st)
    }
}
