//! The HTTP API against an in-process server on 127.0.0.1:0.

mod common;

use common::{version, Answer, Api, Backend, TestServer};
use isr_format::codec::MAX_STORED;
use isr_format::Tag;
use reqwest::{Method, StatusCode};
use serde_json::json;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Every test of the API runs on every backend combination: `embedded::NAME`, `sqlite_s3::NAME`,
/// `pg_fs::NAME`, `pg_s3::NAME` (PostgreSQL and S3 are real services, see `isr_testkit`).
macro_rules! on_every_backend {
    ($($test:ident),* $(,)?) => {
        on_every_backend!(@module embedded, Embedded, $($test),*);
        on_every_backend!(@module sqlite_s3, SqliteS3, $($test),*);
        on_every_backend!(@module pg_fs, PgFs, $($test),*);
        on_every_backend!(@module pg_s3, PgS3, $($test),*);
    };
    (@module $module:ident, $backend:ident, $($test:ident),*) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    super::$test(super::Backend::$backend).await
                }
            )*
        }
    };
}

on_every_backend!(
    every_endpoint_refuses_without_a_token_and_with_another_users_token,
    login_wrong_secret_and_unknown_user_get_the_same_401,
    concurrent_wrong_logins_are_held_back_before_they_are_verified,
    password_change_replaces_the_login_secret,
    locks_conflict_name_the_holder_and_relock_is_idempotent,
    broken_locks_are_refused_naming_who_broke_them,
    only_a_parcel_without_versions_can_be_deleted,
    commit_checks_lock_base_manifest_keyrings_and_chunks,
    chunk_uploads_are_verified_and_fetchable,
    oversized_chunk_bodies_are_refused_early,
    prune_and_gc_keep_what_versions_reference,
    commits_racing_gc_never_lose_chunks,
    commits_make_chunks_durable_and_missing_answers_from_the_right_place,
);

/// Method, path, JSON body, octet body.
type Route = (Method, String, Option<serde_json::Value>, Option<Vec<u8>>);

async fn every_endpoint_refuses_without_a_token_and_with_another_users_token(backend: Backend) {
    let s = TestServer::start_on(backend).await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let lock = alice.create("p", "c1").await;
    let v1 = version(1, 4, 0);
    assert_eq!(alice.upload_version("p", &lock, 0, &v1).await, 1);
    let t = v1.chunks[0].0;
    let k = v1.keyring_hash;
    let parcel_routes: Vec<Route> = vec![
        (Method::GET, "/api/v1/parcels/p".into(), None, None),
        (Method::DELETE, "/api/v1/parcels/p?client_id=c1".into(), None, None),
        (Method::PUT, "/api/v1/parcels/p/keyroot".into(), Some(json!({"wrapped_keyroot": "00"})), None),
        (Method::GET, "/api/v1/parcels/p/versions".into(), None, None),
        (Method::GET, "/api/v1/parcels/p/versions/1/manifest".into(), None, None),
        (Method::GET, "/api/v1/parcels/p/versions/head/manifest".into(), None, None),
        (
            Method::PUT,
            format!("/api/v1/parcels/p/keyrings/{k}?lock_id={lock}"),
            None,
            Some(v1.keyring.clone()),
        ),
        (Method::GET, format!("/api/v1/parcels/p/keyrings/{k}"), None, None),
        (
            Method::POST,
            "/api/v1/parcels/p/lock".into(),
            Some(json!({"holder": "h", "client_id": "c9"})),
            None,
        ),
        (Method::DELETE, format!("/api/v1/parcels/p/lock?lock_id={lock}"), None, None),
        (Method::GET, format!("/api/v1/parcels/p/lock?lock_id={lock}"), None, None),
        (Method::DELETE, "/api/v1/parcels/p/lock?force=true".into(), None, None),
        (
            Method::POST,
            "/api/v1/parcels/p/held".into(),
            Some(json!({"lock_id": lock, "tags": [t.to_hex()]})),
            None,
        ),
        (
            Method::POST,
            "/api/v1/parcels/p/versions".into(),
            Some(
                json!({"lock_id": lock, "base_version": 1, "manifest": "", "client": "x", "comment": "", "bytes_uploaded": 0}),
            ),
            None,
        ),
    ];
    let chunk_routes: Vec<Route> = vec![
        (Method::GET, "/api/v1/parcels".into(), None, None),
        (Method::PUT, "/api/v1/password".into(), Some(json!({"login_secret": "00".repeat(32)})), None),
        (
            Method::POST,
            "/api/v1/parcels".into(),
            Some(
                json!({"name": "q", "wrapped_keyroot": "00", "recovery_keyroot": null, "holder": "h", "client_id": "c"}),
            ),
            None,
        ),
        (Method::POST, "/api/v1/chunks/missing".into(), None, Some(t.0.to_vec())),
        (Method::POST, "/api/v1/chunks/fetch".into(), None, Some(t.0.to_vec())),
        (Method::PUT, format!("/api/v1/chunks/{t}"), None, Some(v1.chunks[0].1.clone())),
        (Method::GET, format!("/api/v1/chunks/{t}"), None, None),
    ];
    let anonymous = Api::new(&s.url);
    let mut forged = Api::new(&s.url);
    forged.token = Some("0".repeat(64));
    for (m, path, j, b) in parcel_routes.iter().chain(&chunk_routes) {
        for api in [&anonymous, &forged] {
            let body = j.as_ref().map(|j| serde_json::to_vec(j).unwrap()).or(b.clone());
            let a = api.send(m.clone(), path, body, j.is_some()).await;
            assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{m} {path}");
            assert_eq!(a.code(), "unauthorized", "{m} {path}");
        }
    }
    // Bob cannot tell alice's parcel from a missing one.
    for (m, path, j, b) in &parcel_routes {
        let body = j.as_ref().map(|j| serde_json::to_vec(j).unwrap()).or(b.clone());
        let a = bob.send(m.clone(), path, body, j.is_some()).await;
        assert_eq!(a.status, StatusCode::NOT_FOUND, "{m} {path}: {:?}", a.body);
        assert_eq!(a.code(), "no_such_parcel", "{m} {path}");
    }
    assert_eq!(bob.get("/api/v1/parcels").await.json(), json!([]));
    // Nothing of alice's changed.
    let p = alice.get("/api/v1/parcels/p").await.json();
    assert_eq!(p["head"], 1);
    assert_eq!(p["wrapped_keyroot"], "00ff");
    assert_eq!(p["lock"]["holder"], "host-c1");
    s.stop().await;
}

