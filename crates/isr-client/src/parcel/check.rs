//! `isr check`: the local cache and runtime images of a checked-out parcel, verified and repaired.

use super::Client;
use crate::error::ClientError;
use crate::run::is_running;
use isr_format::{ChunkDecoder, ChunkIndex, ImageKind, Tag};
use std::collections::HashSet;

/// What `isr check` found: problems left, and problems repaired (`--repair`).
#[derive(Debug, Clone, Default)]
pub struct CheckReport {
    pub problems: Vec<String>,
    pub repaired: Vec<String>,
}

impl Client {
    /// Validate the local cache of a checked-out parcel: every chunk written here is cached, and (`full`)
    /// every cached chunk decodes with its key. With `repair`, every cached chunk is verified at least by its
    /// tag, and one that fails (or is missing) is fetched again (verified) from a lookaside directory or the
    /// server.
    pub async fn check(&mut self, name: &str, full: bool, repair: bool) -> Result<CheckReport, ClientError> {
        let o = self.open(name)?;
        let cache = self.cache()?;
        let sources = match repair {
            true => {
                let t = self.connect().await?;
                Some(self.sources(Some(t))?)
            }
            false => None,
        };
        let mut report = CheckReport::default();
        let mut decoder = ChunkDecoder::new();
        let mut checked = HashSet::new();
        // Made here and not in the cache: sent in the background while the parcel ran (the server has them),
        // else lost.
        let mut made_here_uncached = Vec::new();
        for kind in ImageKind::ALL {
            let Some((base, work, _)) = self.keyrings(&o, kind)? else { continue };
            let base_set: HashSet<&Tag> = base.tags().iter().collect();
            let bar = self.progress.task(&format!("check {}", kind.name()), work.image_len().0);
            for i in 0..work.chunk_count() {
                let idx = ChunkIndex(i);
                bar.advance(work.chunk_len(idx) as u64);
                let Some((tag, key)) = work.get(idx) else { continue };
                if !checked.insert(tag) {
                    continue;
                }
                let what = format!("{} chunk {i} ({tag})", kind.name());
                let problem = match cache.get(&tag).await? {
                    None if !base_set.contains(&tag) => {
                        made_here_uncached.push((tag, what));
                        continue;
                    }
                    None => None,
                    Some(stored) => {
                        let bad = if full {
                            decoder.decode(&tag, key, &stored, work.chunk_len(idx)).err()
                        } else if repair {
                            isr_format::codec::verify_tag(&tag, &stored).err()
                        } else {
                            None
                        };
                        bad.map(|e| format!("{what}: {e}"))
                    }
                };
                let Some(problem) = problem else { continue };
                let Some(sources) = &sources else {
                    report.problems.push(problem);
                    continue;
                };
                cache.evict(&tag)?;
                match sources.get_uncached(&tag).await? {
                    Some(stored) => {
                        decoder
                            .decode(&tag, key, &stored, work.chunk_len(idx))
                            .map_err(|e| ClientError::chunk(&tag, e))?;
                        cache.put_fetched(&tag, stored).await?;
                        report.repaired.push(problem);
                    }
                    None => report.problems.push(format!(
                        "{problem}; neither the server nor a lookaside directory has a copy (written here and never \
                         uploaded)"
                    )),
                }
            }
        }
        if !made_here_uncached.is_empty() {
            let tags: Vec<Tag> = made_here_uncached.iter().map(|(t, _)| *t).collect();
            match self.connect().await {
                Ok(t) => {
                    let missing: HashSet<Tag> = t.missing(&tags).await?.into_iter().collect();
                    for (tag, what) in made_here_uncached.iter().filter(|(t, _)| missing.contains(t)) {
                        report.problems.push(format!(
                            "{what} was written here but is neither in the cache nor on the server ({tag})"
                        ));
                    }
                }
                // Offline: what the background upload sent cannot be confirmed now; not a fault of this client.
                Err(ClientError::Unreachable { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        // The runtime images: opening one checks its blocks and mends what a crash left; --full verifies
        // every decoded clean chunk against the MAC of what was decoded into it.
        for kind in ImageKind::ALL {
            if !o.files.runtime_image(kind).exists() || is_running(o.files.dir()) {
                continue;
            }
            let img = self.working_image_from(&o, kind, self.sources(None)?)?;
            if full {
                let bad = img.verify_local().await?;
                for &i in &bad {
                    let problem = format!(
                        "{} chunk {i} in the runtime image does not match what was decoded",
                        kind.name()
                    );
                    if repair {
                        report.repaired.push(format!("{problem} (dropped: decoded again when read)"));
                    } else {
                        report.problems.push(problem);
                    }
                }
                if repair {
                    img.forget(&bad).await?;
                }
            }
            img.close().await?;
        }
        Ok(report)
    }
}
