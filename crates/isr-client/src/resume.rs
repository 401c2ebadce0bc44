//! Resume and suspend a parcel's VM: the disk over NBD from this process, QEMU driven over QMP, the memory
//! image saved by migration to a file (mapped-ram: RAM at fixed offsets) and chunked like the disk.
//!
//! Plaintext never lands on the client's disk: the memory image and the kernel/initrd files QEMU needs live in
//! a private directory (0700) of the runtime directory (`--runtime-dir`, `$ISR_RUNTIME_DIR`, default the tmpfs
//! `/dev/shm`), removed on every exit of the resume; after a `kill -9`, by the next isr command of the parcel
//! ([`crate::run`]). QEMU dies with the resume (`PR_SET_PDEATHSIG`).

use crate::access_trace::{AccessTrace, TracedImage};
use crate::cache::ChunkCache;
use crate::error::ClientError;
use crate::guest_ram::{copy_changes_into, image_to_file, layout, GuestRam, RamMode};
use crate::home::{valid_parcel_name, write_atomic};
use crate::image::{ImageDevice, WorkingImage};
use crate::network::{effective_network, SeenPolicy};
use crate::parcel::{is_running, Client, Opened};
use crate::parcel_files::ParcelFiles;
use crate::run::{
    check_runtime_space, clean_stale, console_log, default_runtime_dir, drop_memory_image,
    memory_image_would_resume, private_dir_path, read_outcome, read_record, PrivateDir, Run, RunEnd, RunKind,
    RunOutcome,
};
use crate::running::{Upkeep, UpkeepOptions};
use crate::source::{ChunkSources, SourceCounts};
use futures::StreamExt;
use isr_format::{ChunkDecoder, ChunkIndex, ChunkSize, ConvergenceSecret, ImageKind, ImageLen, Keyring, Tag};
use isr_vmm::{Accel, Display, Network, Start, Vm, VmConfig, VmmDriver, VmmError, VmmKind};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The serial console's socket in a running VM's private directory (`isr console`).
pub const CONSOLE_SOCKET: &str = "console.sock";

/// How long a resume waits for a guest agent to answer after the VM starts (a guest still booting, or one
/// without an agent, never answers; nothing waits for this).
const AGENT_START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a suspend waits for the guest agent before it saves the memory anyway.
const AGENT_SUSPEND_TIMEOUT: Duration = Duration::from_secs(3);

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
    /// The network the user asks for; IT's policy `none` overrides it ([`effective_network`]).
    pub network: Network,
    pub disconnected: bool,
    pub accel: AccelChoice,
    pub qemu: Option<PathBuf>,
    /// Where the private directory for plaintext goes (default: [`default_runtime_dir`]).
    pub runtime_dir: Option<PathBuf>,
    /// Who runs QEMU: isr itself or libvirt (the machine and the memory image are the same under both).
    pub vmm: VmmKind,
    /// The background upload and periodic syncs while the VM runs.
    pub upkeep: UpkeepOptions,
    /// How the guest's RAM is provided (QEMU-direct).
    pub ram: RamChoice,
    /// Fetch in the background, in the order the last run first touched them, the memory and disk chunks
    /// that are not here yet.
    pub prefetch: bool,
}

/// `--ram`: how the guest's RAM is provided under QEMU-direct.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RamChoice {
    /// On demand through FUSE where that works, else loaded before start.
    #[default]
    Auto,
    /// Always loaded before start.
    Loaded,
}

impl std::str::FromStr for RamChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(RamChoice::Auto),
            "loaded" => Ok(RamChoice::Loaded),
            other => Err(format!("unknown --ram {other:?} (auto or loaded)")),
        }
    }
}

/// How a resume ended, with timings for the user.
#[derive(Debug, Clone)]
pub struct ResumeReport {
    pub outcome: RunEnd,
    pub accel: Accel,
    /// The guest's serial console (`HOME/logs/USER/PARCEL/console.log`).
    pub console_log: PathBuf,
    pub restore: Duration,
    pub prepare: Duration,
    pub suspend: Duration,
    pub memory_image_bytes: u64,
    /// Memory chunks that changed since the memory image resumed from (encoded at the suspend), and in all.
    pub memory_chunks_changed: u64,
    pub memory_chunks: u64,
    /// Chunks fetched during the run (memory and disk), by source.
    pub fetched: SourceCounts,
}

/// Decode an image into a sparse file (zero chunks stay holes).
pub async fn write_image_file(
    ring: &Keyring,
    sources: &ChunkSources,
    path: &Path,
) -> Result<(), ClientError> {
    write_image_files(&[(ring, path)], sources).await
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
    /// A source below the cache (server, lookaside) is at hand for a good copy of a corrupt cached chunk.
    can_refetch: bool,
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
                Ok(Some(stored)) => match self.decode_write(&mut decoder, &mut buf, (img, i), &stored) {
                    // A corrupt cached copy: dropped and fetched again (verified) when another source may have it.
                    Err(ClientError::Integrity(_)) if self.can_refetch => self.cache.evict(&tag).map(|()| {
                        let _ = missing.send((img, i));
                    }),
                    other => other,
                },
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
    sources: &ChunkSources,
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
        cache: sources.cache().clone(),
        can_refetch: sources.has_sources_below_cache(),
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
                    let stored = sources.get(&tag).await?;
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

/// Remove the runtime image of a parcel's memory image (it belongs to a memory image that is gone).
pub(crate) fn remove_runtime_memory(dir: &Path) -> Result<(), ClientError> {
    let path = ParcelFiles::new(dir).runtime_image(ImageKind::Memory);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ClientError::io(format!("removing {}", path.display()), e)),
    }
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

/// A suspend's memory image could not be stored: the parcel has none now (the run consumed it); the error says
/// so and what the next resume does.
fn memory_store_failed(o: &Opened, name: &str, e: ClientError) -> ClientError {
    if let Err(dropped) = drop_memory_image(o.files.dir()) {
        return dropped;
    }
    ClientError::Other(format!(
        "storing the memory image of {name} failed: {e}; the VM has stopped, and {}",
        next_resume_note(o.files.dir())
    ))
}

