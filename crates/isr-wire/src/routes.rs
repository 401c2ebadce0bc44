//! The routes of the API: the patterns the server's router matches (axum's `{param}` syntax, also the
//! `route` label of `isr_http_requests_total`) and the path builders the client requests, built from
//! validated values only, so a name never becomes another path.

use crate::names::ParcelName;
use isr_format::Tag;

/// Where the API lives below the server's base URL.
pub const API_PREFIX: &str = "/api/v1";

pub const LOGIN: &str = "/api/v1/login";
pub const PASSWORD: &str = "/api/v1/password";
pub const PARCELS: &str = "/api/v1/parcels";
pub const PARCEL: &str = "/api/v1/parcels/{name}";
pub const KEYROOT: &str = "/api/v1/parcels/{name}/keyroot";
pub const VERSIONS: &str = "/api/v1/parcels/{name}/versions";
pub const MANIFEST: &str = "/api/v1/parcels/{name}/versions/{n}/manifest";
pub const KEYRING: &str = "/api/v1/parcels/{name}/keyrings/{hash}";
pub const LOCK: &str = "/api/v1/parcels/{name}/lock";
/// Chunks uploaded under the parcel's lock ahead of the version that will reference them, kept from gc.
pub const HELD: &str = "/api/v1/parcels/{name}/held";
pub const CHUNKS_MISSING: &str = "/api/v1/chunks/missing";
pub const CHUNKS_FETCH: &str = "/api/v1/chunks/fetch";
pub const CHUNK: &str = "/api/v1/chunks/{tag}";
/// Prometheus metrics (not below the API prefix, no authentication).
pub const METRICS: &str = "/metrics";

/// Every route pattern.
pub const ALL: &[&str] = &[
    LOGIN,
    PASSWORD,
    PARCELS,
    PARCEL,
    KEYROOT,
    VERSIONS,
    MANIFEST,
    KEYRING,
    LOCK,
    HELD,
    CHUNKS_MISSING,
    CHUNKS_FETCH,
    CHUNK,
    METRICS,
];

/// The response header that names the version a manifest answer holds (the number for `head`).
pub const VERSION_HEADER: &str = "x-isr-version";

/// Which version's manifest: a number, or the head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionRef {
    Head,
    Number(u64),
}

impl VersionRef {
    /// `head` or a decimal number; `None` for anything else.
    pub fn parse(s: &str) -> Option<VersionRef> {
        if s == "head" {
            Some(VersionRef::Head)
        } else {
            s.parse().ok().map(VersionRef::Number)
        }
    }
}

impl std::fmt::Display for VersionRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VersionRef::Head => f.write_str("head"),
            VersionRef::Number(n) => write!(f, "{n}"),
        }
    }
}

/// A request path below [`API_PREFIX`], as its segments (each free of `/`, `?`, `#` and `%` by
/// construction; a client percent-encodes them anyway).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiPath(Vec<String>);

impl ApiPath {
    fn of(segments: &[&str]) -> ApiPath {
        ApiPath(segments.iter().map(|s| (*s).to_owned()).collect())
    }

    /// The segments after `/api/v1`.
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(String::as_str)
    }
}

impl std::fmt::Display for ApiPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(API_PREFIX)?;
        for s in &self.0 {
            write!(f, "/{s}")?;
        }
        Ok(())
    }
}

pub fn login() -> ApiPath {
    ApiPath::of(&["login"])
}
pub fn password() -> ApiPath {
    ApiPath::of(&["password"])
}
pub fn parcels() -> ApiPath {
    ApiPath::of(&["parcels"])
}
pub fn parcel(name: &ParcelName) -> ApiPath {
    ApiPath::of(&["parcels", name.as_str()])
}
pub fn keyroot(name: &ParcelName) -> ApiPath {
    ApiPath::of(&["parcels", name.as_str(), "keyroot"])
}
pub fn versions(name: &ParcelName) -> ApiPath {
    ApiPath::of(&["parcels", name.as_str(), "versions"])
}
pub fn manifest(name: &ParcelName, which: VersionRef) -> ApiPath {
    ApiPath::of(&["parcels", name.as_str(), "versions", &which.to_string(), "manifest"])
}
pub fn keyring(name: &ParcelName, hash: &Tag) -> ApiPath {
    ApiPath::of(&["parcels", name.as_str(), "keyrings", &hash.to_hex()])
}
pub fn lock(name: &ParcelName) -> ApiPath {
    ApiPath::of(&["parcels", name.as_str(), "lock"])
}
pub fn held(name: &ParcelName) -> ApiPath {
    ApiPath::of(&["parcels", name.as_str(), "held"])
}
pub fn chunks_missing() -> ApiPath {
    ApiPath::of(&["chunks", "missing"])
}
pub fn chunks_fetch() -> ApiPath {
    ApiPath::of(&["chunks", "fetch"])
}
pub fn chunk(tag: &Tag) -> ApiPath {
    ApiPath::of(&["chunks", &tag.to_hex()])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Does `path` match the axum-style `pattern` (each `{param}` one non-empty segment)?
    fn matches(pattern: &str, path: &str) -> bool {
        let (p, s): (Vec<_>, Vec<_>) = (pattern.split('/').collect(), path.split('/').collect());
        p.len() == s.len()
            && p.iter().zip(&s).all(|(p, s)| if p.starts_with('{') { !s.is_empty() } else { p == s })
    }

    #[test]
    fn every_builder_requests_its_pattern() {
        let p = ParcelName::parse("my-vm_1.0").unwrap();
        let t = Tag([7; 32]);
        let cases = [
            (login(), LOGIN),
            (password(), PASSWORD),
            (parcels(), PARCELS),
            (parcel(&p), PARCEL),
            (keyroot(&p), KEYROOT),
            (versions(&p), VERSIONS),
            (manifest(&p, VersionRef::Head), MANIFEST),
            (manifest(&p, VersionRef::Number(3)), MANIFEST),
            (keyring(&p, &t), KEYRING),
            (lock(&p), LOCK),
            (held(&p), HELD),
            (chunks_missing(), CHUNKS_MISSING),
            (chunks_fetch(), CHUNKS_FETCH),
            (chunk(&t), CHUNK),
        ];
        for (path, pattern) in &cases {
            let path = path.to_string();
            // The one pattern it matches is its own (the router would not route it elsewhere).
            let hits: Vec<_> = ALL.iter().filter(|r| matches(r, &path)).collect();
            // chunks/missing and chunks/fetch also fit chunks/{tag}; axum prefers the fixed segment.
            assert!(hits.contains(&pattern), "{path} does not match {pattern}");
        }
        assert_eq!(
            manifest(&p, VersionRef::Number(3)).to_string(),
            "/api/v1/parcels/my-vm_1.0/versions/3/manifest"
        );
        assert_eq!(chunk(&t).to_string(), format!("/api/v1/chunks/{}", "07".repeat(32)));
        assert_eq!(held(&p).to_string(), "/api/v1/parcels/my-vm_1.0/held");
        assert!(ALL.iter().all(|r| r.starts_with(API_PREFIX) || *r == METRICS));
    }

    #[test]
    fn version_refs() {
        assert_eq!(VersionRef::parse("head"), Some(VersionRef::Head));
        assert_eq!(VersionRef::parse("12"), Some(VersionRef::Number(12)));
        assert_eq!(VersionRef::parse("-1"), None);
        assert_eq!(VersionRef::parse("HEAD"), None);
    }
}
