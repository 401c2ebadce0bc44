//! `isr hoard`: every chunk of the parcel on this client.

use super::common::*;
use super::{Client, Opened};
use crate::error::ClientError;
use crate::run::is_running;
use isr_format::ImageKind;

/// How much of the disk a hoard decodes into the runtime image between two progress reports.
const DECODE_SLICE: u64 = 64 << 20;

impl Client {
    /// Fetch every chunk of the parcel into the cache, checking it out first when it is not here yet.
    pub async fn hoard(&mut self, name: &str) -> Result<Transfer, ClientError> {
        if self.home.local_state(&self.user, name)?.is_none() {
            self.checkout(name, None).await?;
        }
        let o = self.open(name)?;
        let t = self.connect().await?;
        let mut chunks = Vec::new();
        for kind in ImageKind::ALL {
            if let Some((base, work, _)) = self.keyrings(&o, kind)? {
                chunks.extend(image_chunks(&base));
                chunks.extend(image_chunks(&work));
            }
        }
        let sources = self.sources(Some(t))?;
        let transfer = fetch_missing(self.progress.as_ref(), &sources, &chunks, "hoard").await?;
        // Decoded into the runtime image too, so the first reads need no decode (a running parcel's own
        // process fills it as the guest reads).
        if !is_running(o.files.dir()) {
            let img = self.working_image_from(&o, ImageKind::Disk, sources)?;
            // In slices, for progress (each slice fetches and decodes many chunks at a time).
            let bar = self.progress.task("decode", img.len());
            let mut offset = 0;
            while offset < img.len() {
                let len = DECODE_SLICE.min(img.len() - offset);
                img.prefetch(offset, len)
                    .await
                    .map_err(|e| ClientError::io("filling the runtime image", e))?;
                bar.advance(len);
                offset += len;
            }
            drop(bar);
            img.close().await?;
        }
        Ok(transfer)
    }

    /// How many distinct stored chunks of a checked-out parcel are not in the cache.
    pub async fn missing_locally(&mut self, o: &Opened) -> Result<u64, ClientError> {
        let mut tags = Vec::new();
        for kind in ImageKind::ALL {
            if let Some((_, work, _)) = self.keyrings(o, kind)? {
                tags.extend_from_slice(work.tags());
            }
        }
        let sources = self.sources(None)?;
        let n = tokio::task::spawn_blocking(move || sources.missing_locally_blocking(&tags))
            .await
            .map_err(|e| ClientError::Other(format!("counting chunks: {e}")))?;
        Ok(n as u64)
    }
}