/// The parcel's saved memory image, as found at a resume.
enum Saved {
    Nothing,
    /// RAM and device state ([`layout`]), with the device state and access trace read out.
    Devices(Arc<WorkingImage>, layout::Saved),
    /// A whole QEMU memory image (RAM inside; from an earlier isr, or saved under libvirt).
    Whole(Arc<WorkingImage>),
}

/// Write plaintext that QEMU reads into the private directory (0600).
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), ClientError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(bytes))
        .map_err(|e| ClientError::io(format!("writing {}", path.display()), e))
}

/// Turn a memory image of the shared-RAM layout into a whole QEMU memory image at `out` (for libvirt, whose
/// RAM cannot be a file of ours): a paused QEMU of the same machine loads the RAM (a plaintext file in `dir`)
/// and the device state (at `out`), and saves both as one image. Nothing of the guest runs.
async fn whole_image_for_libvirt(
    config: &VmConfig,
    img: &Arc<WorkingImage>,
    ram_len: u64,
    out: &Path,
    dir: &Path,
) -> Result<(), ClientError> {
    let work = dir.join("convert");
    std::fs::create_dir(&work).map_err(|e| ClientError::io(format!("creating {}", work.display()), e))?;
    let devices = work.join("devices");
    std::fs::rename(out, &devices).map_err(|e| ClientError::io(format!("moving {}", out.display()), e))?;
    let ram = GuestRam::load(img.clone(), ram_len, &work).await?;
    let mut helper = config.clone();
    helper.shared_ram = Some(ram.path().to_owned());
    helper.display = Display::None;
    helper.console_log = None;
    helper.console_socket = None;
    helper.agent_socket = None;
    helper.runtime_dir = Some(work.clone());
    let converted = async {
        let mut vm = Vm::start_paused(helper, Start::Incoming { memory_image_path: devices.clone() }).await?;
        let saved = vm.save_whole(out).await;
        let _ = vm.poweroff().await;
        saved
    }
    .await;
    let _ = ram.discard().await;
    let _ = std::fs::remove_dir_all(&work);
    converted.map(drop).map_err(vmm_error)
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

/// Room in the runtime directory beyond guest RAM, kernel and initrd: the memory image's headers and device
/// state, QEMU's sockets.
const RUNTIME_SLACK: u64 = 16 << 20;

/// How the VM stopped, before the memory image (if any) is stored.
enum Ended {
    Suspended(isr_vmm::SuspendInfo),
    PoweredOff,
    Exited(isr_vmm::VmExit),
}

/// What the user is told about the parcel's memory image after a run that did not store a new one.
fn next_resume_note(dir: &Path) -> &'static str {
    match memory_image_would_resume(dir) {
        Ok(true) => "the next resume continues from the memory image saved before (the guest did not run)",
        _ => {
            "the next resume boots cold from the disk as the guest last flushed it (like after a power loss)"
        }
    }
}

/// Whether process `pid` is `isr resume PARCEL` (its command line has both), so that a signal meant for it
/// never reaches another process that happens to have reused the pid.
fn is_resume_of(pid: u32, parcel: &str) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    args.contains(&b"resume".as_slice()) && args.contains(&parcel.as_bytes())
}

/// Everything checked before a run takes any lock or starts anything: the display (GTK needs a desktop, and
/// QEMU-direct), and the VMM driver's daemon (libvirt), started when none answers. Returns the driver.
pub(crate) async fn prepare_vm_start(opts: &ResumeOptions) -> Result<Box<dyn VmmDriver>, ClientError> {
    check_display(&opts.display)?;
    if opts.vmm == VmmKind::Libvirt && opts.display == Display::Gtk {
        return Err(ClientError::Usage(
            "--vmm libvirt has no GTK window: use --display vnc (then a VNC viewer or `isr ui`) or --display none \
             (then `isr console`)"
                .into(),
        ));
    }
    let driver = opts.vmm.driver();
    match driver.prepare().await {
        Ok(Some(note)) => eprintln!("isr: {note}"),
        Ok(None) => {}
        Err(e) => return Err(vmm_error(e)),
    }
    Ok(driver)
}

/// Refuse `--display gtk` without a desktop session, before any lock is taken or anything starts.
pub(crate) fn check_display(display: &Display) -> Result<(), ClientError> {
    if *display == Display::Gtk
        && std::env::var_os("DISPLAY").is_none()
        && std::env::var_os("WAYLAND_DISPLAY").is_none()
    {
        return Err(ClientError::Usage(
            "--display gtk needs a desktop session (no DISPLAY or WAYLAND_DISPLAY here): use --display vnc \
             (then a VNC viewer or `isr ui`) or --display none (then `isr console`)"
                .into(),
        ));
    }
    Ok(())
}

/// `isr disk` options.
#[derive(Debug, Clone, Copy, Default)]
pub struct DiskOptions {
    /// Never contact the server (the parcel must be hoarded).
    pub disconnected: bool,
    /// Export read-only: allowed on a suspended parcel, whose memory image stays valid.
    pub read_only: bool,
    /// Allow writes on a suspended parcel: its memory image is dropped (the next resume boots cold).
    pub force: bool,
    /// The background upload and periodic syncs of a connected, writable export.
    pub upkeep: UpkeepOptions,
}

/// The disk of a parcel ready to be served over NBD (`isr disk`); it holds the parcel's `run.lock`.
#[derive(Debug)]
pub struct DiskExport {
    pub image: Arc<WorkingImage>,
    pub read_only: bool,
    /// For the user, e.g. that `--force` dropped the memory image.
    pub note: Option<String>,
    /// The background upload and the control socket (connected, writable exports).
    upkeep: Option<Upkeep>,
    run: Run,
}

impl DiskExport {
    /// Listen on the Unix socket `path` (an old socket file there is replaced).
    pub fn bind(&self, path: &Path) -> Result<tokio::net::UnixListener, ClientError> {
        let _ = std::fs::remove_file(path);
        tokio::net::UnixListener::bind(path)
            .map_err(|e| ClientError::io(format!("binding {}", path.display()), e))
    }