async fn login_wrong_secret_and_unknown_user_get_the_same_401(backend: Backend) {
    let s = TestServer::start_on(backend).await;
    let secret = s.add_user("alice").await;
    let api = Api::new(&s.url);
    let wrong = isr_format::LoginSecret::random();
    let a = api.post_json("/api/v1/login", json!({"user": "alice", "login_secret": wrong.to_hex()})).await;
    let b = api.post_json("/api/v1/login", json!({"user": "nobody", "login_secret": wrong.to_hex()})).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(a.code(), "bad_credentials");
    assert_eq!(a.body, b.body);
    assert_eq!(a.status, b.status);
    let mut api = Api::new(&s.url);
    let v = api.login("alice", &secret).await;
    assert_eq!(v["convergence_secret"].as_str().unwrap(), s.storage.convergence_secret.to_hex());
    assert_eq!(v["recovery_pubkey"], serde_json::Value::Null);
    assert!(v["expires_unix"].as_i64().unwrap() > isr_server::now_unix() + 11 * 3600);
    let m = String::from_utf8(api.get("/metrics").await.body.to_vec()).unwrap();
    assert!(m.contains("isr_logins_failed_total 2"), "{m}");
    assert!(m.contains("isr_http_requests_total{route=\"/api/v1/login\",status=\"401\"} 2"), "{m}");
    s.stop().await;
}

/// The value of one metric line of `GET /metrics`.
async fn metric(api: &Api, name: &str) -> i64 {
    let m = String::from_utf8(api.get("/metrics").await.body.to_vec()).unwrap();
    let prefix = format!("{name} ");
    m.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no metric {name} in {m}"))
        .parse()
        .unwrap()
}

