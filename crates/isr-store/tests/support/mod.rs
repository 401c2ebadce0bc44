//! Test support: real PostgreSQL and S3 services, chunk and keyring builders, chunk-store adapters.
//!
//! Services: `isr_testkit` finds or starts them (never skipped).

#![allow(dead_code)]

use async_trait::async_trait;
use bytes::Bytes;
use isr_format::{
    ChunkEncoder, ChunkIndex, ChunkKey, ChunkSize, ConvergenceSecret, ImageLen, Keyring, Keyroot, Tag,
};
use isr_store::meta::{ChunkPresence, ChunkSweeper, MetaError};
use isr_store::{ChunkStore, PgMetaStore, S3ChunkStore};
use std::sync::Arc;
use std::time::Duration;

pub use isr_testkit::{services, unique};

/// A chunk store in a fresh prefix of the test bucket.
pub fn s3_store() -> S3ChunkStore {
    let s = services();
    S3ChunkStore::from_url_with(&s.fresh_s3_url(), s.s3_builder()).expect("s3 store")
}

/// A fresh database on the test server; returns its URL.
pub async fn pg_database() -> String {
    services().fresh_pg_database().await
}

pub async fn pg_store() -> (PgMetaStore, String) {
    let url = pg_database().await;
    (PgMetaStore::open(&url).await.expect("open PgMetaStore"), url)
}

/// A real encoded chunk (for stores that verify tags).
pub fn encoded_chunk(seed: u64) -> (Tag, Bytes) {
    let mut data = vec![0u8; 4096];
    data[..8].copy_from_slice(&seed.to_le_bytes());
    data[100] = 1;
    let e = ChunkEncoder::new(ConvergenceSecret([7; 32])).encode(&data).unwrap().expect("non-zero chunk");
    (e.tag, Bytes::from(e.stored))
}

/// Cheap fake chunk bytes and their tag (for metadata tests: only the tag matters).
pub fn fake_chunk() -> (Tag, Bytes) {
    let data = Bytes::from(isr_format::random_bytes::<48>().to_vec());
    (Tag::of(&data), data)
}

/// A sealed keyring naming `tags` (plus one all-zero chunk) and its hash.
pub fn keyring(tags: &[Tag]) -> (Tag, Bytes) {
    let cs = ChunkSize::new(4096).unwrap();
    let n = tags.len() as u64 + 1;
    let mut k = Keyring::new(cs, ImageLen(n * 4096)).unwrap();
    for (i, t) in tags.iter().enumerate() {
        k.set(ChunkIndex(i as u64), Some((*t, ChunkKey([1; 32]))));
    }
    let bytes = Bytes::from(k.seal(&Keyroot::random()));
    (Tag::of(&bytes), bytes)
}

/// Which chunks a store lacks (a commit's check).
pub struct Presence<'a> {
    pub store: &'a dyn ChunkStore,
    /// Sleep after the check, widening the window between check and insert (race tests).
    pub delay: Duration,
}

#[async_trait]
impl ChunkPresence for Presence<'_> {
    async fn missing(&self, tags: Vec<Tag>) -> Result<Vec<Tag>, MetaError> {
        let mut out = Vec::new();
        for t in tags {
            if !self.store.contains(&t).await? {
                out.push(t);
            }
        }
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        Ok(out)
    }
}

pub struct Sweeper<'a>(pub &'a dyn ChunkStore);

#[async_trait]
impl ChunkSweeper for Sweeper<'_> {
    async fn delete(&self, tags: Vec<Tag>) -> Result<(), MetaError> {
        for t in tags {
            self.0.delete(&t).await?;
        }
        Ok(())
    }
}

pub fn arc<S: ChunkStore>(s: S) -> Arc<dyn ChunkStore> {
    Arc::new(s)
}