    /// Serve until `shutdown`, flush what was written, and release the parcel; meanwhile send flushed
    /// changes in the background and answer `isr sync` (through `client`). Returns where the chunks fetched
    /// came from.
    pub async fn serve(
        mut self,
        client: &mut Client,
        listener: tokio::net::UnixListener,
        socket: &Path,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<SourceCounts, ClientError> {
        let options = isr_nbd::ServeOptions { read_only: self.read_only, ..Default::default() };
        let device = Arc::new(ImageDevice(self.image.clone()));
        let nbd = isr_nbd::serve_with_options(listener, device, options, shutdown);
        futures::pin_mut!(nbd);
        let served = loop {
            let Some(upkeep) = self.upkeep.as_mut() else { break nbd.await };
            tokio::select! {
                served = &mut nbd => break served,
                event = upkeep.next() => upkeep.handle(client, event).await,
            }
        };
        if let Some(upkeep) = self.upkeep.take() {
            upkeep.stop().await;
        }
        let flushed = self.image.close().await;
        let _ = std::fs::remove_file(socket);
        let error = match (&flushed, &served) {
            (Err(e), _) => Some(e.to_string()),
            (_, Err(e)) => Some(format!("NBD server: {e}")),
            _ => None,
        };
        let finished =
            self.run.finish(if error.is_some() { RunEnd::Failed } else { RunEnd::Stopped }, false, error);
        flushed?;
        served.map_err(|e| ClientError::Other(format!("NBD server: {e}")))?;
        finished?;
        Ok(self.image.stats.sources.snapshot())
    }
}

impl Client {
    /// Run the parcel's VM in the foreground until it is suspended, powered off or shut down by the guest.
    ///
    /// QEMU dies with the thread that starts it (`PR_SET_PDEATHSIG`): call this on a thread that lives as
    /// long as the resume (the `block_on` thread or a runtime worker), never inside `spawn_blocking`.
    pub async fn resume(
        &mut self,
        name: &str,
        opts: &ResumeOptions,
        mut stop: tokio::sync::mpsc::Receiver<StopRequest>,
    ) -> Result<ResumeReport, ClientError> {
        let t0 = Instant::now();
        valid_parcel_name(name)?;
        let driver = prepare_vm_start(opts).await?;
        // Before anything else: what a dead earlier run left (its QEMU, its plaintext) goes.
        self.clean_stale_runs(name)?;
        let transient = self.home.transient_dir(&self.user, name);
        let transient_running = || {
            ClientError::Other(format!(
                "a transient run of {name} is running on this client: stop it first (`isr poweroff {name}`)"
            ))
        };
        if is_running(&transient) {
            return Err(transient_running());
        }
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
        let runtime_dir = opts.runtime_dir.clone().unwrap_or_else(default_runtime_dir);
        let private_path = private_dir_path(&runtime_dir, name);
        let mut run = Run::start(o.files.dir(), RunKind::Resume, Some(private_path.clone()))?;
        // At most one VM of a parcel on a client: not beside a transient run of it (which checks the other way
        // round after taking its own run lock, so two starting at once never both run).
        if is_running(&transient) {
            let e = transient_running();
            run.finish(RunEnd::Failed, false, Some(e.to_string()))?;
            return Err(e);
        }
        let result = self
            .run_vm(name, &o, opts, driver.as_ref(), &mut stop, &runtime_dir, &private_path, &mut run, t0)
            .await;
        // The private directory is gone on every path (its guard removes it); make sure and say so if not.
        crate::guest_ram::detach_mounts_under(&private_path);
        let removed = match std::fs::remove_dir_all(&private_path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(ClientError::io(
                format!("removing the private directory {} (it holds plaintext)", private_path.display()),
                e,
            )),
            _ => Ok(()),
        };
        let (outcome, stored, error) = match (&result, &removed) {
            (Ok(r), Ok(())) => (r.outcome, r.outcome == RunEnd::Suspended, None),
            (Ok(r), Err(e)) => (RunEnd::Failed, r.outcome == RunEnd::Suspended, Some(e.to_string())),
            (Err(e), _) => (RunEnd::Failed, false, Some(e.to_string())),
        };
        let finished = run.finish(outcome, stored, error);
        let report = result?;
        removed?;
        finished?;
        Ok(report)
    }

