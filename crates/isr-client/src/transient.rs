//! Transient runs: `isr resume PARCEL --transient [--version N]` runs a version (default: the head) without
//! taking the lock and without checking anything in, and drops every change when it ends.
//!
//! The run has a working area of its own, a private directory (0700) under the runtime directory, exactly
//! like a resume's, holding:
//!
//! ```text
//! RUNTIME_DIR/isr-PARCEL-ID/parcel/    the version as a checked-out parcel's files: state.json (no lock),
//!                                      base.manifest, keyrings/base-KIND, runtime/disk.img (the disk as
//!                                      the guest reads and writes it: XTS-encrypted, see crate::runtime)
//! RUNTIME_DIR/isr-PARCEL-ID/overlay/   chunk cache overlay: nothing the run makes enters the shared cache
//! RUNTIME_DIR/isr-PARCEL-ID/vm/        the VM's private directory: plaintext kernel, initrd, memory image,
//!                                      sockets, the serial console log
//! HOME/transient/USER/PARCEL/          run.lock, run.json, run-outcome.json (records only, no data)
//! ```
//!
//! It reuses the lifecycle: the version is fetched as `checkout` fetches one ([`Client::fetch_version_into`],
//! manifests opened bound to the version), the VM runs as `resume` runs one ([`Client::run_vm`]), and reads
//! fetch chunks into the shared cache (ciphertext verified by tag). Nothing of a checkout of the parcel on this
//! client is read or written (except, with `--disconnected`, its hoarded base version is read): its state,
//! keyrings and dirty chunks stay byte for byte as they were. The whole working area is removed when the run
//! ends, and after a `kill -9` by the next isr command of the parcel ([`crate::run::clean_stale`] on the
//! records). `isr suspend` and `isr poweroff` stop a transient run; neither saves anything.

use crate::error::ClientError;
use crate::home::{create_private_dir, rfc3339, valid_parcel_name, write_atomic, LocalState};
use crate::parcel::{is_running, Client};
use crate::parcel_files::ParcelFiles;
use crate::resume::{prepare_vm_start, ResumeOptions, ResumeReport, StopRequest};
use crate::run::{
    check_runtime_space, default_runtime_dir, private_dir_path, PrivateDir, Run, RunEnd, RunKind,
};
use std::path::Path;
use std::time::Instant;

/// How a transient run ended.
#[derive(Debug, Clone)]
pub struct TransientReport {
    /// The version it ran.
    pub version: u64,
    /// Who held the parcel's lock when it started (`None`: nobody, or `--disconnected`).
    pub locked_by: Option<String>,
    pub report: ResumeReport,
}

