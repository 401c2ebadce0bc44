//! Every local file of a parcel, named in one place. The directory is a checked-out parcel's
//! (`HOME/parcels/USER/PARCEL/`), a transient run's working copy of a version (`RUNTIME_DIR/isr-PARCEL-ID/parcel/`),
//! or a transient run's records (`HOME/transient/USER/PARCEL/`, only the run files):
//!
//! ```text
//! state.json              base version, lock id, wrapped keyroot (home::LocalState)
//! base.manifest           the base version's manifest (authenticated on every load)
//! keyrings/base-KIND      sealed keyrings of the base version
//! keyrings/work-KIND      sealed working keyrings: present only when KIND was modified
//! runtime/KIND.img        the runtime image of KIND (crate::runtime): decoded chunks, XTS-encrypted
//! run.lock                flock held while a disk export or VM runs (crate::run)
//! run.json                the record of the running (or dead) run
//! run-outcome.json        how the last run ended
//! control.sock            the running process's control socket (crate::control), while it runs
//! unsent.json             bytes of changes not yet on the server, as last recorded (crate::running)
//! run.pid                 written by resumes before run.json existed (removed when seen)
//! ```
//!
//! No other code joins file names under a parcel directory.

use isr_format::ImageKind;
use std::path::{Path, PathBuf};

/// The local files of one parcel directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParcelFiles {
    dir: PathBuf,
}

impl ParcelFiles {
    pub fn new(dir: impl Into<PathBuf>) -> ParcelFiles {
        ParcelFiles { dir: dir.into() }
    }

    /// The parcel directory itself.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What this client remembers about the parcel (`home::LocalState`).
    pub fn state(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    /// The sealed manifest of the base version.
    pub fn base_manifest(&self) -> PathBuf {
        self.dir.join("base.manifest")
    }

    /// The directory of the sealed keyrings (synced after a keyring is removed).
    pub fn keyrings_dir(&self) -> PathBuf {
        self.dir.join("keyrings")
    }

    /// The sealed keyring of `kind` in the base version.
    pub fn base_keyring(&self, kind: ImageKind) -> PathBuf {
        self.keyrings_dir().join(format!("base-{}", kind.name()))
    }

    /// The sealed working keyring of `kind`: present only when `kind` changed since the base.
    pub fn work_keyring(&self, kind: ImageKind) -> PathBuf {
        self.keyrings_dir().join(format!("work-{}", kind.name()))
    }

    /// The runtime image of `kind` (see [`crate::runtime`]).
    pub fn runtime_image(&self, kind: ImageKind) -> PathBuf {
        self.dir.join("runtime").join(format!("{}.img", kind.name()))
    }

    /// The control socket of the process running the parcel ([`crate::control`]).
    pub fn control_socket(&self) -> PathBuf {
        self.dir.join("control.sock")
    }

    /// The bytes of changes not yet on the server, as last recorded ([`crate::running::UnsentRecord`]).
    pub fn unsent_record(&self) -> PathBuf {
        self.dir.join("unsent.json")
    }

    /// Held (flock) while a disk export or VM of the parcel runs.
    pub fn run_lock(&self) -> PathBuf {
        self.dir.join("run.lock")
    }

    /// The record of the current or last unfinished run ([`crate::run::RunRecord`]).
    pub fn run_record(&self) -> PathBuf {
        self.dir.join("run.json")
    }

    /// How the last run ended ([`crate::run::RunOutcome`]).
    pub fn run_outcome(&self) -> PathBuf {
        self.dir.join("run-outcome.json")
    }

    /// The pid file of resumes older than the run record (only ever removed).
    pub fn legacy_run_pid(&self) -> PathBuf {
        self.dir.join("run.pid")
    }

    /// The files that make a version checked out (manifest first, then every image's base keyring), each
    /// with whether it must exist: what a copy of the base version takes.
    pub fn base_version_files(&self) -> Vec<(PathBuf, bool)> {
        let mut files = vec![(self.base_manifest(), true)];
        files.extend(ImageKind::ALL.into_iter().map(|kind| (self.base_keyring(kind), false)));
        files
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_the_documented_layout() {
        let f = ParcelFiles::new("/h/parcels/alice/vm");
        assert_eq!(f.state(), Path::new("/h/parcels/alice/vm/state.json"));
        assert_eq!(f.base_manifest(), Path::new("/h/parcels/alice/vm/base.manifest"));
        assert_eq!(f.base_keyring(ImageKind::Disk), Path::new("/h/parcels/alice/vm/keyrings/base-disk"));
        assert_eq!(f.work_keyring(ImageKind::Memory), Path::new("/h/parcels/alice/vm/keyrings/work-memory"));
        assert_eq!(f.runtime_image(ImageKind::Disk), Path::new("/h/parcels/alice/vm/runtime/disk.img"));
        assert_eq!(f.run_lock(), Path::new("/h/parcels/alice/vm/run.lock"));
        assert_eq!(f.run_record(), Path::new("/h/parcels/alice/vm/run.json"));
        assert_eq!(f.run_outcome(), Path::new("/h/parcels/alice/vm/run-outcome.json"));
    }
}