    /// Start the VM of an opened parcel and run it until it stops; with a transient run's working copy
    /// ([`Opened::is_transient`]) no lock is confirmed, nothing of the parcel's local state changes, a
    /// suspend request powers the VM off (nothing is saved) and the console log is in the private directory.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn run_vm(
        &mut self,
        name: &str,
        o: &Opened,
        opts: &ResumeOptions,
        driver: &dyn VmmDriver,
        stop: &mut tokio::sync::mpsc::Receiver<StopRequest>,
        runtime_dir: &Path,
        private_path: &Path,
        run: &mut Run,
        t0: Instant,
    ) -> Result<ResumeReport, ClientError> {
        // Room for the plaintext before anything starts: guest RAM only where it is not served on demand.
        let vm = &o.manifest.vm;
        let ram_on_demand = driver.kind() == VmmKind::Qemu
            && opts.ram == RamChoice::Auto
            && crate::guest_ram::fuse_available().is_ok();
        let needed = if ram_on_demand { 0 } else { u64::from(vm.memory_mib) << 20 }
            + o.manifest.kernel.map_or(0, |r| r.len.0)
            + o.manifest.initrd.map_or(0, |r| r.len.0)
            + RUNTIME_SLACK;
        check_runtime_space(
            runtime_dir,
            needed,
            &format!("the guest memory of {name} ({} MiB of RAM, with its kernel and initrd)", vm.memory_mib),
        )?;
        if opts.disconnected {
            let missing = self.missing_locally(o).await?;
            if missing > 0 {
                return Err(ClientError::Other(format!(
                    "{missing} chunks of {name} are not in the local cache: run `isr hoard {name}` before resuming disconnected"
                )));
            }
            if !o.is_transient() {
                eprintln!(
                    "isr: --disconnected: the lock of {name} is not confirmed with the server; nothing can be checked \
                     in until a connected command (e.g. `isr sync {name}`) confirms it"
                );
            }
        } else if !o.is_transient() {
            self.confirm_lock(name).await?;
        }
        let server = if opts.disconnected { None } else { Some(self.connect().await?) };
        // IT's network policy: asked at every connected resume (and remembered for --disconnected).
        let policy = match &server {
            Some(t) => {
                let seen = SeenPolicy::from_server(t.parcel(name).await?.network_policy.as_deref());
                if o.state.network_policy != Some(seen) && !o.is_transient() {
                    if let Some(mut st) = self.home.local_state(&self.user, name)? {
                        st.network_policy = Some(seen);
                        self.home.save_local_state(&st)?;
                    }
                }
                Some(seen)
            }
            None => o.state.network_policy,
        };
        let (network, note) = effective_network(name, policy, opts.network);
        if let Some(note) = note {
            eprintln!("isr: {note}");
        }
        let sources = self.sources_for(o, server.clone())?;
        let cache = sources.cache().clone();
        let private = PrivateDir::create(private_path.to_owned())?;
        tracing::debug!(elapsed = ?t0.elapsed(), "resume: connected");

        // Kernel and initrd for direct boot, and the memory image unless the VM was powered off since: all
        // decoded at once.
        let mut rings = Vec::new();
        for kind in [ImageKind::Kernel, ImageKind::Initrd] {
            if let Some((_, ring, _)) = self.keyrings(o, kind)? {
                rings.push((kind, ring));
            }
        }
        let memory = if o.state.memory_dropped {
            None
        } else {
            self.keyrings(o, ImageKind::Memory)?.map(|(_, w, _)| w)
        };
        let files: std::collections::HashMap<ImageKind, PathBuf> =
            rings.iter().map(|(kind, _)| (*kind, private.path().join(kind.name()))).collect();
        let outputs: Vec<(&Keyring, &Path)> =
            rings.iter().filter_map(|(kind, ring)| Some((ring, files.get(kind)?.as_path()))).collect();
        write_image_files(&outputs, &sources).await?;

        // The memory image through its runtime image, like the disk. Under QEMU-direct the guest's RAM is a
        // shared file served from that runtime image (on demand through FUSE, or loaded first), and the image
        // QEMU loads is the device state only; libvirt makes the RAM itself, so there QEMU loads a whole
        // memory image (RAM included) from a plaintext file.
        let ram_len = u64::from(vm.memory_mib) << 20;
        let shared_ram = driver.kind() == VmmKind::Qemu;
        let saved = match memory {
            None => Saved::Nothing,
            Some(_) => {
                let img = self.working_image_from(o, ImageKind::Memory, sources.clone())?;
                match layout::read_saved(&img, ram_len).await? {
                    Some(saved) => Saved::Devices(img, saved),
                    None => Saved::Whole(img),
                }
            }
        };
        // The file QEMU loads (`-incoming`), plaintext in the private directory until QEMU has read it.
        let mem_path = private.path().join("memory");
        let resumes = !matches!(saved, Saved::Nothing);
        let mut to_convert = None;
        let mut ram = None;
        // The order in which the last run touched memory and disk first (fetched in that order below).
        let mut last_trace = Vec::new();
        let memory_image = if shared_ram {
            let img = match saved {
                Saved::Nothing => self.fresh_memory_image(o, ram_len, sources.clone())?,
                Saved::Devices(img, saved) => {
                    write_private(&mem_path, &saved.state)?;
                    last_trace = saved.trace;
                    img
                }
                Saved::Whole(old) => {
                    // Saved by an earlier isr or under libvirt: QEMU loads its RAM into the shared file, and
                    // the suspend stores the new layout.
                    image_to_file(&old, &mem_path, old.len()).await?;
                    old.close().await?;
                    drop(old);
                    self.fresh_memory_image(o, ram_len, sources.clone())?
                }
            };
            let served = self.guest_ram(img.clone(), ram_len, private.path(), opts).await?;
            eprintln!("isr: guest RAM of {name}: {}", served.1);
            ram = Some(served.0);
            Some(img)
        } else {
            match saved {
                Saved::Nothing => None,
                Saved::Whole(img) => {
                    image_to_file(&img, &mem_path, img.len()).await?;
                    Some(img)
                }
                Saved::Devices(img, saved) => {
                    // Converted below, once the machine is known.
                    write_private(&mem_path, &saved.state)?;
                    to_convert = Some(img.clone());
                    Some(img)
                }
            }
        };
        tracing::debug!(elapsed = ?t0.elapsed(), "resume: images decoded");

        // The disk over NBD from this process.
        let image = self.working_image_from(o, ImageKind::Disk, sources.clone())?;
        // First touches of this run, for the next resume's prefetch (RAM only where it is served on demand:
        // loaded, the guest's accesses never reach the image).
        let trace = AccessTrace::new();
        image.record_touches(trace.clone(), TracedImage::Disk);
        let on_demand = ram.as_ref().is_some_and(|r: &GuestRam| r.mode() == RamMode::OnDemand);
        if let Some(img) = memory_image.as_ref().filter(|_| on_demand) {
            img.record_touches(trace.clone(), TracedImage::Memory);
        }
        tracing::debug!(elapsed = ?t0.elapsed(), "resume: working disk image opened");
        let sock = private.path().join("disk.sock");
        let listener = tokio::net::UnixListener::bind(&sock)
            .map_err(|e| ClientError::io(format!("binding {}", sock.display()), e))?;
        let (nbd_stop_tx, nbd_stop_rx) = tokio::sync::oneshot::channel::<()>();
        let device = Arc::new(ImageDevice(image.clone()));
        let nbd = tokio::spawn(isr_nbd::serve(listener, device, async move {
            let _ = nbd_stop_rx.await;
        }));
        let stop_nbd = || async {
            let _ = nbd_stop_tx.send(());
            let _ = nbd.await;
        };

        let qemu = opts.qemu.clone().unwrap_or_else(|| PathBuf::from(isr_vmm::DEFAULT_QEMU));
        let accel = match opts.accel {
            AccelChoice::Kvm => Accel::Kvm,
            AccelChoice::Tcg => Accel::Tcg,
            AccelChoice::Auto => {
                // Probed once per boot and QEMU binary (where KVM does not work the probe costs seconds).
                let d = isr_vmm::detect_accel_remembered(&qemu, &self.home.kvm_probe_verdict()).await;
                eprintln!("isr: using {} ({})", d.accel, d.reason);
                d.accel
            }
        };
        let mut config = VmConfig::new(vm.memory_mib, &sock);
        config.name = Some(format!("isr-{}-{name}", self.user));
        if resumes {
            // The machine type the image was saved from (a concrete `pc-i440fx-X.Y`, the same under either
            // driver), so that it also loads into a newer QEMU whose `pc` means a newer machine.
            if let Some(machine) = isr_vmm::inspect_memory_image(&mem_path).ok().and_then(|i| i.machine_type)
            {
                config.machine = machine;
            }
        }
        config.cpus = vm.cpus;
        config.kernel = files.get(&ImageKind::Kernel).cloned();
        config.initrd = files.get(&ImageKind::Initrd).cloned();
        config.append = vm.append.clone();
        config.accel = accel;
        config.qemu = qemu;
        config.display = opts.display.clone();
        config.network = network;
        config.runtime_dir = Some(private.path().to_owned());
        // The parcel's device model, the same on every client (a memory image needs the devices it was saved
        // with).
        config.vga = vm.devices.has_display();
        config.agent_channel = vm.devices.has_agent_channel();
        config.nic = vm.devices.has_nic();
        if !config.nic {
            eprintln!("isr: {name} was created before VMs had a network card: its VM runs without network");
        }
        if let Some(ram) = &ram {
            config.shared_ram = Some(ram.path().to_owned());
        }
        let agent_socket = config.agent_channel.then(|| private.path().join("qga.sock"));
        config.agent_socket = agent_socket.clone();
        // The serial console goes to the log in every display mode; the log is outside the parcel directory,
        // so it survives a checkin.
        let console = if o.is_transient() {
            // Guest output is plaintext too: a transient run's goes with its private directory.
            private.path().join("console.log")
        } else {
            console_log(self.home.root(), &self.user, name)?
        };
        config.console_log = Some(console.clone());
        config.console_socket = Some(private.path().join(CONSOLE_SOCKET));
        eprintln!("isr: console of {name}: {}", console.display());
        if let Some(img) = to_convert.take() {
            // libvirt makes its own RAM: a QEMU of our own loads RAM and device state and saves them as one
            // whole memory image for it.
            eprintln!(
                "isr: {name} was saved with its RAM beside the device state: converting it for libvirt"
            );
            whole_image_for_libvirt(&config, &img, ram_len, &mem_path, private.path()).await?;
        }
        let prepare = t0.elapsed();
        tracing::debug!(elapsed = ?prepare, "resume: prepared");

        // QEMU gets SIGKILL when the thread that forks it ends (PR_SET_PDEATHSIG, set by isr-vmm): this future
        // is polled by the runtime's `block_on` thread or a worker, both living as long as the resume. Never
        // move the start into `spawn_blocking`, whose threads end when idle.
        let t_restore = Instant::now();
        let started = if resumes {
            match Vm::start_paused_with(
                driver,
                config,
                Start::Incoming { memory_image_path: mem_path.clone() },
            )
            .await
            {
                Ok(mut vm) => {
                    // Before the guest runs: from here on the saved image no longer matches the disk, however
                    // this run ends, unless it stores a new one.
                    let consumed = run.set_vm(vm.pid(), vm.domain()).and_then(|()| {
                        if shared_ram {
                            run.consume_memory_image_in_use()
                        } else {
                            run.consume_memory_image()
                        }
                    });
                    match consumed {
                        Ok(()) => vm.cont().await.map(|()| vm).map_err(vmm_error),
                        Err(e) => {
                            let _ = vm.poweroff().await;
                            Err(e)
                        }
                    }
                }
                Err(e) => Err(vmm_error(e)),
            }
        } else {
            match Vm::start_paused_with(driver, config, Start::Cold).await {
                Ok(mut vm) => {
                    // RAM in the memory runtime image: a run that dies leaves it to be dropped.
                    let recorded = run.set_vm(vm.pid(), vm.domain()).and_then(|()| {
                        if shared_ram {
                            run.consume_memory_image_in_use()
                        } else {
                            Ok(())
                        }
                    });
                    match recorded {
                        Ok(()) => vm.cont().await.map(|()| vm).map_err(vmm_error),
                        Err(e) => {
                            let _ = vm.poweroff().await;
                            Err(e)
                        }
                    }
                }
                Err(e) => Err(vmm_error(e)),
            }
        };
        // QEMU has loaded the memory image (or failed to): its plaintext copy goes at once.
        let _ = std::fs::remove_file(&mem_path);
        let mut vm = match started {
            Ok(vm) => vm,
            Err(e) => {
                stop_nbd().await;
                if let Some(ram) = ram.take() {
                    let _ = ram.discard().await;
                }
                return Err(e);
            }
        };
        let restore = t_restore.elapsed();
        // Once the guest runs (its own faults first): the chunks the last run touched, in that order.
        let prefetch = match memory_image.as_ref().filter(|_| opts.prefetch && !last_trace.is_empty()) {
            Some(mem) => {
                eprintln!(
                    "isr: fetching {} chunks of {name} in the order its last run touched them",
                    last_trace.len()
                );
                let (order, disk, mem) = (last_trace.clone(), image.clone(), mem.clone());
                Some(tokio::spawn(async move {
                    let n = crate::access_trace::prefetch_in_order(order, disk, mem).await;
                    tracing::debug!(fetched = n, "access-order prefetch done");
                }))
            }
            None => None,
        };

        if let Display::Vnc { listen } = &opts.display {
            if !listen.starts_with("unix:") {
                // A password for this session only: anyone else on the machine can reach the address.
                let password: String = hex::encode(isr_format::random_bytes::<4>());
                vm.set_vnc_password(&password).await.map_err(vmm_error)?;
                let addr = vm.vnc_address().await.ok().flatten().unwrap_or_else(|| listen.clone());
                eprintln!(
                    "isr: the screen of {name} is on VNC at {addr}, password {password} (this session only): \
                     e.g. `remote-viewer vnc://{addr}`, or `isr ui` for it in a browser"
                );
            }
        }
        // With a guest agent: the guest's clock is set to the host's (after a resume it stands where the guest
        // was suspended). Without one nothing happens.
        let clock = agent_socket.clone().map(|sock| {
            tokio::spawn(async move {
                match isr_vmm::GuestAgent::connect(&sock, AGENT_START_TIMEOUT).await {
                    Ok(Some(mut agent)) => match agent.set_time_to_host().await {
                        Ok(()) => eprintln!("isr: guest clock set to the host's (guest agent)"),
                        Err(e) => eprintln!("isr: the guest agent did not set the clock: {e}"),
                    },
                    Ok(None) => tracing::debug!("no guest agent answered"),
                    Err(e) => tracing::debug!(error = %e, "guest agent channel"),
                }
            })
        });
        // The disk's flushed changes go to the server while the guest runs; `isr sync` is answered here.
        let mut upkeep = if opts.disconnected || o.is_transient() {
            None
        } else {
            match Upkeep::start(self, o, image.clone(), memory_image.clone(), opts.upkeep).await {
                Ok(u) => Some(u),
                Err(e) => {
                    eprintln!("isr: no background upload for {name}: {e}");
                    None
                }
            }
        };
        let request = loop {
            let event = async {
                match upkeep.as_mut() {
                    Some(u) => u.next().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                exit = vm.wait() => break Err(exit),
                req = stop.recv() => break Ok(req.unwrap_or(StopRequest::Suspend)),
                event = event => {
                    if let Some(u) = upkeep.as_ref() {
                        u.handle(self, event).await;
                    }
                }
            }
        };
        if let Some(u) = upkeep.take() {
            u.stop().await;
        }
        if let Some(task) = prefetch {
            task.abort();
            let _ = task.await;
        }
        if let Some(task) = clock {
            task.abort();
            let _ = task.await;
        }
        let t_suspend = Instant::now();
        let ended = match request {
            Ok(StopRequest::Suspend) if !o.is_transient() => {
                // `ISR_GUEST_PAGE_CACHE=keep` leaves it (the peer of the page-cache benchmark).
                let keep = std::env::var("ISR_GUEST_PAGE_CACHE").is_ok_and(|v| v == "keep");
                if let Some(sock) = agent_socket.as_ref().filter(|_| !keep) {
                    // The page cache holds copies of file data the disk has: dropped first, the memory image
                    // does not carry them again.
                    if let Ok(Ok(Some(mut agent))) = tokio::time::timeout(
                        AGENT_SUSPEND_TIMEOUT,
                        isr_vmm::GuestAgent::connect(sock, AGENT_SUSPEND_TIMEOUT),
                    )
                    .await
                    {
                        match tokio::time::timeout(AGENT_SUSPEND_TIMEOUT * 4, agent.drop_page_cache()).await {
                            Ok(Ok(())) => eprintln!("isr: the guest dropped its page cache (guest agent)"),
                            Ok(Err(e)) => tracing::debug!(error = %e, "page cache drop"),
                            Err(_) => tracing::debug!("page cache drop timed out"),
                        }
                    }
                }
                eprintln!("isr: saving the memory of {name}");
                vm.suspend(&mem_path).await.map(Ended::Suspended).map_err(vmm_error)
            }
            // A transient run saves nothing: a suspend request stops it like a power-off.
            Ok(StopRequest::Poweroff | StopRequest::Suspend) => {
                vm.poweroff().await.map(|_| Ended::PoweredOff).map_err(vmm_error)
            }
            Err(exit) => exit.map(Ended::Exited).map_err(vmm_error),
        };
        // QEMU is gone on every path: after a failed save it still runs (isr-vmm resumed the guest).
        if ended.is_err() {
            let _ = vm.poweroff().await;
        }
        drop(vm);
        stop_nbd().await;
        let flushed = image.close().await;
        let mut report = ResumeReport {
            // Set below by how the VM ended.
            outcome: RunEnd::Unknown,
            accel,
            console_log: console,
            restore,
            prepare,
            suspend: Duration::ZERO,
            memory_image_bytes: 0,
            memory_chunks_changed: 0,
            memory_chunks: 0,
            fetched: image.stats.sources.snapshot(),
        };
        let ended = match (ended, flushed) {
            (Ok(e), Ok(())) => e,
            (Err(e), _) | (Ok(_), Err(e)) => {
                // No memory image that matches the disk: the next resume boots cold.
                let _ = std::fs::remove_file(&mem_path);
                if let Some(ram) = ram.take() {
                    let _ = ram.discard().await;
                }
                drop_memory_image(o.files.dir())?;
                return Err(e);
            }
        };
        if !matches!(ended, Ended::Suspended(_)) {
            // The RAM is not kept: it goes with the memory image below.
            if let Some(ram) = ram.take() {
                ram.discard().await?;
            }
            if let Some(img) = &memory_image {
                img.close().await?;
            }
        }
        match ended {
            Ended::Suspended(info) => {
                report.memory_image_bytes = info.file_size;
                // Opened again: a sync while it ran may have moved the base.
                let now = if o.is_transient() { None } else { Some(self.open(name)?) };
                let o = now.as_ref().unwrap_or(o);
                (report.memory_chunks_changed, report.memory_chunks) = match ram.take() {
                    Some(ram) => {
                        report.memory_image_bytes += ram_len;
                        let img = memory_image.clone().expect("shared RAM has a memory image");
                        let touched = crate::access_trace::merge(&trace.touches(), &last_trace);
                        self.store_shared_memory(name, o, &mem_path, ram, img, ram_len, touched).await?
                    }
                    None => self.store_memory_image(name, o, &mem_path, &cache, memory_image).await?,
                };
                report.outcome = RunEnd::Suspended;
            }
            Ended::PoweredOff => {
                drop_memory_image(o.files.dir())?;
                report.outcome = RunEnd::PoweredOff;
            }
            Ended::Exited(exit) => {
                drop_memory_image(o.files.dir())?;
                report.outcome =
                    if exit.guest_initiated() { RunEnd::GuestShutdown } else { RunEnd::QemuExited };
            }
        }
        private.remove()?;
        report.suspend = t_suspend.elapsed();
        Ok(report)
    }

    /// A memory image of the shared-RAM layout for `ram_len` bytes of RAM with nothing in it (zero), in a new
    /// runtime image (the old one, if any, belongs to no memory image that will resume).
    fn fresh_memory_image(
        &self,
        o: &Opened,
        ram_len: u64,
        sources: Arc<ChunkSources>,
    ) -> Result<Arc<WorkingImage>, ClientError> {
        remove_runtime_memory(o.files.dir())?;
        let ring = Keyring::new(o.manifest.chunk_size, ImageLen(layout::image_len(ram_len)))?;
        let base_tags =
            self.keyrings(o, ImageKind::Memory)?.map(|(b, _, _)| b.tags().to_vec()).unwrap_or_default();
        Ok(Arc::new(WorkingImage::new(
            ring,
            base_tags,
            o.keyroot.clone(),
            o.files.work_keyring(ImageKind::Memory),
            o.files.runtime_image(ImageKind::Memory),
            sources,
            self.convergence_secret_pub()?,
        )?))
    }

    /// The guest's RAM file for this run: on demand through FUSE where that works (and `--ram` allows it),
    /// else loaded first. Returns it with what the user is told.
    async fn guest_ram(
        &self,
        img: Arc<WorkingImage>,
        ram_len: u64,
        dir: &Path,
        opts: &ResumeOptions,
    ) -> Result<(GuestRam, String), ClientError> {
        let why_not = match opts.ram {
            RamChoice::Loaded => "--ram loaded".to_owned(),
            RamChoice::Auto => match crate::guest_ram::fuse_available() {
                Err(why) => why,
                Ok(()) => match GuestRam::serve(img.clone(), ram_len, dir) {
                    Ok(ram) => {
                        let note = format!(
                            "{} (FUSE; {})",
                            RamMode::OnDemand,
                            ram.writeback_note.as_deref().unwrap_or("write-back limits as they are")
                        );
                        return Ok((ram, note));
                    }
                    Err(e) => e.to_string(),
                },
            },
        };
        let ram = GuestRam::load(img, ram_len, dir).await?;
        Ok((ram, format!("{} ({why_not})", RamMode::Loaded)))
    }

    /// Store the memory of a VM whose RAM was a shared file: the RAM's changes into its runtime image, the
    /// device state QEMU saved at `devices` after it, and the changed chunks encoded. On failure the parcel
    /// has no memory image (it was consumed by the run) and the error says so.
    #[allow(clippy::too_many_arguments)]
    async fn store_shared_memory(
        &mut self,
        name: &str,
        o: &Opened,
        devices: &Path,
        ram: GuestRam,
        img: Arc<WorkingImage>,
        ram_len: u64,
        trace: Vec<crate::access_trace::Touch>,
    ) -> Result<(u64, u64), ClientError> {
        let stored = async {
            ram.write_back().await?;
            let state = std::fs::read(devices)
                .map_err(|e| ClientError::io(format!("reading {}", devices.display()), e))?;
            layout::write_saved(&img, ram_len, &layout::Saved { state, trace }).await?;
            let changed = img.encode_changes().await?;
            img.close().await?;
            self.mark_memory_stored(name)?;
            Ok::<_, ClientError>((changed as u64, img.chunk_count()))
        }
        .await;
        let _ = std::fs::remove_file(devices);
        stored.map_err(|e| memory_store_failed(o, name, e))
    }

    /// Encode the saved memory image into the cache and make it the parcel's working memory image. On failure
    /// the parcel has no memory image (it was consumed by the run) and the error says so.
    async fn store_memory_image(
        &mut self,
        name: &str,
        o: &Opened,
        mem_path: &Path,
        cache: &ChunkCache,
        runtime: Option<Arc<WorkingImage>>,
    ) -> Result<(u64, u64), ClientError> {
        let stored = async {
            let mut len = std::fs::metadata(mem_path)
                .map_err(|e| ClientError::io(format!("{}", mem_path.display()), e))?
                .len();
            // mapped-ram writes pages at fixed offsets, and a file ends after its last written page: one
            // saved with the tail of RAM untouched is shorter. Zero-filled to the runtime image's length, it
            // holds the same pages (QEMU reads pages at the offsets its header names).
            if let Some(img) = runtime.as_ref().filter(|img| len < img.len()) {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(mem_path)
                    .and_then(|f| f.set_len(img.len()))
                    .map_err(|e| ClientError::io(format!("extending {}", mem_path.display()), e))?;
                len = img.len();
            }
            let counts = match runtime.filter(|img| img.len() == len) {
                Some(img) => {
                    // The same RAM layout (mapped-ram: pages at fixed offsets): only the chunks that changed
                    // become dirty, and only they are encoded.
                    copy_changes_into(&img, mem_path, len).await?;
                    let changed = img.encode_changes().await?;
                    img.close().await?;
                    (changed as u64, img.chunk_size().chunk_count(ImageLen(len)))
                }
                None => {
                    // Another size (or no memory image before): encoded whole; the old runtime image goes.
                    remove_runtime_memory(o.files.dir())?;
                    let secret = self.convergence_secret_pub()?;
                    let (ring, _) = store_image_file(mem_path, o.manifest.chunk_size, &secret, cache).await?;
                    let mem_work = o.files.work_keyring(ImageKind::Memory);
                    let base_tags: Option<Vec<Tag>> =
                        self.keyrings(o, ImageKind::Memory)?.map(|(b, _, _)| b.tags().to_vec());
                    if base_tags.as_deref() == Some(ring.tags()) && o.manifest.memory.is_some() {
                        let _ = std::fs::remove_file(&mem_work);
                    } else {
                        write_atomic(&mem_work, &ring.seal(&o.keyroot))?;
                    }
                    (ring.chunk_count(), ring.chunk_count())
                }
            };
            self.mark_memory_stored(name)?;
            Ok::<_, ClientError>(counts)
        }
        .await;
        let _ = std::fs::remove_file(mem_path);
        stored.map_err(|e| memory_store_failed(o, name, e))
    }

    /// The parcel has a memory image to resume again (after a suspend stored one).
    fn mark_memory_stored(&self, name: &str) -> Result<(), ClientError> {
        let mut st = self
            .home
            .local_state(&self.user, name)?
            .ok_or_else(|| ClientError::Other("local state vanished".into()))?;
        st.memory_dropped = false;
        self.home.save_local_state(&st)
    }

    /// The serial console socket of the running VM of `name` (for `isr console`).
    pub fn console_socket(&self, name: &str) -> Result<PathBuf, ClientError> {
        valid_parcel_name(name)?;
        let dir = self.home.parcel_dir(&self.user, name);
        let private = crate::run::is_running(&dir)
            .then(|| crate::run::read_record(&dir).ok().flatten())
            .flatten()
            .and_then(|r| r.private_dir)
            .ok_or_else(|| ClientError::Usage(format!("{name} is not running on this client")))?;
        let sock = private.join(CONSOLE_SOCKET);
        if !sock.exists() {
            return Err(ClientError::Other(format!("{name} runs but its console is not up (yet)")));
        }
        Ok(sock)
    }

    /// Ask the resume running `name` to stop (suspend or power off), wait until it has ended, and report how:
    /// `Ok(None)` when nothing runs; an error unless it ended as asked (a suspend only when the memory image
    /// was stored). Whatever happened, nothing of that run stays behind.
    pub async fn stop_running(
        &mut self,
        name: &str,
        how: StopRequest,
        timeout: Duration,
    ) -> Result<Option<RunOutcome>, ClientError> {
        valid_parcel_name(name)?;
        let mut dir = self.home.parcel_dir(&self.user, name);
        let transient = self.home.transient_dir(&self.user, name);
        if !is_running(&dir) && is_running(&transient) {
            dir = transient;
        }
        let deadline = Instant::now() + timeout;
        // A run that has just taken run.lock writes its record right after.
        let rec = loop {
            if !is_running(&dir) {
                clean_stale(&dir)?;
                return Ok(None);
            }
            match read_record(&dir)? {
                Some(r) if r.kind == RunKind::Disk => {
                    return Err(ClientError::Other(format!(
                        "{name} is served by `isr disk` (pid {}), not resumed: stop that process (SIGINT or SIGTERM)",
                        r.isr_pid
                    )))
                }
                Some(r) if is_resume_of(r.isr_pid, name) => break r,
                _ if Instant::now() > deadline => {
                    return Err(ClientError::Other(format!(
                        "{name} is running but its process cannot be found (no run record)"
                    )))
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let sig = match how {
            StopRequest::Suspend => libc::SIGTERM,
            StopRequest::Poweroff => libc::SIGUSR1,
        };
        // SAFETY: kill(2) has no memory-safety preconditions; the pid was just checked to be `isr resume NAME`.
        #[allow(unsafe_code)]
        let r = unsafe { libc::kill(rec.isr_pid as libc::pid_t, sig) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ESRCH) {
                return Err(ClientError::io(format!("signalling process {}", rec.isr_pid), e));
            }
            // it has just died: the outcome (or its absence) below tells
        }
        while is_running(&dir) {
            if Instant::now() > deadline {
                return Err(ClientError::Other(format!(
                    "{name} did not stop within {}s (`isr resume` pid {} still runs)",
                    timeout.as_secs(),
                    rec.isr_pid
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let outcome = read_outcome(&dir)?.filter(|o| o.run_id == rec.run_id);
        // A run that died leaves its private directory (and maybe QEMU): nothing of it may stay.
        clean_stale(&dir)?;
        let next = if rec.kind == RunKind::Transient {
            "nothing of the transient run is kept"
        } else {
            next_resume_note(&dir)
        };
        let asked = match how {
            StopRequest::Suspend => "suspending",
            StopRequest::Poweroff => "powering off",
        };
        match outcome {
            None => Err(ClientError::Other(format!(
                "the resume of {name} (pid {}) ended without saying how: it was killed or crashed{}; no new memory \
                 image was stored. Nothing of it is left running; {next}",
                rec.isr_pid,
                if how == StopRequest::Suspend { " while saving the memory" } else { "" }
            ))),
            Some(o) if o.outcome == RunEnd::Failed => Err(ClientError::Other(format!(
                "{asked} {name} failed: {}. The VM has stopped; {}",
                o.error.as_deref().unwrap_or("unknown error"),
                if o.memory_image_stored { "its memory image was stored" } else { next }
            ))),
            // A transient run is stopped by either request, and saves nothing.
            Some(o) if rec.kind == RunKind::Transient => Ok(Some(o)),
            Some(o) if how == StopRequest::Suspend && !o.memory_image_stored => Err(ClientError::Other(format!(
                "{name} stopped without saving its memory ({}); {next}",
                o.outcome
            ))),
            Some(o) => Ok(Some(o)),
        }
    }

    /// Drop the saved memory image of a parcel that is not running: the next resume boots cold.
    pub fn drop_memory(&mut self, o: &Opened) -> Result<(), ClientError> {
        drop_memory_image(o.files.dir())
    }

    /// Prepare `isr disk`: check the parcel out when needed (unless disconnected), take its `run.lock`, and
    /// refuse to write the disk of a suspended parcel unless `force` (which drops the memory image).
    pub async fn open_disk(&mut self, name: &str, opts: DiskOptions) -> Result<DiskExport, ClientError> {
        valid_parcel_name(name)?;
        if opts.read_only && opts.force {
            return Err(ClientError::Usage("--read-only and --force exclude each other".into()));
        }
        self.clean_stale_runs(name)?;
        if self.home.local_state(&self.user, name)?.is_none() {
            if opts.disconnected {
                return Err(ClientError::Other(format!(
                    "{name} is not checked out here; --disconnected needs a hoarded parcel"
                )));
            }
            self.checkout(name, None).await?;
        }
        let o = self.open(name)?;
        if opts.disconnected {
            let missing = self.missing_locally(&o).await?;
            if missing > 0 {
                return Err(ClientError::Other(format!(
                    "{missing} chunks of {name} are not hoarded: run `isr hoard {name}` first"
                )));
            }
        }
        let run = Run::start(o.files.dir(), RunKind::Disk, None)?;
        let prepared = async {
            let mut note = None;
            if !opts.read_only && memory_image_would_resume(o.files.dir())? {
                if !opts.force {
                    return Err(ClientError::Other(format!(
                        "{name} is suspended: its saved memory image expects the disk exactly as it is, so writing \
                         the disk now would corrupt the resumed guest's file systems. `isr disk {name} --read-only` \
                         serves it read-only; `--force` allows writes and drops the memory image (the next resume \
                         then boots cold)"
                    )));
                }
                drop_memory_image(o.files.dir())?;
                note = Some(format!("--force: dropped the saved memory image of {name}; the next resume boots cold"));
            }
            let image = self.working_image(&o, ImageKind::Disk, opts.disconnected).await?;
            let upkeep = if opts.read_only || opts.disconnected {
                None
            } else {
                Some(Upkeep::start(self, &o, image.clone(), None, opts.upkeep).await?)
            };
            Ok((image, note, upkeep))
        }
        .await;
        match prepared {
            Ok((image, note, upkeep)) => {
                Ok(DiskExport { image, read_only: opts.read_only, note, upkeep, run })
            }
            Err(e) => {
                run.finish(RunEnd::Failed, false, Some(e.to_string()))?;
                Err(e)
            }
        }
    }
}