/// Polls `/metrics` until `done` holds for `name`'s value (a generous deadline: machine speed never
/// decides the outcome, only how long the wait is).
async fn wait_for_metric(api: &Api, name: &str, done: impl Fn(i64) -> bool) -> i64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    loop {
        let v = metric(api, name).await;
        if done(v) {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "{name} stayed at {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn concurrent_wrong_logins_are_held_back_before_they_are_verified(backend: Backend) {
    // Hour-long slots: nothing is admitted by the clock during the test, only by the shift below.
    let throttle = isr_server::auth::LoginThrottle {
        unit_secs: 3600,
        max_delay_secs: 100 * 3600,
        ..isr_server::auth::LoginThrottle::default()
    };
    let settings = isr_server::ServerSettings { login_throttle: throttle, ..Default::default() };
    let s = TestServer::start_with(backend, settings).await;
    let secret = s.add_user("alice").await;
    let bob_secret = s.add_user("bob").await;
    let api = Api::new(&s.url);
    let wrong = json!({"user": "alice", "login_secret": isr_format::LoginSecret::random().to_hex()});
    // Three free failures, verified one by one.
    for _ in 0..3 {
        assert_eq!(api.post_json("/api/v1/login", wrong.clone()).await.code(), "bad_credentials");
    }
    assert_eq!(metric(&api, "isr_login_verifications_total").await, 3);
    // Thirty guesses at once, then the right secret behind them: all held back, none verified.
    let mut attempts: Vec<tokio::task::JoinHandle<Answer>> = (0..30)
        .map(|_| {
            let (api, wrong) = (api.clone(), wrong.clone());
            tokio::spawn(async move { api.post_json("/api/v1/login", wrong).await })
        })
        .collect();
    wait_for_metric(&api, "isr_logins_held_back", |v| v == 30).await;
    let right = json!({"user": "alice", "login_secret": secret.to_hex()});
    let api2 = api.clone();
    attempts.push(tokio::spawn(async move { api2.post_json("/api/v1/login", right).await }));
    wait_for_metric(&api, "isr_logins_held_back", |v| v == 31).await;
    // Another user is not held up by the flood.
    let mut bob = Api::new(&s.url);
    bob.login("bob", &bob_secret).await;
    assert_eq!(metric(&api, "isr_login_verifications_total").await, 4, "alice: 3, bob: 1");
    assert_eq!(metric(&api, "isr_login_attempts_total").await, 3 + 31 + 1);
    // The next slot opens (the last failure moved hours back in the shared counter): exactly one held
    // attempt gets it, counted as a failure before its verification; the others wait for the next slot.
    let seen = s.storage.meta.login_failures("alice").await.unwrap();
    assert_eq!(seen.count, 3);
    assert!(s.storage.meta.reserve_login_attempt("alice", seen, seen.last_unix - 10 * 3600).await.unwrap());
    wait_for_metric(&api, "isr_login_verifications_total", |v| v >= 5).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    while attempts.iter().filter(|a| a.is_finished()).count() == 0 {
        assert!(std::time::Instant::now() < deadline, "the admitted attempt never answered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(metric(&api, "isr_login_verifications_total").await, 5);
    assert_eq!(metric(&api, "isr_logins_held_back").await, 30);
    assert_eq!(s.storage.meta.login_failures("alice").await.unwrap().count, 5);
    let (done, held): (Vec<_>, Vec<_>) = attempts.into_iter().partition(|a| a.is_finished());
    assert_eq!(done.len(), 1);
    // First come, first admitted: a guess, not the right secret queued behind them.
    let answer = done.into_iter().next().unwrap().await.unwrap();
    assert_eq!(answer.code(), "bad_credentials");
    for h in held {
        h.abort();
    }
    // Not stopped gracefully: the held attempts would hold the drain for its whole timeout.
}

async fn password_change_replaces_the_login_secret(backend: Backend) {
    let s = TestServer::start_on(backend).await;
    let old = s.add_user("alice").await;
    let mut alice = Api::new(&s.url);
    alice.login("alice", &old).await;
    let anon = Api::new(&s.url);
    let wrong = json!({"user": "alice", "login_secret": isr_format::LoginSecret::random().to_hex()});
    for _ in 0..2 {
        anon.post_json("/api/v1/login", wrong.clone()).await;
    }
    assert_eq!(s.storage.meta.login_failures("alice").await.unwrap().count, 2);
    let a = alice.put_json("/api/v1/password", json!({"login_secret": "not hex"})).await;
    assert_eq!((a.status, a.code()), (StatusCode::BAD_REQUEST, "bad_request".into()));
    let new = isr_format::LoginSecret::random();
    let a = alice.put_json("/api/v1/password", json!({"login_secret": new.to_hex()})).await;
    assert_eq!(a.status, StatusCode::NO_CONTENT, "{:?}", a.body);
    assert_eq!(s.storage.meta.login_failures("alice").await.unwrap().count, 0, "failures cleared");
    // The old secret no longer logs in; the new one does; the token in use stays valid.
    let a = anon.post_json("/api/v1/login", json!({"user": "alice", "login_secret": old.to_hex()})).await;
    assert_eq!(a.code(), "bad_credentials");
    Api::new(&s.url).login("alice", &new).await;
    assert_eq!(alice.get("/api/v1/parcels").await.status, StatusCode::OK);
    s.stop().await;
}

async fn locks_conflict_name_the_holder_and_relock_is_idempotent(backend: Backend) {
    let s = TestServer::start_on(backend).await;
    let alice = s.user("alice").await;
    let lock = alice.create("p", "c1").await;
    // Same client: the same lock back.
    let a = alice.lock("p", "c1").await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.json()["lock_id"], lock.as_str());
    // Another client: 409 naming the holder.
    let a = alice.lock("p", "c2").await;
    assert_eq!(a.status, StatusCode::CONFLICT);
    let j = a.json();
    assert_eq!(j["code"], "locked");
    assert_eq!(j["holder"], "host-c1");
    assert!(j["since_unix"].as_i64().unwrap() > 0);
    let msg = j["error"].as_str().unwrap();
    assert!(msg.starts_with("parcel alice/p is locked by host-c1 since 20"), "{msg}");
    assert!(msg.ends_with('Z'), "{msg}");
    let listed = alice.get("/api/v1/parcels").await.json();
    assert_eq!(listed[0]["lock"]["holder"], "host-c1");
    assert_eq!(listed[0]["head"], 0);
    // Wrong id while locked: told who holds it; right id: released; stale id afterwards: mismatch.
    assert_eq!(alice.delete("/api/v1/parcels/p/lock?lock_id=abcd").await.code(), "locked");
    assert_eq!(
        alice.delete(&format!("/api/v1/parcels/p/lock?lock_id={lock}")).await.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(alice.delete(&format!("/api/v1/parcels/p/lock?lock_id={lock}")).await.code(), "lock_mismatch");
    let l2 = alice.lock("p", "c2").await.json()["lock_id"].as_str().unwrap().to_owned();
    assert_ne!(l2, lock);
    let m = String::from_utf8(alice.get("/metrics").await.body.to_vec()).unwrap();
    assert!(m.contains("isr_locks_held 1"), "{m}");
    // Force breaks it.
    assert_eq!(alice.delete("/api/v1/parcels/p/lock?force=true").await.status, StatusCode::NO_CONTENT);
    assert_eq!(alice.get("/api/v1/parcels/p").await.json()["lock"], serde_json::Value::Null);
    // Delete refused while another client holds the lock, allowed for the holder.
    alice.lock("p", "c3").await;
    assert_eq!(alice.delete("/api/v1/parcels/p?client_id=c1").await.code(), "locked");
    assert_eq!(alice.delete("/api/v1/parcels/p?client_id=c3").await.status, StatusCode::NO_CONTENT);
    assert_eq!(alice.get("/api/v1/parcels/p").await.code(), "no_such_parcel");
    s.stop().await;
}

/// A 409 `lock_broken` naming the breaker, and the current holder when there is one.
fn assert_lock_broken(a: &Answer, by: &str, holder: Option<&str>) {
    assert_eq!((a.status, a.code()), (StatusCode::CONFLICT, "lock_broken".into()), "{:?}", a.body);
    let j = a.json();
    assert_eq!(j["broken_by"], by);
    assert!(j["broken_unix"].as_i64().unwrap() > 1_700_000_000);
    let msg = j["error"].as_str().unwrap();
    assert!(msg.starts_with(&format!("your lock on alice/p was broken by {by} at 20")), "{msg}");
    assert!(msg.ends_with('Z'), "{msg}");
    match holder {
        Some(h) => {
            assert_eq!(j["holder"], h);
            assert!(j["since_unix"].as_i64().unwrap() > 0);
        }
        None => assert!(j.get("holder").is_none(), "{j}"),
    }
}

async fn broken_locks_are_refused_naming_who_broke_them(backend: Backend) {
    let s = TestServer::start_on(backend).await;
    let alice = s.user("alice").await;
    let lock = alice.create("p", "c1").await;
    assert_eq!(alice.upload_version("p", &lock, 0, &version(1, 4, 0)).await, 1);
    let a = alice.confirm("p", &lock).await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    assert_eq!(a.json()["holder"], "host-c1");
    assert!(a.json()["since_unix"].as_i64().unwrap() > 0);

    // Another client breaks the lock. The old holder's every lock-carrying call is told who and when.
    let a = alice.delete("/api/v1/parcels/p/lock?force=true&by=desk%20top").await;
    assert_eq!(a.status, StatusCode::NO_CONTENT);
    let v2 = version(2, 4, 0);
    for (t, c) in &v2.chunks {
        alice.put_chunk(t, c).await;
    }
    assert_lock_broken(&alice.put_keyring("p", &lock, &v2).await, "desk top", None);
    assert_lock_broken(&alice.commit("p", &lock, 1, &v2).await, "desk top", None);
    assert_lock_broken(
        &alice.delete(&format!("/api/v1/parcels/p/lock?lock_id={lock}")).await,
        "desk top",
        None,
    );
    assert_lock_broken(&alice.confirm("p", &lock).await, "desk top", None);
    assert_eq!(
        alice.get(&format!("/api/v1/parcels/p/keyrings/{}", v2.keyring_hash)).await.code(),
        "no_such_keyring"
    );
    assert_eq!(alice.get("/api/v1/parcels/p").await.json()["head"], 1);
    // An id never held, on an unlocked parcel: unknown.
    assert_eq!(alice.confirm("p", "abcd").await.code(), "lock_mismatch");
    // The lock id is required where it is checked.
    let a =
        alice.put_bytes(&format!("/api/v1/parcels/p/keyrings/{}", v2.keyring_hash), v2.keyring.clone()).await;
    assert_eq!((a.status, a.code()), (StatusCode::BAD_REQUEST, "bad_request".into()));
    assert_eq!(alice.get("/api/v1/parcels/p/lock").await.code(), "bad_request");

    // Someone else holds the parcel now: the broken holder also learns who; other ids see the holder.
    let l2 = alice.lock("p", "c2").await.json()["lock_id"].as_str().unwrap().to_owned();
    assert_lock_broken(&alice.confirm("p", &lock).await, "desk top", Some("host-c2"));
    assert_lock_broken(&alice.commit("p", &lock, 1, &v2).await, "desk top", Some("host-c2"));
    let a = alice.confirm("p", "abcd").await;
    assert_eq!((a.code(), a.json()["holder"].clone()), ("locked".into(), json!("host-c2")));
    // The new holder works as usual; after a normal release its id is just unknown.
    assert_eq!(alice.upload_version("p", &l2, 1, &v2).await, 2);
    assert_eq!(
        alice.delete(&format!("/api/v1/parcels/p/lock?lock_id={l2}")).await.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(alice.confirm("p", &l2).await.code(), "lock_mismatch");
    assert_lock_broken(&alice.confirm("p", &lock).await, "desk top", None);

    // The breaker's name is a display name: control characters are refused and the lock stays.
    let l3 = alice.lock("p", "c1").await.json()["lock_id"].as_str().unwrap().to_owned();
    assert_ne!(l3, lock);
    assert_eq!(alice.delete("/api/v1/parcels/p/lock?force=true&by=a%0Ab").await.code(), "bad_request");
    assert_eq!(alice.confirm("p", &l3).await.status, StatusCode::OK);
    // Without a name, the breaker is still named somehow; only the latest break is remembered.
    alice.delete("/api/v1/parcels/p/lock?force=true").await;
    assert_lock_broken(&alice.confirm("p", &l3).await, "an unnamed client of alice", None);
    assert_eq!(alice.confirm("p", &lock).await.code(), "lock_mismatch");
    s.stop().await;
}

async fn only_a_parcel_without_versions_can_be_deleted(backend: Backend) {
    let s = TestServer::start_on(backend).await;
    let alice = s.user("alice").await;
    let lock = alice.create("p", "c1").await;
    let v1 = version(1, 4, 0);
    assert_eq!(alice.upload_version("p", &lock, 0, &v1).await, 1);
    // Whoever asks, with or without the lock: a parcel with versions stays.
    for path in ["/api/v1/parcels/p?client_id=c1", "/api/v1/parcels/p?client_id=c2", "/api/v1/parcels/p"] {
        let a = alice.delete(path).await;
        assert_eq!((a.status, a.code()), (StatusCode::CONFLICT, "has_versions".into()), "{path}");
    }
    alice.delete("/api/v1/parcels/p/lock?force=true&by=x").await;
    assert_eq!(alice.delete("/api/v1/parcels/p").await.code(), "has_versions");
    let m = alice.get("/api/v1/parcels/p/versions/head/manifest").await;
    assert_eq!(&m.body[..], &v1.manifest[..]);
    // An undone create: the creator's client may delete it; another client may not while it is locked.
    alice.create("q", "c1").await;
    assert_eq!(alice.delete("/api/v1/parcels/q?client_id=c2").await.code(), "locked");
    assert_eq!(alice.delete("/api/v1/parcels/q?client_id=c1").await.status, StatusCode::NO_CONTENT);
    assert_eq!(alice.get("/api/v1/parcels/q").await.code(), "no_such_parcel");
    // Unlocked and empty: deletable.
    let l = alice.create("r", "c1").await;
    alice.delete(&format!("/api/v1/parcels/r/lock?lock_id={l}")).await;
    assert_eq!(alice.delete("/api/v1/parcels/r").await.status, StatusCode::NO_CONTENT);
    s.stop().await;
}

async fn commit_checks_lock_base_manifest_keyrings_and_chunks(backend: Backend) {
    let s = TestServer::start_on(backend).await;
    let alice = s.user("alice").await;
    let lock = alice.create("p", "c1").await;
    assert_eq!(alice.create_raw_dup("p").await, "parcel_exists");
    let v1 = version(1, 6, 0);
    // Keyring not uploaded yet.
    let a = alice.commit("p", &lock, 0, &v1).await;
    assert_eq!((a.status, a.code()), (StatusCode::BAD_REQUEST, "missing_keyring".into()));
    assert_eq!(a.json()["missing"], json!([v1.keyring_hash.to_hex()]));
    // Keyring checks.
    let wrong = alice
        .put_bytes(&format!("/api/v1/parcels/p/keyrings/{}?lock_id={lock}", Tag([1; 32])), v1.keyring.clone())
        .await;
    assert_eq!((wrong.status, wrong.code()), (StatusCode::BAD_REQUEST, "hash_mismatch".into()));
    let junk = b"not a keyring".to_vec();
    let bad =
        alice.put_bytes(&format!("/api/v1/parcels/p/keyrings/{}?lock_id={lock}", Tag::of(&junk)), junk).await;
    assert_eq!((bad.status, bad.code()), (StatusCode::BAD_REQUEST, "bad_keyring".into()));
    assert_eq!(alice.put_keyring("p", &lock, &v1).await.status, StatusCode::CREATED);
    assert_eq!(alice.put_keyring("p", &lock, &v1).await.status, StatusCode::OK);
    // Chunks missing: the whole list comes back.
    let a = alice.commit("p", &lock, 0, &v1).await;
    assert_eq!((a.status, a.code()), (StatusCode::CONFLICT, "missing_chunks".into()));
    let mut listed: Vec<String> =
        a.json()["missing"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()).collect();
    let mut want: Vec<String> = v1.tags().iter().map(Tag::to_hex).collect();
    listed.sort();
    want.sort();
    assert_eq!(listed, want);
    // Upload some: the list shrinks to the rest.
    for (t, c) in &v1.chunks[..3] {
        assert_eq!(alice.put_chunk(t, c).await.status, StatusCode::CREATED);
    }
    let a = alice.commit("p", &lock, 0, &v1).await;
    assert_eq!(a.json()["missing"].as_array().unwrap().len(), v1.chunks.len() - 3);
    assert_eq!(alice.get("/api/v1/parcels/p").await.json()["head"], 0);
    for (t, c) in &v1.chunks[3..] {
        alice.put_chunk(t, c).await;
    }
    // Bad manifest, wrong lock, stale base.
    let mut broken = v1.clone();
    broken.manifest[20] ^= 1;
    assert_eq!(alice.commit("p", &lock, 0, &broken).await.code(), "bad_manifest");
    assert_eq!(alice.commit("p", "00", 0, &v1).await.code(), "locked");
    let a = alice.commit("p", &lock, 0, &v1).await;
    assert_eq!(a.status, StatusCode::CREATED, "{:?}", a.body);
    assert_eq!(a.json()["version"], 1);
    let a = alice.commit("p", &lock, 0, &v1).await;
    assert_eq!((a.status, a.code()), (StatusCode::CONFLICT, "stale_base".into()));
    // Version 2 shares chunks with version 1.
    let v2 = version(2, 6, 0);
    assert_eq!(alice.upload_version("p", &lock, 1, &v2).await, 2);
    // Reading back.
    let versions = alice.get("/api/v1/parcels/p/versions").await.json();
    assert_eq!(versions.as_array().unwrap().len(), 2);
    assert_eq!(versions[0]["version"], 1);
    assert_eq!(versions[0]["client"], "test-client");
    assert_eq!(versions[0]["comment"], "version from base 0");
    assert_eq!(versions[1]["bytes_uploaded"], v2.chunks.iter().map(|(_, c)| c.len()).sum::<usize>());
    let head = alice.get("/api/v1/parcels/p/versions/head/manifest").await;
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(head.headers["x-isr-version"], "2");
    assert_eq!(head.headers["content-type"], "application/octet-stream");
    assert_eq!(&head.body[..], &v2.manifest[..]);
    let one = alice.get("/api/v1/parcels/p/versions/1/manifest").await;
    assert_eq!(&one.body[..], &v1.manifest[..]);
    assert_eq!(alice.get("/api/v1/parcels/p/versions/3/manifest").await.code(), "no_such_version");
    assert_eq!(alice.get("/api/v1/parcels/p/versions/x/manifest").await.code(), "no_such_version");
    let k = alice.get(&format!("/api/v1/parcels/p/keyrings/{}", v1.keyring_hash)).await;
    assert_eq!(&k.body[..], &v1.keyring[..]);
    assert_eq!(
        alice.get(&format!("/api/v1/parcels/p/keyrings/{}", Tag([9; 32]))).await.code(),
        "no_such_keyring"
    );
    // Password change on the client side: new wrapped keyroot.
    assert_eq!(
        alice.put_json("/api/v1/parcels/p/keyroot", json!({"wrapped_keyroot": "abcd"})).await.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(alice.get("/api/v1/parcels/p").await.json()["wrapped_keyroot"], "abcd");
    let check = isr_server::admin::check(&s.storage, true).await.unwrap();
    assert!(check.problems.is_empty(), "{:?}", check.problems);
    assert_eq!(check.chunks, 10);
    s.stop().await;
}

trait Dup {
    async fn create_raw_dup(&self, name: &str) -> String;
}
impl Dup for Api {
    async fn create_raw_dup(&self, name: &str) -> String {
        self.post_json(
            "/api/v1/parcels",
            json!({"name": name, "wrapped_keyroot": "00", "recovery_keyroot": "11", "holder": "h", "client_id": "zz"}),
        )
        .await
        .code()
    }
}

async fn chunk_uploads_are_verified_and_fetchable(backend: Backend) {
    let s = TestServer::start_on(backend).await;
    let alice = s.user("alice").await;
    let v = version(5, 4, 0);
    let (t0, c0) = &v.chunks[0];
    let (t1, c1) = &v.chunks[1];
    let a = alice.put_chunk(t0, c1).await;
    assert_eq!((a.status, a.code()), (StatusCode::BAD_REQUEST, "tag_mismatch".into()));
    assert_eq!(alice.get(&format!("/api/v1/chunks/{t0}")).await.code(), "no_such_chunk");
    assert_eq!(alice.put_chunk(t0, c0).await.status, StatusCode::CREATED);
    assert_eq!(alice.put_chunk(t0, c0).await.status, StatusCode::OK);
    let g = alice.get(&format!("/api/v1/chunks/{t0}")).await;
    assert_eq!((g.status, &g.body[..]), (StatusCode::OK, &c0[..]));
    // missing: request order, only the absent ones.
    let absent = Tag([0xab; 32]);
    assert_eq!(alice.missing(&[absent, *t0, *t1, absent]).await, vec![absent, *t1, absent]);
    // fetch: frames in request order, absent = 0xFFFFFFFF.
    let body: Vec<u8> = [*t1, *t0, absent].iter().flat_map(|t| t.0).collect();
    let f = alice.post_bytes("/api/v1/chunks/fetch", body).await;
    assert_eq!(f.status, StatusCode::OK);
    let b = &f.body[..];
    assert_eq!(&b[..4], &u32::MAX.to_le_bytes());
    let n = u32::from_le_bytes(b[4..8].try_into().unwrap()) as usize;
    assert_eq!(&b[8..8 + n], &c0[..]);
    assert_eq!(&b[8 + n..], &u32::MAX.to_le_bytes());
    let too_many: Vec<u8> = (0..257).flat_map(|_| t0.0).collect();
    assert_eq!(
        alice.post_bytes("/api/v1/chunks/fetch", too_many).await.status,
        StatusCode::PAYLOAD_TOO_LARGE
    );
    assert_eq!(alice.post_bytes("/api/v1/chunks/missing", vec![1; 33]).await.code(), "bad_request");
    // Thousands of tags in one round trip.
    let many: Vec<Tag> = (0..20_000u32)
        .map(|i| {
            let mut t = [0u8; 32];
            t[..4].copy_from_slice(&i.to_le_bytes());
            t[31] = 1;
            Tag(t)
        })
        .collect();
    assert_eq!(alice.missing(&many).await.len(), many.len());
    let m = String::from_utf8(alice.get("/metrics").await.body.to_vec()).unwrap();
    assert!(m.contains("isr_chunks_stored 1"), "{m}");
    assert!(m.contains(&format!("isr_store_bytes {}", c0.len())), "{m}");
    assert!(m.contains("isr_http_requests_total{route=\"/api/v1/chunks/{tag}\",status=\"201\"} 1"), "{m}");
    s.stop().await;
}

/// Sends a raw HTTP/1.1 chunk PUT: the head, then `body` (framed when `chunked`) and, only if `finish`,
/// the end of a chunked body. Returns the answer read off the socket. When the body is not finished the
/// server can answer only by refusing what it has, never by waiting for the rest (which never comes): a
/// server that waited would not answer before the deadline.
async fn raw_put(
    url: &str,
    token: &str,
    head_extra: &str,
    body: Vec<u8>,
    chunked: bool,
    finish: bool,
) -> String {
    let addr = url.strip_prefix("http://").unwrap();
    let sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = sock.into_split();
    let tag = Tag([0x42; 32]);
    let head = format!(
        "PUT /api/v1/chunks/{tag} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\ncontent-type: application/octet-stream\r\n{head_extra}\r\n"
    );
    wr.write_all(head.as_bytes()).await.unwrap();
    let writer = tokio::spawn(async move {
        for piece in body.chunks(64 * 1024) {
            let framed = if chunked {
                let mut framed = format!("{:x}\r\n", piece.len()).into_bytes();
                framed.extend_from_slice(piece);
                framed.extend_from_slice(b"\r\n");
                framed
            } else {
                piece.to_vec()
            };
            // The server may answer and close while this is still writing: not an error here.
            if wr.write_all(&framed).await.is_err() {
                return;
            }
        }
        if finish && chunked {
            let _ = wr.write_all(b"0\r\n\r\n").await;
        }
        std::future::pending::<()>().await;
    });
    // The whole answer: the head, then as many body bytes as it declares (or until the server closes).
    let mut answer = Vec::new();
    let read_answer = async {
        let mut buf = vec![0u8; 4096];
        loop {
            let n = rd.read(&mut buf).await.unwrap_or(0);
            answer.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&answer);
            if n == 0 {
                break;
            }
            if let Some(end) = text.find("\r\n\r\n") {
                let declared = text[..end]
                    .lines()
                    .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(str::to_owned))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                if answer.len() >= end + 4 + declared {
                    break;
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(180), read_answer)
        .await
        .expect("no answer: the server waited for body bytes past its limit");
    writer.abort();
    String::from_utf8_lossy(&answer).into_owned()
}

async fn oversized_chunk_bodies_are_refused_early(backend: Backend) {
    let s = TestServer::start_on(backend).await;
    let mut alice = Api::new(&s.url);
    let secret = s.add_user("alice").await;
    alice.login("alice", &secret).await;
    let token = alice.token.clone().unwrap();
    // Declared too large: refused from the header, with no body byte sent at all.
    let status =
        raw_put(&s.url, &token, &format!("content-length: {}\r\n", 1u64 << 40), Vec::new(), false, false)
            .await;
    assert!(status.starts_with("HTTP/1.1 413 "), "{status}");
    // Chunked, no length: refused once the stream passes the limit, though the body never ends.
    let body = vec![7u8; MAX_STORED + 128 * 1024];
    let status = raw_put(&s.url, &token, "transfer-encoding: chunked\r\n", body, true, false).await;
    assert!(status.starts_with("HTTP/1.1 413 "), "{status}");
    // Just over the limit: the JSON answer names the problem. (Read off the socket: a client still writing
    // the body when the server answers and closes may see a broken pipe before it reads the answer.)
    let answer = raw_put(
        &s.url,
        &token,
        &format!("content-length: {}\r\n", MAX_STORED + 1),
        vec![0; MAX_STORED + 1],
        false,
        true,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
    assert!(answer.contains(r#""code":"too_large""#), "{answer}");
    // The server still works.
    assert_eq!(alice.get("/api/v1/parcels").await.status, StatusCode::OK);
    s.stop().await;
}

async fn prune_and_gc_keep_what_versions_reference(backend: Backend) {
    let s = TestServer::start_on(backend).await;
    let alice = s.user("alice").await;
    let lock = alice.create("p", "c1").await;
    let vs: Vec<_> = (1..=4).map(|i| version(i, 5, 2)).collect();
    for (i, v) in vs.iter().enumerate() {
        alice.upload_version("p", &lock, i as u64, v).await;
    }
    // Stray uploads that no version references.
    let stray = version(99, 3, 0);
    for (t, c) in &stray.chunks {
        alice.put_chunk(t, c).await;
    }
    s.age_all_chunks(Duration::from_secs(7200)).await;
    let young = version(98, 2, 0);
    alice.put_chunk(&young.chunks[0].0, &young.chunks[0].1).await;
    let r = isr_server::admin::gc(&s.storage, Duration::from_secs(3600)).await.unwrap();
    assert_eq!(r.deleted, 2, "{r:?}");
    assert_eq!(r.spared_young, 1, "{r:?}");
    assert_eq!(alice.missing(&stray.tags()).await, stray.tags());
    assert!(alice.missing(&young.tags()).await.is_empty());
    for v in &vs {
        assert!(alice.missing(&v.tags()).await.is_empty());
    }
    // Prune to the newest two: versions 1 and 2 go, with the keyrings only they used.
    let st = s.storage.meta.prune("alice", "p", 2).await.unwrap();
    assert_eq!(st.versions_deleted, 2);
    assert_eq!(st.keyrings_deleted, 2);
    let versions = alice.get("/api/v1/parcels/p/versions").await.json();
    assert_eq!(
        versions.as_array().unwrap().iter().map(|v| v["version"].as_u64().unwrap()).collect::<Vec<_>>(),
        vec![3, 4]
    );
    assert_eq!(alice.get("/api/v1/parcels/p/versions/1/manifest").await.code(), "no_such_version");
    assert_eq!(
        alice.get(&format!("/api/v1/parcels/p/keyrings/{}", vs[0].keyring_hash)).await.code(),
        "no_such_keyring"
    );
    assert!(s.storage.meta.prune("alice", "p", 0).await.is_err());
    s.age_all_chunks(Duration::from_secs(7200)).await;
    let r = isr_server::admin::gc(&s.storage, Duration::from_secs(3600)).await.unwrap();
    // Versions 1 and 2 had 2 own chunks each, plus the young stray chunk (now old).
    assert_eq!(r.deleted, 2 * 2 + 1, "{r:?}");
    for v in &vs[2..] {
        assert!(alice.missing(&v.tags()).await.is_empty());
    }
    // Shared chunks survive.
    assert!(alice.missing(&vs[0].tags()[..2]).await.is_empty());
    assert_eq!(alice.missing(&vs[0].tags()[2..]).await.len(), 2);
    assert!(isr_server::admin::check(&s.storage, true).await.unwrap().problems.is_empty());
    // Removing the user frees everything at the next gc.
    s.storage.meta.remove_user("alice").await.unwrap();
    s.age_all_chunks(Duration::from_secs(7200)).await;
    let r = isr_server::admin::gc(&s.storage, Duration::from_secs(3600)).await.unwrap();
    assert_eq!(r.stored, r.deleted);
    // Her token dies within the servers' token cache lifetime.
    tokio::time::sleep(isr_server::auth::TOKEN_CACHE_TTL + Duration::from_millis(200)).await;
    assert_eq!(alice.get("/api/v1/parcels").await.status, StatusCode::UNAUTHORIZED);
    s.stop().await;
}

async fn commits_racing_gc_never_lose_chunks(backend: Backend) {
    let s = TestServer::start_on(backend).await;
    let alice = s.user("alice").await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // gc with no grace period at all: every unreferenced chunk is fair game, including uploads of commits
    // in progress. Commits must then see their chunks missing and re-upload, never commit without them.
    let gcs = {
        let (storage, stop) = (s.storage.clone(), stop.clone());
        tokio::spawn(async move {
            let mut runs = 0u32;
            let mut deleted = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) || runs < 3 {
                deleted += isr_server::admin::gc(&storage, Duration::ZERO).await.unwrap().deleted;
                runs += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (runs, deleted)
        })
    };
    let mut writers = Vec::new();
    for p in 0..4u64 {
        let alice = alice.clone();
        writers.push(tokio::spawn(async move {
            let name = format!("p{p}");
            let lock = alice.create(&name, &format!("c{p}")).await;
            let mut all = Vec::new();
            for i in 0..6u64 {
                let v = version(p * 100 + i, 6, 2);
                assert_eq!(alice.upload_version(&name, &lock, i, &v).await, i + 1);
                all.push(v);
            }
            all
        }));
    }
    let mut versions = Vec::new();
    for w in writers {
        versions.extend(w.await.unwrap());
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (runs, deleted) = gcs.await.unwrap();
    assert!(runs >= 3);
    eprintln!("{runs} gc runs deleted {deleted} chunks during the commits");
    let r = isr_server::admin::gc(&s.storage, Duration::ZERO).await.unwrap();
    let check = isr_server::admin::check(&s.storage, true).await.unwrap();
    assert!(check.problems.is_empty(), "{:?}", check.problems);
    for v in &versions {
        assert!(alice.missing(&v.tags()).await.is_empty());
    }
    assert_eq!(r.stored - r.deleted, check.chunks);
    s.stop().await;
}

fn mode_of(p: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn tls_init_makes_a_ca_that_the_client_trusts() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tls");
    let files = isr_server::tls::init(&out, &[]).unwrap();
    assert_eq!((mode_of(&out), mode_of(&files.key)), (0o700, 0o600));
    let again = isr_server::tls::init(&out, &[]).unwrap_err().to_string();
    assert!(again.contains("already exists"), "{again}");
    let tls = isr_server::load_tls(&files.cert, &files.key).unwrap();
    let storage = isr_server::Storage::open(
        &isr_server::StorageConfig::data_dir(dir.path().join("data")),
        isr_server::Deployment::Create,
    )
    .await
    .unwrap();
    let secret = isr_format::LoginSecret::random();
    isr_server::admin::add_user(&storage, "alice", &secret).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let pk = isr_format::RecoverySecretKey::random().public_key();
    let settings = isr_server::ServerSettings { recovery_pubkey: Some(pk), ..Default::default() };
    let state = isr_server::AppState::new(storage, settings);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(isr_server::run(listener, state, Some(tls), async {
        let _ = rx.await;
    }));
    // The real client, trusting ca.pem (what `isr --ca-cert DIR/ca.pem` does), by name and by address.
    let ca = std::fs::read(&files.ca_cert).unwrap();
    for host in ["localhost", "127.0.0.1"] {
        let url = format!("https://{host}:{port}");
        let client = isr_client::transport::Transport::new(&url, Some(&ca)).unwrap();
        let reply = client.login("alice", &secret.to_hex()).await.unwrap();
        assert_eq!(reply.recovery_pubkey, Some(pk.to_hex()), "{url}");
    }
    // Without the CA the certificate is not trusted.
    let untrusting =
        isr_client::transport::Transport::new(&format!("https://localhost:{port}"), None).unwrap();
    assert!(untrusting.login("alice", &secret.to_hex()).await.is_err());
    // Plain HTTP to the TLS port gets nothing useful.
    assert!(common::client().get(format!("http://127.0.0.1:{port}/metrics")).send().await.is_err());
    tx.send(()).unwrap();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn unreachable_or_malformed_backends_say_so() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = isr_server::StorageConfig {
        data: None,
        database: Some("postgres://isr@127.0.0.1:9/isr".into()),
        chunks: Some(dir.path().display().to_string()),
    };
    let e = isr_server::Storage::open(&cfg, isr_server::Deployment::MustExist).await.unwrap_err().to_string();
    assert!(e.contains("database"), "{e}");
    let cfg = isr_server::StorageConfig {
        data: Some(dir.path().into()),
        database: None,
        chunks: Some("s3://".into()),
    };
    let e = isr_server::Storage::open(&cfg, isr_server::Deployment::Create).await.unwrap_err().to_string();
    assert!(e.contains("s3://"), "{e}");
}

/// Chunk files: a PUT does not sync, a commit syncs (once, or twice when a chunk it needs was renamed after
/// the first sync began), and a commit whose chunks are missing is still refused. S3: `missing` answers from
/// the chunk index; `check` compares it with a listing and `check --repair` rebuilds it.
async fn commits_make_chunks_durable_and_missing_answers_from_the_right_place(backend: Backend) {
    let s = TestServer::start_on(backend).await;
    let chunks = &s.storage.chunks;
    let alice = s.user("alice").await;
    let lock = alice.create("p", "c1").await;
    let v1 = version(11, 6, 0);
    assert!(alice.put_keyring("p", &lock, &v1).await.status.is_success());
    let syncs_before_puts = chunks.syncs();
    let (last, all_but_last) = v1.chunks.split_last().unwrap();
    for (t, c) in all_but_last {
        assert_eq!(alice.put_chunk(t, c).await.status, StatusCode::CREATED);
    }
    assert_eq!(chunks.syncs(), syncs_before_puts, "a chunk PUT does not sync");
    let a = alice.commit("p", &lock, 0, &v1).await;
    assert_eq!((a.status, a.code()), (StatusCode::CONFLICT, "missing_chunks".into()));
    assert_eq!(alice.put_chunk(&last.0, &last.1).await.status, StatusCode::CREATED);
    let syncs_before_commit = chunks.syncs();
    assert_eq!(alice.commit("p", &lock, 0, &v1).await.status, StatusCode::CREATED);
    let synced = chunks.syncs() - syncs_before_commit;
    if backend == Backend::Embedded || backend == Backend::PgFs {
        assert!((1..=2).contains(&synced), "the commit synced the chunk files {synced} times");
        assert!(chunks.check_index(false).await.unwrap().is_none(), "no index for chunk files");
        s.stop().await;
        return;
    }
    assert_eq!(synced, 0, "S3 PUTs are durable when acknowledged");
    assert!(chunks.is_indexed());

    // A chunk removed behind the server's back: the index still says present; check finds it (the store is
    // listed), and the repair makes `missing` report it.
    let gone = v1.chunks[0].0;
    chunks.store().delete(&gone).await.unwrap();
    assert!(alice.missing(&[gone]).await.is_empty(), "missing answers from the index");
    let ix = chunks.check_index(false).await.unwrap().unwrap();
    assert_eq!(ix.stale, vec![gone]);
    let check = isr_server::admin::check(&s.storage, false).await.unwrap();
    assert!(check.problems.iter().any(|p| p.to_string().contains(&gone.to_hex())), "{:?}", check.problems);
    assert!(chunks.check_index(true).await.unwrap().unwrap().repaired);
    assert_eq!(alice.missing(&[gone]).await, vec![gone]);

    // A chunk in the bucket without a row (a crash between the object and its row, or a deployment older
    // than the index) is reported missing until the repair indexes it.
    let (extra, data) = version(12, 2, 0).chunks[0].clone();
    chunks.store().put(&extra, data.into()).await.unwrap();
    assert_eq!(alice.missing(&[extra]).await, vec![extra]);
    let ix = chunks.check_index(false).await.unwrap().unwrap();
    assert!(ix.unindexed.contains(&extra) && ix.stale.is_empty(), "{ix:?}");
    chunks.check_index(true).await.unwrap();
    assert!(alice.missing(&[extra, v1.chunks[1].0]).await.is_empty());
    s.stop().await;
}
