//! `isr export`: the raw disk image of a version.

use super::common::*;
use super::Client;
use crate::error::ClientError;
use crate::home::valid_parcel_name;
use crate::manifests::{self, Asked, ParcelKey};
use bytes::Bytes;
use futures::StreamExt;
use isr_format::{ChunkDecoder, ChunkIndex, Keyring};
use std::path::Path;
use std::sync::Arc;

impl Client {
    /// Reconstruct the raw disk image of a version (default: the head) into `output`.
    pub async fn export(
        &mut self,
        name: &str,
        version: Option<u64>,
        output: &Path,
    ) -> Result<u64, ClientError> {
        valid_parcel_name(name)?;
        let t = self.connect().await?;
        let detail = t.parcel(name).await?;
        let wrap = self.secrets()?.wrap.clone();
        let keyroot = unwrap_keyroot(&detail.wrapped_keyroot, &wrap, "the server")?;
        let key = ParcelKey { user: &self.user, parcel: name, keyroot: &keyroot };
        let manifest =
            manifests::fetch(&t, &self.home, key, Asked::from_option(version, detail.head)).await?.manifest;
        let ring = Keyring::open(&t.keyring(name, &manifest.disk.keyring).await?, &keyroot)?;
        let sources = self.sources(Some(t.clone()))?;
        let cache = sources.cache().clone();
        let tmp = output.with_extension("isr-partial");
        let file = std::fs::File::create(&tmp)
            .map_err(|e| ClientError::io(format!("creating {}", tmp.display()), e))?;
        file.set_len(ring.image_len().0).map_err(|e| ClientError::io("sizing output", e))?;
        let file = Arc::new(file);
        let bar = self.progress.task("export", ring.image_len().0);
        let ring = Arc::new(ring);
        let results = futures::stream::iter(0..ring.chunk_count())
            .map(|i| {
                let (sources, cache, ring, file) =
                    (sources.clone(), cache.clone(), ring.clone(), file.clone());
                async move {
                    let idx = ChunkIndex(i);
                    let Some((tag, key)) = ring.get(idx).map(|(t, k)| (t, k.clone())) else { return Ok(0) };
                    let was_cached = cache.contains(&tag).await?;
                    let stored = sources.get(&tag).await?;
                    let len = ring.chunk_len(idx);
                    let offset = ring.chunk_size().offset_of(idx).0;
                    let decode_write =
                        |stored: Bytes, key: isr_format::ChunkKey, file: Arc<std::fs::File>| {
                            tokio::task::spawn_blocking(move || {
                                let plain = ChunkDecoder::new()
                                    .decode(&tag, &key, &stored, len)
                                    .map_err(|e| ClientError::chunk(&tag, e))?;
                                use std::os::unix::fs::FileExt;
                                file.write_all_at(&plain, offset)
                                    .map_err(|e| ClientError::io("writing output", e))?;
                                Ok::<u64, ClientError>(len as u64)
                            })
                        };
                    let first = decode_write(stored, key.clone(), file.clone())
                        .await
                        .map_err(|e| ClientError::Other(format!("export task: {e}")))?;
                    match first {
                        // A corrupt cached copy: a good one from a lookaside directory or the server instead.
                        Err(e @ ClientError::Integrity(_)) if was_cached => {
                            let good = sources.refetch(&tag, e).await?;
                            decode_write(good, key, file)
                                .await
                                .map_err(|e| ClientError::Other(format!("export task: {e}")))?
                        }
                        other => other,
                    }
                }
            })
            .buffer_unordered(FETCHES_IN_FLIGHT);
        futures::pin_mut!(results);
        while let Some(r) = results.next().await {
            match r {
                Ok(n) => bar.advance(n),
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(e);
                }
            }
        }
        drop(bar);
        file.sync_all().map_err(|e| ClientError::io("syncing output", e))?;
        std::fs::rename(&tmp, output)
            .map_err(|e| ClientError::io(format!("renaming to {}", output.display()), e))?;
        Ok(ring.image_len().0)
    }
}
