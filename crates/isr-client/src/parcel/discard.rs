//! `isr discard`: drop local changes, back to the base version.

use super::Client;
use crate::error::ClientError;
use crate::run::is_running;
use crate::runtime::RuntimeImage;
use isr_format::ImageKind;

impl Client {
    /// Drop local changes: back to the base version.
    pub fn discard(&mut self, name: &str) -> Result<(), ClientError> {
        let o = self.open(name)?;
        if is_running(o.files.dir()) {
            return Err(ClientError::Other(format!("{name} is running: stop it before discarding")));
        }
        for kind in ImageKind::ALL {
            // The runtime image's changes first: a crash half-way leaves changes to discard again, never a mix.
            let rt = o.files.runtime_image(kind);
            if rt.exists() {
                if let Some((base, _, _)) = self.keyrings(&o, kind)? {
                    let (img, _) = RuntimeImage::open(
                        &rt,
                        &o.keyroot,
                        &self.convergence_secret()?,
                        base.chunk_size(),
                        base.image_len(),
                        base.tags(),
                    )?;
                    img.drop_dirty()?;
                    img.close()?;
                }
            }
            let p = o.files.work_keyring(kind);
            if p.exists() {
                std::fs::remove_file(&p)
                    .map_err(|e| ClientError::io(format!("removing {}", p.display()), e))?;
            }
        }
        let mut st = o.state;
        st.memory_dropped = false;
        self.home.save_local_state(&st)
    }
}
