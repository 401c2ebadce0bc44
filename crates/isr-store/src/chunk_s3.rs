//! [`ChunkStore`] on an S3-compatible object store (AWS S3, SeaweedFS, Garage, MinIO, ...).
//!
//! Chunks are objects `PREFIX/ab/abcdef...` (the fs store's layout). Content is addressed by tag, so a put
//! that races another put of the same tag writes the same bytes: `put` asks first (`HEAD`) only to report
//! whether the chunk was new and to skip the upload; correctness never rests on conditional PUT, which some
//! stores ignore. A reader never sees a partial object (S3 PUTs are atomic).

use crate::chunk::{ChunkStore, StoreError};
use async_trait::async_trait;
use bytes::Bytes;
use futures::TryStreamExt;
use isr_format::Tag;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use std::sync::Arc;

/// Chunks in a bucket of an S3-compatible store.
#[derive(Debug, Clone)]
pub struct S3ChunkStore {
    store: Arc<dyn ObjectStore>,
    /// Key prefix without leading or trailing '/'; may be empty.
    prefix: String,
    url: String,
}

fn backend(op: &str, key: &Path, e: object_store::Error) -> StoreError {
    StoreError::Backend(format!("object store {op} of {key}: {e}"))
}

/// `s3://BUCKET[/PREFIX]` as (bucket, prefix).
pub fn parse_s3_url(url: &str) -> Result<(String, String), StoreError> {
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| StoreError::Backend(format!("not an s3://BUCKET/PREFIX URL: {url}")))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() || prefix.contains("//") || prefix.split('/').any(|s| s == "." || s == "..") {
        return Err(StoreError::Backend(format!("bad s3://BUCKET/PREFIX URL: {url}")));
    }
    Ok((bucket.to_owned(), prefix.trim_matches('/').to_owned()))
}

impl S3ChunkStore {
    /// Opens `s3://BUCKET[/PREFIX]`, taking endpoint, region and credentials from the environment
    /// (`AWS_ENDPOINT_URL` or `AWS_ENDPOINT`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
    /// `AWS_SESSION_TOKEN`, `AWS_ALLOW_HTTP=true` for a plain-HTTP endpoint, ...). Nothing is contacted yet.
    pub fn from_url(url: &str) -> Result<Self, StoreError> {
        Self::from_url_with(url, AmazonS3Builder::from_env())
    }

    /// Like [`S3ChunkStore::from_url`] with a builder the caller configured (the bucket is set from `url`).
    pub fn from_url_with(url: &str, builder: AmazonS3Builder) -> Result<Self, StoreError> {
        // reqwest is built without a TLS crypto provider of its own: use ring (as the rest of the workspace).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (bucket, prefix) = parse_s3_url(url)?;
        let store = builder
            .with_bucket_name(bucket)
            .build()
            .map_err(|e| StoreError::Backend(format!("cannot configure object store for {url}: {e}")))?;
        Ok(S3ChunkStore { store: Arc::new(store), prefix, url: url.to_owned() })
    }

    /// Chunks under `prefix` of any object store (e.g. `object_store::memory::InMemory` in tests).
    pub fn new(store: Arc<dyn ObjectStore>, prefix: &str) -> Self {
        let prefix = prefix.trim_matches('/').to_owned();
        let url = format!("{store}/{prefix}");
        S3ChunkStore { store, prefix, url }
    }

    /// The URL (or description) it was opened with.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The object key of a chunk: `PREFIX/ab/abcdef...`.
    pub fn key_of(&self, tag: &Tag) -> Path {
        let hex = tag.to_hex();
        if self.prefix.is_empty() {
            Path::from(format!("{}/{hex}", &hex[..2]))
        } else {
            Path::from(format!("{}/{}/{hex}", self.prefix, &hex[..2]))
        }
    }

    /// The underlying object store.
    pub fn object_store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The tag an object key names, if it is a chunk key of this store.
    fn tag_of_key(&self, key: &Path) -> Option<Tag> {
        let mut parts: Vec<_> = key.parts().collect();
        let name = parts.pop()?;
        let fan = parts.pop()?;
        let tag = Tag::from_hex(name.as_ref())?;
        (fan.as_ref() == &name.as_ref()[..2]).then_some(tag)
    }

