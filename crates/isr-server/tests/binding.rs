//! The commit handler refuses a bound manifest whose binding cannot be right for the request: another
//! user's or parcel's, or a version number other than `base_version + 1`. The server cannot check the MAC;
//! this catches client bugs (and clumsy replays) before a version nobody could open is stored.

mod common;

use common::{version, TestServer, Version};
use isr_format::{Binding, Keyroot, Manifest};
use reqwest::StatusCode;

/// `v` with its manifest re-sealed (under the test keyroot of `common::version`) bound to `binding`.
fn bound(v: &Version, binding: Binding) -> Version {
    let parsed = Manifest::parse_unauthenticated(&v.manifest).unwrap();
    assert!(parsed.binding.is_none(), "common::version seals legacy manifests");
    Version { manifest: parsed.manifest.seal(&Keyroot([3; 32]), &binding).unwrap(), ..v.clone() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_of_manifests_bound_elsewhere_are_refused() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let _bob = s.user("bob").await;
    let lock = alice.create("p", "c1").await;
    let v1 = version(1, 4, 0);
    assert!(alice.put_keyring("p", &lock, &v1).await.status.is_success());

    for (wrong, what) in [
        (Binding::new("alice", "q", 1), "parcel q"),
        (Binding::new("bob", "p", 1), "bob/p"),
        (Binding::new("alice", "p", 2), "version 2"),
    ] {
        let a = alice.commit("p", &lock, 0, &bound(&v1, wrong)).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{what}: {:?}", a.body);
        assert_eq!(a.code(), "bad_manifest", "{what}");
        let msg = a.json()["error"].as_str().unwrap().to_owned();
        assert!(msg.contains(what.split(' ').next_back().unwrap()), "{what}: {msg}");
    }
    let head = alice.get("/api/v1/parcels/p").await.json()["head"].as_u64().unwrap();
    assert_eq!(head, 0, "nothing refused was stored");

    // Bound to exactly this parcel and base + 1: accepted; legacy (unbound) manifests still are too.
    assert_eq!(alice.upload_version("p", &lock, 0, &bound(&v1, Binding::new("alice", "p", 1))).await, 1);
    let v2 = bound(&version(2, 4, 0), Binding::new("alice", "p", 2));
    let stale = alice.commit("p", &lock, 1, &bound(&version(2, 4, 0), Binding::new("alice", "p", 3))).await;
    assert_eq!(stale.code(), "bad_manifest", "{:?}", stale.body);
    assert_eq!(alice.upload_version("p", &lock, 1, &v2).await, 2);
    assert_eq!(alice.upload_version("p", &lock, 2, &version(3, 4, 0)).await, 3);
    let served = alice.get("/api/v1/parcels/p/versions/2/manifest").await;
    assert_eq!(served.body.as_ref(), &v2.manifest[..], "a bound manifest is stored as committed");
}