impl Client {
    /// Run version `version` (default: the head) of `name` in the foreground without the lock, until it is
    /// stopped or shut down by the guest, and drop every change. With `opts.disconnected` it runs the
    /// version this client holds fully hoarded (the base of its checkout), and never contacts the server.
    ///
    /// Like [`Client::resume`], call it on a thread that lives as long as the run (QEMU dies with it).
    pub async fn resume_transient(
        &mut self,
        name: &str,
        version: Option<u64>,
        opts: &ResumeOptions,
        mut stop: tokio::sync::mpsc::Receiver<StopRequest>,
    ) -> Result<TransientReport, ClientError> {
        let t0 = Instant::now();
        valid_parcel_name(name)?;
        let driver = prepare_vm_start(opts).await?;
        self.clean_stale_runs(name)?;
        let local = self.home.local_state(&self.user, name)?;
        if opts.disconnected {
            match &local {
                None => {
                    return Err(ClientError::Usage(format!(
                        "--transient --disconnected runs a version hoarded on this client, and {name} is not checked \
                         out here: run it connected, or `isr hoard {name}` first"
                    )))
                }
                Some(st) if version.is_some_and(|v| v != st.base_version) => {
                    return Err(ClientError::Usage(format!(
                        "--transient --disconnected runs the version hoarded here, {name} version {}; version {} is \
                         not on this client: run it connected",
                        st.base_version,
                        version.unwrap_or_default()
                    )))
                }
                Some(_) => {}
            }
        }
        let runtime_dir = opts.runtime_dir.clone().unwrap_or_else(default_runtime_dir);
        // A first look before anything is fetched (the VM's own check counts its RAM precisely).
        check_runtime_space(&runtime_dir, 1, "the transient run's working area")?;
        let records = self.home.transient_dir(&self.user, name);
        create_private_dir(&records)?;
        let area = private_dir_path(&runtime_dir, name);
        let mut run = Run::start(&records, RunKind::Transient, Some(area.clone()))?;
        let result = async {
            // At most one VM of a parcel on a client (the checkout's resume checks the other way round).
            if is_running(&self.home.parcel_dir(&self.user, name)) {
                return Err(ClientError::Other(format!(
                    "{name} is running on this client (`isr resume` or `isr disk`): a transient run would be a \
                     second VM of it; stop that first"
                )));
            }
            let private = PrivateDir::create(area.clone())?;
            let r = self
                .transient_run(name, version, opts, driver.as_ref(), &mut stop, &runtime_dir, private.path(), local, &mut run, t0)
                .await;
            let removed = private.remove();
            let r = r?;
            removed?;
            Ok(r)
        }
        .await;
        // Gone on every path (the guard removes it); make sure, and say so if not.
        let removed = match std::fs::remove_dir_all(&area) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(ClientError::io(
                format!(
                    "removing the transient run's private directory {} (it holds plaintext)",
                    area.display()
                ),
                e,
            )),
            _ => Ok(()),
        };
        let error = match (&result, &removed) {
            (Ok(_), Ok(())) => None,
            (Err(e), _) | (_, Err(e)) => Some(e.to_string()),
        };
        let finished =
            run.finish(if error.is_some() { RunEnd::Failed } else { RunEnd::TransientEnded }, false, error);
        let report = result?;
        removed?;
        finished?;
        Ok(report)
    }

    #[allow(clippy::too_many_arguments)]
    async fn transient_run(
        &mut self,
        name: &str,
        version: Option<u64>,
        opts: &ResumeOptions,
        driver: &dyn isr_vmm::VmmDriver,
        stop: &mut tokio::sync::mpsc::Receiver<StopRequest>,
        runtime_dir: &Path,
        area: &Path,
        local: Option<LocalState>,
        run: &mut Run,
        t0: Instant,
    ) -> Result<TransientReport, ClientError> {
        let work = ParcelFiles::new(area.join("parcel"));
        let (state, locked_by) = match local {
            Some(st) if opts.disconnected => {
                // The base version of the checkout, hoarded here: its sealed manifest and base keyrings are
                // copied (read, never written); its working keyrings and local state are not used.
                let from = self.home.parcel_files(&self.user, name);
                let copies = from.base_version_files().into_iter().zip(work.base_version_files());
                for ((src, required), (dst, _)) in copies {
                    match std::fs::read(&src) {
                        Ok(bytes) => write_atomic(&dst, &bytes)?,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {}
                        Err(e) => return Err(ClientError::io(format!("reading {}", src.display()), e)),
                    }
                }
                eprintln!(
                    "isr: --disconnected transient run of {name} version {} (hoarded here): the lock is not looked at, \
                     nothing will be checked in",
                    st.base_version
                );
                (LocalState { lock_id: String::new(), memory_dropped: false, ..st }, None)
            }
            _ => {
                let t = self.connect().await?;
                let detail = t.parcel(name).await?;
                let locked_by = detail.lock.as_ref().map(|l| l.holder.clone());
                match &detail.lock {
                    Some(l) => eprintln!(
                        "isr: {name} is locked by {} since {}; this transient run takes no lock and will check \
                         nothing in",
                        l.holder,
                        rfc3339(l.since_unix)
                    ),
                    None => eprintln!("isr: this transient run of {name} takes no lock and will check nothing in"),
                }
                (self.fetch_version_into(&t, name, version, String::new(), work.dir()).await?, locked_by)
            }
        };
        write_atomic(&work.state(), &serde_json::to_vec_pretty(&state).expect("serializable"))?;
        let o = self.open_at(name, state, work, Some(area.join("overlay")))?;
        let v = o.state.base_version;
        if opts.disconnected {
            let missing = self.missing_locally(&o).await?;
            if missing > 0 {
                return Err(ClientError::Usage(format!(
                    "--transient --disconnected needs every chunk of {name} version {v} here, and {missing} are not \
                     in the local cache: run `isr hoard {name}` first, or run it connected"
                )));
            }
        }
        eprintln!(
            "isr: transient run of {name} version {v}{}: every change is dropped when it ends",
            if o.manifest.memory.is_some() { ", resumed from its memory image" } else { ", booting" }
        );
        let report =
            self.run_vm(name, &o, opts, driver, stop, runtime_dir, &area.join("vm"), run, t0).await?;
        Ok(TransientReport { version: v, locked_by, report })
    }
}