    fn prefix_path(&self) -> Option<Path> {
        (!self.prefix.is_empty()).then(|| Path::from(self.prefix.as_str()))
    }
}

#[async_trait]
impl ChunkStore for S3ChunkStore {
    async fn put(&self, tag: &Tag, data: Bytes) -> Result<bool, StoreError> {
        // One request: a create-only PUT (`If-None-Match: *`). A store that answers 412 tells us the chunk
        // was there; one that ignores the condition overwrites the object with the same bytes (its tag names
        // its content), which is harmless. Nothing relies on the answer for correctness: it only says
        // whether the chunk is new.
        let key = self.key_of(tag);
        let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
        match self.store.put_opts(&key, PutPayload::from_bytes(data), opts).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => {
                Ok(false)
            }
            Err(e) => Err(backend("put", &key, e)),
        }
    }

    async fn get(&self, tag: &Tag) -> Result<Option<Bytes>, StoreError> {
        let key = self.key_of(tag);
        match self.store.get(&key).await {
            Ok(r) => Ok(Some(r.bytes().await.map_err(|e| backend("get", &key, e))?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(backend("get", &key, e)),
        }
    }

    async fn contains(&self, tag: &Tag) -> Result<bool, StoreError> {
        let key = self.key_of(tag);
        match self.store.head(&key).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(backend("head", &key, e)),
        }
    }

    async fn delete(&self, tag: &Tag) -> Result<(), StoreError> {
        let key = self.key_of(tag);
        match self.store.delete(&key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(backend("delete", &key, e)),
        }
    }

    async fn age(&self, tag: &Tag) -> Option<std::time::Duration> {
        let meta = self.store.head(&self.key_of(tag)).await.ok()?;
        let modified: std::time::SystemTime = meta.last_modified.into();
        modified.elapsed().ok()
    }

    async fn list(&self) -> Result<Vec<(Tag, u64)>, StoreError> {
        // The stream pages through the listing (S3 ListObjectsV2 continuation tokens).
        let prefix = self.prefix_path();
        let mut stream = self.store.list(prefix.as_ref());
        let mut out = Vec::new();
        while let Some(meta) = stream.try_next().await.map_err(|e| {
            StoreError::Backend(format!("object store list of {}: {e}", prefix.clone().unwrap_or_default()))
        })? {
            if let Some(tag) = self.tag_of_key(&meta.location) {
                out.push((tag, meta.size));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        assert_eq!(parse_s3_url("s3://b/p/q/").unwrap(), ("b".into(), "p/q".into()));
        assert_eq!(parse_s3_url("s3://b").unwrap(), ("b".into(), "".into()));
        assert_eq!(parse_s3_url("s3://b/").unwrap(), ("b".into(), "".into()));
        assert!(parse_s3_url("s3:///p").is_err());
        assert!(parse_s3_url("http://b/p").is_err());
        assert!(parse_s3_url("s3://b/a/../c").is_err());
    }

    #[tokio::test]
    async fn keys_and_listing_on_memory() {
        let mem: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        let s = S3ChunkStore::new(mem.clone(), "/pre/fix/");
        let tag = Tag([0xab; 32]);
        assert_eq!(s.key_of(&tag).as_ref(), format!("pre/fix/ab/{}", tag.to_hex()));
        assert!(s.put(&tag, Bytes::from_static(b"x")).await.unwrap());
        assert!(!s.put(&tag, Bytes::from_static(b"x")).await.unwrap());
        // Foreign objects under the prefix and outside it are not chunks.
        mem.put(&Path::from("pre/fix/zz/notachunk"), PutPayload::from_static(b"y")).await.unwrap();
        mem.put(&Path::from(format!("other/ab/{}", tag.to_hex())), PutPayload::from_static(b"y"))
            .await
            .unwrap();
        assert_eq!(s.list().await.unwrap(), vec![(tag, 1)]);
        let unprefixed = S3ChunkStore::new(mem, "");
        assert_eq!(unprefixed.key_of(&tag).as_ref(), format!("ab/{}", tag.to_hex()));
    }
}
