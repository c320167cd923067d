//! The conformance suite every storage engine must pass: generic functions over [`Engine`], one per
//! repository (plus change sets and the replay guard on top), run against SQLite by this crate's
//! tests and callable by any other engine's (`storage::conformance::run_all(&MyEngine).await`).
//! Each case asks the engine for fresh storage of its own, so cases never see each other's rows.
//!
//! Test support: the functions panic on the first broken guarantee (built only for tests or with
//! the `storage-conformance` feature).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use async_trait::async_trait;
use keyholder_protocol::wire::Collection;

use super::*;
use crate::audit::{AuditEvent, AuditFilter};

/// An engine under test.
#[async_trait]
pub trait Engine: Send + Sync {
    /// New, empty, migrated storage (its own database) and a name to reopen it by.
    async fn fresh(&self) -> (SharedStorage, String);
    /// The storage named `name` opened again, as a restarted process would (the caller closed and
    /// dropped the previous handle).
    async fn reopen(&self, name: &str) -> SharedStorage;
}

/// Runs every case.
pub async fn run_all(engine: &dyn Engine) {
    settings(engine).await;
    documents(engine).await;
    credentials(engine).await;
    concurrent_stores_keep_their_own_outcomes(engine).await;
    replay_marks(engine).await;
    replay_accept_once(engine).await;
    bind_codes(engine).await;
    key_ring(engine).await;
    egress(engine).await;
    policies(engine).await;
    usage_counts_are_exact_under_concurrency(engine).await;
    capped_uses_are_exact_under_concurrency(engine).await;
    approvals(engine).await;
    oauth_clients(engine).await;
    sign_configs(engine).await;
    audit(engine).await;
    change_sets(engine).await;
}

async fn fresh(engine: &dyn Engine) -> SharedStorage {
    engine.fresh().await.0
}

fn done(applied: Applied) -> Vec<bool> {
    match applied {
        Applied::Done { changed } => changed,
        Applied::CheckFailed(i) => panic!("check {i} failed"),
    }
}

/// Settings, the typed bound flag and the owner generation.
pub async fn settings(engine: &dyn Engine) {
    let s = fresh(engine).await;
    assert_eq!(s.setting(Setting::PublicUrl).await.unwrap(), None);
    assert!(!s.is_bound().await.unwrap());
    s.put_setting(Setting::PublicUrl, "https://a")
        .await
        .unwrap();
    s.put_setting(Setting::PublicUrl, "https://b")
        .await
        .unwrap();
    s.put_setting(Setting::Bound, "true").await.unwrap();
    assert!(s.is_bound().await.unwrap());
    assert_eq!(
        s.settings(&[Setting::PublicUrl, Setting::FrontendUrl, Setting::Bound])
            .await
            .unwrap(),
        vec![Some("https://b".into()), None, Some("true".into())]
    );
    assert_eq!(s.owner_generation().await.unwrap(), 0);
    assert_eq!(s.bump_owner_generation().await.unwrap(), 1);
    assert_eq!(s.bump_owner_generation().await.unwrap(), 2);
    assert_eq!(s.owner_generation().await.unwrap(), 2);
    assert!(s.housekeeping_turn("replay-purge").await.is_ok());
    let snapshot = s.key_ring_snapshot().await.unwrap();
    assert_eq!(snapshot.setting(Setting::PublicUrl), Some("https://b"));
    assert_eq!(snapshot.setting(Setting::OwnerGeneration), Some("2"));
}

/// Documents: upsert, read, list order, paging, scans, counts, delete, compare-and-swap.
pub async fn documents(engine: &dyn Engine) {
    let s = fresh(engine).await;
    let c = Collection::ProxyConfigs;
    assert_eq!(s.document(c, "b").await.unwrap(), None);
    for key in ["b", "a", "c"] {
        s.put_document(c, key, &format!("{{\"k\":\"{key}\"}}"), 1)
            .await
            .unwrap();
    }
    s.put_document(c, "b", "{\"k\":\"b2\"}", 2).await.unwrap();
    s.put_document(Collection::Tokens, "t", "{\"x\":\"kh1:1:zz\"}", 1)
        .await
        .unwrap();
    assert_eq!(
        s.document(c, "b").await.unwrap().as_deref(),
        Some("{\"k\":\"b2\"}")
    );
    let keys: Vec<String> = s
        .documents(c)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.key)
        .collect();
    assert_eq!(keys, ["a", "b", "c"], "key order");
    let page = s.documents_after(c, "a", 1).await.unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].key, "b");
    assert_eq!(s.count_documents(Some(c)).await.unwrap(), 3);
    assert_eq!(s.count_documents(None).await.unwrap(), 4);
    let found = s.scan_documents("kh1:").await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(
        (found[0].collection, found[0].key.as_str()),
        (Collection::Tokens, "t")
    );
    // A needle's wildcard characters match only themselves.
    assert!(s.scan_documents("k_1%").await.unwrap().is_empty());
    assert_eq!(s.scan_documents("").await.unwrap().len(), 4);
    s.delete_document(c, "a").await.unwrap();
    s.delete_document(c, "missing").await.unwrap();
    assert_eq!(s.document(c, "a").await.unwrap(), None);
    let swap = |expected: &str, doc: &str, version: Option<u32>| DocumentSwap {
        collection: c,
        key: "b".into(),
        expected: expected.into(),
        doc: doc.into(),
        now: 3,
        data_version: version,
    };
    assert_eq!(
        s.swap_document(swap("{}", "{\"n\":1}", None))
            .await
            .unwrap(),
        SwapOutcome::Changed
    );
    assert_eq!(
        s.swap_document(swap("{\"k\":\"b2\"}", "{\"n\":1}", None))
            .await
            .unwrap(),
        SwapOutcome::Swapped
    );
    assert_eq!(
        s.document(c, "b").await.unwrap().as_deref(),
        Some("{\"n\":1}")
    );
    s.put_setting(Setting::DataVersion, "2").await.unwrap();
    assert_eq!(
        s.swap_document(swap("{\"n\":1}", "{\"n\":2}", Some(1)))
            .await
            .unwrap(),
        SwapOutcome::KeyRingChanged
    );
    assert_eq!(
        s.swap_document(swap("{\"n\":1}", "{\"n\":2}", Some(2)))
            .await
            .unwrap(),
        SwapOutcome::Swapped
    );
}

/// Concurrent credential stores (which an engine may commit together) each keep the outcome
/// they would have alone: one create-only write of a service is stored, the others find it; a
/// write sealed under an old key version is refused; every other service is stored.
pub async fn concurrent_stores_keep_their_own_outcomes(engine: &dyn Engine) {
    let s = fresh(engine).await;
    s.put_setting(Setting::DataVersion, "2").await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..48u32 {
        let s = Arc::clone(&s);
        tasks.push(tokio::spawn(async move {
            let (service, create_only, version) = match i % 3 {
                0 => ("same".to_string(), true, 2),
                1 => (format!("svc{i}"), false, 2),
                _ => (format!("old{i}"), false, 1),
            };
            let write = CredentialDocument {
                service,
                doc: format!("{{\"i\":{i}}}"),
                data_version: version,
                create_only,
                now: 5,
            };
            (i, s.store_credential(write).await.unwrap())
        }));
    }
    let mut stored_same = Vec::new();
    for task in tasks {
        let (i, outcome) = task.await.unwrap();
        match i % 3 {
            0 if outcome == CredentialWrite::Stored => stored_same.push(i),
            0 => assert_eq!(outcome, CredentialWrite::AlreadyExists),
            1 => assert_eq!(outcome, CredentialWrite::Stored),
            _ => assert_eq!(outcome, CredentialWrite::KeyRingChanged),
        }
    }
    assert_eq!(
        stored_same.len(),
        1,
        "one create-only write wins: {stored_same:?}"
    );
    assert_eq!(
        s.document(Collection::Tokens, "same")
            .await
            .unwrap()
            .as_deref(),
        Some(format!("{{\"i\":{}}}", stored_same[0]).as_str()),
        "the winner's document is the one stored"
    );
    assert_eq!(
        s.count_documents(Some(Collection::Tokens)).await.unwrap(),
        17,
        "16 services and the one create-only"
    );
}

/// Sealed credential writes: the data-version check, create-only, the legacy-minting mark.
pub async fn credentials(engine: &dyn Engine) {
    let s = fresh(engine).await;
    s.put_setting(Setting::DataVersion, "3").await.unwrap();
    let write = |version: u32, create_only: bool, doc: &str| CredentialDocument {
        service: "gh".into(),
        doc: doc.into(),
        data_version: version,
        create_only,
        now: 5,
    };
    assert_eq!(
        s.store_credential(write(2, false, "{}")).await.unwrap(),
        CredentialWrite::KeyRingChanged
    );
    assert_eq!(s.document(Collection::Tokens, "gh").await.unwrap(), None);
    s.apply(ChangeSet::default().write(Write::MarkLegacyMinting("gh".into())))
        .await
        .unwrap();
    assert!(s.is_legacy_minting("gh").await.unwrap());
    assert_eq!(
        s.store_credential(write(3, true, "{\"v\":1}"))
            .await
            .unwrap(),
        CredentialWrite::Stored
    );
    assert!(
        !s.is_legacy_minting("gh").await.unwrap(),
        "a fresh store clears the mark"
    );
    assert_eq!(
        s.store_credential(write(3, true, "{\"v\":2}"))
            .await
            .unwrap(),
        CredentialWrite::AlreadyExists
    );
    assert_eq!(
        s.store_credential(write(3, false, "{\"v\":3}"))
            .await
            .unwrap(),
        CredentialWrite::Stored
    );
    assert_eq!(
        s.document(Collection::Tokens, "gh")
            .await
            .unwrap()
            .as_deref(),
        Some("{\"v\":3}")
    );
}

/// Replay marks: durable once the commit resolves, loaded after a restart until their expiry,
/// expired ones neither loaded nor kept by the purge.
pub async fn replay_marks(engine: &dyn Engine) {
    let (s, name) = engine.fresh().await;
    let now = crate::clock::now_unix();
    let live = [
        Mark {
            kind: ReplayKind::Nonce,
            key: 1,
            expires_at: now + 300,
        },
        Mark {
            kind: ReplayKind::RequestId,
            key: 2,
            expires_at: now + 5_000,
        },
        Mark {
            kind: ReplayKind::Signature,
            key: 3,
            expires_at: i64::MAX,
        },
    ];
    let past = Mark {
        kind: ReplayKind::EnvelopeNonce,
        key: 4,
        expires_at: now - 600,
    };
    assert_eq!(
        s.append_marks(live.to_vec()).await.unwrap(),
        MarkVerdict::Fresh
    );
    assert_eq!(
        s.append_marks(vec![past]).await.unwrap(),
        MarkVerdict::Fresh
    );
    s.close();
    drop(s);
    let s = engine.reopen(&name).await;
    let loaded = s.load_marks(now).await.unwrap();
    for mark in live {
        assert!(
            loaded
                .iter()
                .any(|l| l.kind == mark.kind && l.key == mark.key && l.until >= mark.expires_at),
            "{mark:?} survives a restart: {loaded:?}"
        );
    }
    assert!(
        !loaded.iter().any(|l| l.key == past.key),
        "an expired mark is not loaded"
    );
    assert!(s.drop_expired_marks(now).await.unwrap() >= 1);
    let again = s.load_marks(now).await.unwrap();
    assert_eq!(again.len(), live.len(), "live marks stay: {again:?}");
    if !s.verdict_is_local() {
        // A shared engine decides: the same mark again is refused, and none of its batch kept.
        let fresh_one = Mark {
            kind: ReplayKind::Nonce,
            key: 77,
            expires_at: now + 300,
        };
        assert_eq!(
            s.append_marks(vec![fresh_one, live[0]]).await.unwrap(),
            MarkVerdict::Replayed(1)
        );
        assert_eq!(
            s.append_marks(vec![fresh_one]).await.unwrap(),
            MarkVerdict::Fresh
        );
    }
}

/// Accept-once through the domain's guard on this engine: of many concurrent uses of one id
/// exactly one is fresh, also after a restart.
pub async fn replay_accept_once(engine: &dyn Engine) {
    use crate::vault::replay::{ReplayGuard, Seen};
    let (s, name) = engine.fresh().await;
    let guard = Arc::new(ReplayGuard::load(Arc::clone(&s)).await.unwrap());
    let later = crate::clock::now_unix() + 300;
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let guard = Arc::clone(&guard);
            tokio::spawn(async move { guard.remember(ReplayKind::Nonce, "n-1", later).await })
        })
        .collect();
    let mut fresh_count = 0;
    for task in tasks {
        if task.await.unwrap().unwrap() == Seen::Fresh {
            fresh_count += 1;
        }
    }
    assert_eq!(fresh_count, 1, "accepted exactly once");
    drop(guard);
    s.close();
    drop(s);
    let s = engine.reopen(&name).await;
    let guard = ReplayGuard::load(s).await.unwrap();
    assert_eq!(
        guard
            .remember(ReplayKind::Nonce, "n-1", later)
            .await
            .unwrap(),
        Seen::Replayed,
        "refused after a restart"
    );
    assert_eq!(
        guard
            .remember(ReplayKind::RequestId, "n-1", later)
            .await
            .unwrap(),
        Seen::Fresh,
        "kinds are separate"
    );
}

fn code(hash: &str, now: i64, rebind: bool) -> BindCode {
    BindCode {
        code_hash: hash.into(),
        created_at: now,
        expires_at: now + 600,
        used_at: None,
        rebind,
        hmac_hash: "hh".into(),
        pending_secret: None,
        platform_key: None,
    }
}

fn key(kind: &str, version: u32, byte: u8) -> WrappedKey {
    WrappedKey {
        kind: kind.into(),
        version,
        wrapped: vec![byte; 40],
        created_at: 1,
    }
}

/// Bind codes: stored by hash, used once (also when exchanged concurrently), refusals.
pub async fn bind_codes(engine: &dyn Engine) {
    let s = fresh(engine).await;
    let now = crate::clock::now_unix();
    s.put_setting(Setting::MasterCheck, "mc").await.unwrap();
    let mut pending = code("pending", now, true);
    pending.pending_secret = Some(vec![9; 48]);
    s.insert_bind_code(
        code("c1", now, false),
        now - 86_400,
        "https://kh",
        "https://fe",
    )
    .await
    .unwrap();
    s.insert_bind_code(pending, now - 86_400, "https://kh", "https://fe")
        .await
        .unwrap();
    let mut old = code("old", now - 200_000, false);
    old.expires_at = now - 100_000;
    s.insert_bind_code(old, now - 200_000 - 86_400, "https://kh", "https://fe")
        .await
        .unwrap();
    // The next code forgets long-dead ones.
    s.insert_bind_code(
        code("c2", now, false),
        now - 86_400,
        "https://kh",
        "https://fe",
    )
    .await
    .unwrap();
    assert_eq!(s.bind_code("old").await.unwrap(), None);
    assert_eq!(
        s.bind_code("c1").await.unwrap(),
        Some(code("c1", now, false))
    );
    assert_eq!(
        s.settings(&[Setting::PublicUrl, Setting::FrontendUrl])
            .await
            .unwrap(),
        vec![Some("https://kh".into()), Some("https://fe".into())]
    );
    assert_eq!(
        s.pending_secrets().await.unwrap(),
        vec![("pending".to_string(), vec![9; 48])]
    );
    let exchange = |hash: &str, check: &str, install: ExchangeInstall| Exchange {
        code_hash: hash.into(),
        now,
        bound_in_memory: false,
        master_check: check.into(),
        install,
    };
    assert_eq!(
        s.exchange(exchange("nope", "mc", ExchangeInstall::KeepHmac))
            .await
            .unwrap(),
        ExchangeOutcome::Expired
    );
    assert_eq!(
        s.exchange(exchange("c1", "other", ExchangeInstall::KeepHmac))
            .await
            .unwrap(),
        ExchangeOutcome::MasterKeyChanged
    );
    assert_eq!(
        s.bind_code("c1").await.unwrap().unwrap().used_at,
        None,
        "a refused exchange leaves the code usable"
    );
    // Concurrent exchanges of one code: exactly one binds.
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let s = Arc::clone(&s);
            let ex = exchange("c1", "mc", ExchangeInstall::KeepHmac);
            tokio::spawn(async move { s.exchange(ex).await.unwrap() })
        })
        .collect();
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.unwrap());
    }
    assert_eq!(
        outcomes
            .iter()
            .filter(|o| **o == ExchangeOutcome::Exchanged)
            .count(),
        1,
        "{outcomes:?}"
    );
    assert!(outcomes
        .iter()
        .all(|o| matches!(o, ExchangeOutcome::Exchanged | ExchangeOutcome::Used)));
    assert!(s.is_bound().await.unwrap());
    assert_eq!(
        s.setting(Setting::PlatformScheme).await.unwrap().as_deref(),
        Some("hmac")
    );
    // Bound now: a plain code is refused and used up.
    assert_eq!(
        s.exchange(exchange("c2", "mc", ExchangeInstall::KeepHmac))
            .await
            .unwrap(),
        ExchangeOutcome::AlreadyBound
    );
    assert!(s.bind_code("c2").await.unwrap().unwrap().used_at.is_some());
    // A re-bind code installs its secret as the next version only.
    s.apply(ChangeSet::default().write(Write::PutKey(key("hmac", 1, 1))))
        .await
        .unwrap();
    let install = |version: u32| ExchangeInstall::NewHmac {
        key: key("hmac", version, 2),
        hash: "new-hash".into(),
    };
    assert_eq!(
        s.exchange(exchange("pending", "mc", install(5)))
            .await
            .unwrap(),
        ExchangeOutcome::KeyRingChanged
    );
    assert_eq!(
        s.exchange(exchange("pending", "mc", install(2)))
            .await
            .unwrap(),
        ExchangeOutcome::Exchanged
    );
    assert_eq!(s.latest_key_version("hmac").await.unwrap(), 2);
    assert_eq!(
        s.wrapped_key("hmac", 1).await.unwrap(),
        None,
        "old secrets go"
    );
    assert!(s.pending_secrets().await.unwrap().is_empty());
    assert_eq!(
        s.settings(&[Setting::HmacVersion, Setting::HmacHash])
            .await
            .unwrap(),
        vec![Some("2".into()), Some("new-hash".into())]
    );
    // An asymmetric re-bind: the platform key becomes the only one.
    let mut asym = code("asym", now, true);
    asym.platform_key = Some(vec![3; 32]);
    s.insert_bind_code(asym, now - 86_400, "https://kh", "https://fe")
        .await
        .unwrap();
    let platform_key = StoredPlatformKey {
        key_id: "k1".into(),
        public_key: vec![3; 32],
        added_at: now,
    };
    assert_eq!(
        s.exchange(exchange(
            "asym",
            "mc",
            ExchangeInstall::Ed25519 {
                platform_key: platform_key.clone(),
                key: key("hmac", 3, 4),
                hash: "h3".into(),
            }
        ))
        .await
        .unwrap(),
        ExchangeOutcome::Exchanged
    );
    assert_eq!(s.platform_keys().await.unwrap(), vec![platform_key]);
    assert_eq!(
        s.setting(Setting::PlatformScheme).await.unwrap().as_deref(),
        Some("ed25519")
    );
}

/// The key ring: versions per kind, snapshots, imported fields.
pub async fn key_ring(engine: &dyn Engine) {
    let s = fresh(engine).await;
    assert_eq!(s.latest_key_version("data").await.unwrap(), 0);
    let change = ChangeSet::default()
        .check(Check::LatestKeyVersion("data".into(), 0))
        .write(Write::PutKey(key("data", 1, 1)))
        .write(Write::PutKey(key("data", 2, 2)))
        .write(Write::PutKey(key("identity", 1, 3)))
        .write(Write::PutSetting(Setting::DataVersion, "2".into()))
        .write(Write::RecordImportedField(ImportedField {
            digest: [7; 32],
            service: "svc".into(),
            field: "accessToken".into(),
        }));
    done(s.apply(change).await.unwrap());
    // The version moved: a change checked against the old one writes nothing.
    let stale = ChangeSet::default()
        .check(Check::LatestKeyVersion("data".into(), 0))
        .write(Write::PutKey(key("data", 3, 9)));
    assert_eq!(s.apply(stale).await.unwrap(), Applied::CheckFailed(0));
    assert_eq!(s.latest_key_version("data").await.unwrap(), 2);
    let keys = s.wrapped_keys().await.unwrap();
    let order: Vec<(String, u32)> = keys.iter().map(|k| (k.kind.clone(), k.version)).collect();
    assert_eq!(
        order,
        [
            ("data".into(), 1),
            ("data".into(), 2),
            ("identity".into(), 1)
        ]
    );
    assert_eq!(
        s.wrapped_key("data", 2).await.unwrap(),
        Some(key("data", 2, 2))
    );
    // A re-wrap replaces the value in place.
    done(
        s.apply(ChangeSet::default().write(Write::PutKey(key("data", 2, 8))))
            .await
            .unwrap(),
    );
    assert_eq!(
        s.wrapped_key("data", 2).await.unwrap().unwrap().wrapped,
        vec![8; 40]
    );
    let snapshot = s.key_ring_snapshot().await.unwrap();
    assert_eq!(snapshot.setting(Setting::DataVersion), Some("2"));
    assert_eq!(snapshot.keys.len(), 3);
    assert!(snapshot.key("identity", 1).is_some());
    assert_eq!(snapshot.imported.len(), 1);
    assert_eq!(s.imported_fields().await.unwrap(), snapshot.imported);
    done(
        s.apply(
            ChangeSet::default()
                .write(Write::DeleteKeysBelow("data".into(), 2))
                .write(Write::ClearImportedFields),
        )
        .await
        .unwrap(),
    );
    assert_eq!(s.wrapped_key("data", 1).await.unwrap(), None);
    assert!(s.imported_fields().await.unwrap().is_empty());
    done(
        s.apply(
            ChangeSet::default()
                .write(Write::DeleteKey("data".into(), 2))
                .write(Write::DeleteKeysOfKind("identity".into())),
        )
        .await
        .unwrap(),
    );
    assert!(s.wrapped_keys().await.unwrap().is_empty());
}

/// Egress: policy rows, pins (pinned mode, a stored credential, a bound), token URL pins,
/// refusals.
pub async fn egress(engine: &dyn Engine) {
    let s = fresh(engine).await;
    assert_eq!(s.egress_policy("svc").await.unwrap(), (None, Vec::new()));
    assert!(!s
        .claim_pin("svc", "v1:a", "https://a:443", 1, 2)
        .await
        .unwrap());
    let row = |mode: &str| EgressRow {
        service: "svc".into(),
        mode: mode.into(),
        allowlist: vec!["https://x:443".into(), "*.y.example".into()],
        token_url: None,
    };
    done(
        s.apply(ChangeSet::default().write(Write::PutEgressPolicy(row("pinned"), 1)))
            .await
            .unwrap(),
    );
    assert!(
        !s.claim_pin("svc", "v1:a", "https://a:443", 1, 2)
            .await
            .unwrap(),
        "no credential stored"
    );
    s.put_document(Collection::Tokens, "svc", "{}", 1)
        .await
        .unwrap();
    assert!(s
        .claim_pin("svc", "v1:a", "https://a:443", 1, 2)
        .await
        .unwrap());
    assert!(!s
        .claim_pin("svc", "v1:a", "https://b:443", 2, 2)
        .await
        .unwrap());
    assert!(s
        .claim_pin("svc", "v1:b", "https://b:443", 2, 2)
        .await
        .unwrap());
    assert!(
        !s.claim_pin("svc", "v1:c", "https://c:443", 3, 2)
            .await
            .unwrap(),
        "bounded"
    );
    let (stored, pins) = s.egress_policy("svc").await.unwrap();
    assert_eq!(stored, Some(row("pinned")));
    assert_eq!(pins.len(), 2);
    assert_eq!(pins[0].origin, "https://b:443", "newest first");
    s.release_pin("svc", "v1:b", "https://other:443")
        .await
        .unwrap();
    assert_eq!(s.egress_policy("svc").await.unwrap().1.len(), 2);
    s.release_pin("svc", "v1:b", "https://b:443").await.unwrap();
    assert_eq!(s.egress_policy("svc").await.unwrap().1.len(), 1);
    assert_eq!(
        s.claim_token_url("svc", "https://t/token", 4)
            .await
            .unwrap(),
        (true, Some("https://t/token".into()))
    );
    assert_eq!(
        s.claim_token_url("svc", "https://evil/token", 5)
            .await
            .unwrap(),
        (false, Some("https://t/token".into()))
    );
    s.release_token_url("svc", "https://evil/token")
        .await
        .unwrap();
    assert_eq!(
        s.egress_policy("svc")
            .await
            .unwrap()
            .0
            .unwrap()
            .token_url
            .as_deref(),
        Some("https://t/token")
    );
    s.release_token_url("svc", "https://t/token").await.unwrap();
    assert_eq!(
        s.egress_policy("svc").await.unwrap().0.unwrap().token_url,
        None
    );
    // A token URL claim on a service without a row makes the default one.
    assert_eq!(
        s.claim_token_url("fresh", "https://t/token", 6)
            .await
            .unwrap(),
        (true, Some("https://t/token".into()))
    );
    assert_eq!(
        s.egress_policy("fresh").await.unwrap().0.unwrap().mode,
        "known"
    );
    assert_eq!(s.egress_services().await.unwrap(), ["fresh", "svc"]);
    for (origin, at) in [
        ("https://r1:443", 10),
        ("https://r2:443", 11),
        ("https://r1:443", 12),
    ] {
        s.record_refusal("svc", origin, at, 2).await.unwrap();
    }
    s.record_refusal("svc", "https://r3:443", 13, 2)
        .await
        .unwrap();
    let refusals = s.refusals().await.unwrap();
    assert_eq!(refusals.len(), 2, "at most max_pending pairs");
    assert_eq!(
        (
            refusals[0].origin.as_str(),
            refusals[0].count,
            refusals[0].last_at
        ),
        ("https://r1:443", 2, 12),
        "most recent first"
    );
    done(
        s.apply(
            ChangeSet::default()
                .write(Write::DeleteRefusal("svc".into(), "https://r1:443".into()))
                .write(Write::DeleteEgressPins("svc".into()))
                .write(Write::DeleteEgressPolicy("svc".into())),
        )
        .await
        .unwrap(),
    );
    assert_eq!(s.refusals().await.unwrap().len(), 1);
    assert_eq!(s.egress_policy("svc").await.unwrap(), (None, Vec::new()));
}

fn counter(policy: &str, target: &str) -> UsageCounter {
    UsageCounter {
        policy: policy.into(),
        target: target.into(),
        period: "day:1".into(),
    }
}

/// Policies and attachments in one snapshot; usage counts added and given back.
pub async fn policies(engine: &dyn Engine) {
    let s = fresh(engine).await;
    let policy = |name: &str, source: &str| PolicyRow {
        name: name.into(),
        rules: "{}".into(),
        source: source.into(),
    };
    let attachment = |name: &str, target: &str, source: &str| AttachmentRow {
        policy: name.into(),
        kind: "service".into(),
        target: target.into(),
        source: source.into(),
    };
    let create = ChangeSet::default()
        .check(Check::PolicyExists("p".into(), false))
        .write(Write::PutPolicy(policy("p", "cli"), 1))
        .write(Write::PutPolicy(policy("f", "file"), 1))
        .write(Write::Attach(attachment("p", "gh", "cli")))
        .write(Write::Attach(attachment("p", "gh", "cli")))
        .write(Write::ReplaceAttachment(attachment("f", "gh", "file")));
    assert_eq!(
        done(s.apply(create.clone()).await.unwrap()),
        [true, true, true, false, true],
        "the second attach changes nothing"
    );
    assert_eq!(s.apply(create).await.unwrap(), Applied::CheckFailed(0));
    assert_eq!(
        s.add_usage(vec![(counter("p", "gh"), 2), (counter("p", "x"), 1)])
            .await
            .unwrap(),
        [2, 1]
    );
    assert_eq!(
        s.add_usage(vec![(counter("p", "gh"), 3)]).await.unwrap(),
        [5]
    );
    s.release_usage(vec![
        counter("p", "x"),
        counter("p", "x"),
        counter("p", "none"),
    ])
    .await
    .unwrap();
    let snapshot = s.policy_snapshot().await.unwrap();
    assert_eq!(
        snapshot.policies,
        vec![policy("f", "file"), policy("p", "cli")]
    );
    assert_eq!(
        snapshot.attachments,
        vec![attachment("f", "gh", "file"), attachment("p", "gh", "cli")]
    );
    let mut usage = snapshot.usage.clone();
    usage.sort();
    assert_eq!(usage, vec![(counter("p", "gh"), 5), (counter("p", "x"), 0)]);
    assert_eq!(
        s.usage_of("p").await.unwrap(),
        vec![
            ("gh".to_string(), "day:1".to_string(), 5),
            ("x".to_string(), "day:1".to_string(), 0)
        ]
    );
    let detach = ChangeSet::default()
        .check(Check::AttachmentIs(
            "p".into(),
            "service".into(),
            "gh".into(),
            true,
        ))
        .write(Write::Detach("p".into(), "service".into(), "gh".into()))
        .write(Write::DeleteAttachmentsOf("file".into()))
        .write(Write::DeletePolicy("p".into()));
    assert_eq!(
        done(s.apply(detach.clone()).await.unwrap()),
        [true, true, true]
    );
    assert_eq!(s.apply(detach).await.unwrap(), Applied::CheckFailed(0));
    let snapshot = s.policy_snapshot().await.unwrap();
    assert_eq!(snapshot.policies, vec![policy("f", "file")]);
    assert!(snapshot.attachments.is_empty());
    assert!(snapshot.usage.is_empty(), "a deleted policy's counts go");
}

/// Usage counts are added in storage: concurrent adds lose nothing.
pub async fn usage_counts_are_exact_under_concurrency(engine: &dyn Engine) {
    let s = fresh(engine).await;
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let s = Arc::clone(&s);
            tokio::spawn(async move {
                s.add_usage(vec![
                    (counter("cap", "gh"), 1),
                    (counter("cap", &format!("t{}", i % 4)), 1),
                ])
                .await
                .unwrap()
            })
        })
        .collect();
    let mut seen = Vec::new();
    for task in tasks {
        seen.push(task.await.unwrap()[0]);
    }
    seen.sort_unstable();
    assert_eq!(
        seen,
        (1..=64).collect::<Vec<u64>>(),
        "each add sees its own count"
    );
    let usage = s.usage_of("cap").await.unwrap();
    assert_eq!(usage[0], ("gh".to_string(), "day:1".to_string(), 64));
    assert!(usage[1..].iter().all(|(_, _, n)| *n == 16), "{usage:?}");
}

/// Capped uses are taken in storage, all or none per use: concurrent takes never pass a cap.
pub async fn capped_uses_are_exact_under_concurrency(engine: &dyn Engine) {
    let s = fresh(engine).await;
    // A use whose second counter is full takes nothing from its first; one that fits is taken.
    s.add_usage(vec![(counter("cap", "full"), 2)])
        .await
        .unwrap();
    let taken = s
        .take_capped_uses(vec![
            vec![(counter("cap", "a"), 5), (counter("cap", "full"), 2)],
            vec![(counter("cap", "a"), 5)],
            vec![],
        ])
        .await
        .unwrap();
    assert_eq!(taken, [Some(1), None, None]);
    let usage = s.usage_of("cap").await.unwrap();
    assert_eq!(
        usage,
        vec![
            ("a".to_string(), "day:1".to_string(), 1),
            ("full".to_string(), "day:1".to_string(), 2)
        ]
    );
    // 64 concurrent single-use calls and 8 batches of 8 against a cap of 10: exactly 10 taken.
    let mut tasks = Vec::new();
    for i in 0..64 {
        let s = Arc::clone(&s);
        tasks.push(tokio::spawn(async move {
            let one = vec![
                (counter("cap", "gh"), 10),
                (counter("cap", &format!("t{}", i % 4)), 100),
            ];
            (true, s.take_capped_uses(vec![one]).await.unwrap())
        }));
    }
    for _ in 0..8 {
        let s = Arc::clone(&s);
        tasks.push(tokio::spawn(async move {
            let batch = vec![vec![(counter("cap", "gh"), 10)]; 8];
            (false, s.take_capped_uses(batch).await.unwrap())
        }));
    }
    let (mut granted, mut refused, mut singles) = (0, 0, 0);
    for task in tasks {
        let (single, taken) = task.await.unwrap();
        for taken in taken {
            match taken {
                None => {
                    granted += 1;
                    singles += u64::from(single);
                }
                Some(at) => {
                    assert_eq!(at, 0, "the capped counter is the full one");
                    refused += 1;
                }
            }
        }
    }
    assert_eq!((granted, refused), (10, 118));
    let usage = s.usage_of("cap").await.unwrap();
    let gh = usage.iter().find(|(t, _, _)| t == "gh").unwrap();
    assert_eq!(gh.2, 10, "{usage:?}");
    let others: u64 = usage
        .iter()
        .filter(|(t, _, _)| t.starts_with('t'))
        .map(|(_, _, n)| n)
        .sum();
    assert_eq!(others, singles, "a refused use took nothing: {usage:?}");
}

/// Approvals: held, listed, decided once, timed out.
pub async fn approvals(engine: &dyn Engine) {
    let s = fresh(engine).await;
    let now = crate::clock::now_unix();
    let row = |id: &str, created: i64| ApprovalRow {
        id: id.into(),
        policy: "p".into(),
        service: "gh".into(),
        agent: "a".into(),
        client: "127.0.0.1".into(),
        endpoint: "/v1/credential".into(),
        created_at: created,
        expires_at: now + 60,
    };
    s.insert_approval(row("apr_2", now), [2; 32]).await.unwrap();
    s.insert_approval(row("apr_1", now - 1), [1; 32])
        .await
        .unwrap();
    s.insert_approval(row("apr_3", now), [3; 32]).await.unwrap();
    let pending: Vec<String> = s
        .pending_approvals(now)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(pending, ["apr_1", "apr_2", "apr_3"], "oldest first");
    assert_eq!(
        s.pending_approval("apr_2", now).await.unwrap(),
        Some((row("apr_2", now), [2; 32]))
    );
    assert!(
        s.pending_approvals(now + 61).await.unwrap().is_empty(),
        "expired"
    );
    assert!(s.decide_approval("apr_2", true, now).await.unwrap());
    assert!(
        !s.decide_approval("apr_2", false, now).await.unwrap(),
        "decided once"
    );
    assert_eq!(s.pending_approval("apr_2", now).await.unwrap(), None);
    assert_eq!(
        s.time_out_approval("apr_2", now).await.unwrap(),
        ApprovalDecision::Approved,
        "a decision stands"
    );
    assert_eq!(
        s.time_out_approval("apr_3", now).await.unwrap(),
        ApprovalDecision::TimedOut
    );
    let change = ChangeSet::default()
        .check(Check::ApprovalPending("apr_1".into(), now))
        .write(Write::DecideApproval {
            id: "apr_1".into(),
            approve: false,
            now,
        });
    done(s.apply(change.clone()).await.unwrap());
    assert_eq!(s.apply(change).await.unwrap(), Applied::CheckFailed(0));
    let mut decisions = s
        .approval_decisions(&[
            "apr_1".into(),
            "apr_2".into(),
            "apr_3".into(),
            "apr_9".into(),
        ])
        .await
        .unwrap();
    decisions.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        decisions,
        vec![
            ("apr_1".to_string(), ApprovalDecision::Denied),
            ("apr_2".to_string(), ApprovalDecision::Approved),
            ("apr_3".to_string(), ApprovalDecision::TimedOut),
        ]
    );
}

/// OAuth clients.
pub async fn oauth_clients(engine: &dyn Engine) {
    let s = fresh(engine).await;
    let row = |name: &str, url: &str| OAuthClientRow {
        name: name.into(),
        token_url: url.into(),
        client_id: "cid".into(),
        wrapped_secret: vec![5; 30],
        updated_at: 1,
    };
    assert_eq!(s.oauth_client("google").await.unwrap(), None);
    done(
        s.apply(
            ChangeSet::default()
                .write(Write::PutOAuthClient(row("google", "https://a")))
                .write(Write::PutOAuthClient(row("azure", "https://b")))
                .write(Write::PutOAuthClient(row("google", "https://c"))),
        )
        .await
        .unwrap(),
    );
    assert_eq!(
        s.oauth_client("google").await.unwrap(),
        Some(row("google", "https://c"))
    );
    let names: Vec<String> = s
        .oauth_clients()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(names, ["azure", "google"]);
    let removed = s
        .apply(
            ChangeSet::default()
                .write(Write::RemoveOAuthClient("azure".into()))
                .write(Write::RemoveOAuthClient("azure".into())),
        )
        .await
        .unwrap();
    assert_eq!(done(removed), [true, false]);
}

/// Signing configurations (issue 24): upsert replaces, list in service order, delete reports
/// whether it removed anything.
pub async fn sign_configs(engine: &dyn Engine) {
    let s = fresh(engine).await;
    assert_eq!(s.sign_config("s3").await.unwrap(), None);
    done(
        s.apply(
            ChangeSet::default()
                .write(Write::PutSignConfig("s3".into(), r#"{"aws":{}}"#.into(), 1))
                .write(Write::PutSignConfig("bank".into(), "{}".into(), 1))
                .write(Write::PutSignConfig(
                    "s3".into(),
                    r#"{"aws":{"region":"eu-west-1"}}"#.into(),
                    2,
                )),
        )
        .await
        .unwrap(),
    );
    assert_eq!(
        s.sign_config("s3").await.unwrap().as_deref(),
        Some(r#"{"aws":{"region":"eu-west-1"}}"#)
    );
    let services: Vec<String> = s
        .sign_configs()
        .await
        .unwrap()
        .into_iter()
        .map(|(service, _)| service)
        .collect();
    assert_eq!(services, ["bank", "s3"]);
    let removed = s
        .apply(
            ChangeSet::default()
                .write(Write::DeleteSignConfig("bank".into()))
                .write(Write::DeleteSignConfig("bank".into())),
        )
        .await
        .unwrap();
    assert_eq!(done(removed), [true, false]);
    assert_eq!(s.sign_config("bank").await.unwrap(), None);
}

/// The audit chain: appended, listed, verified, pruned behind a signed prune entry.
pub async fn audit(engine: &dyn Engine) {
    let s = fresh(engine).await;
    let identity = Arc::new(keyholder_protocol::IdentityKey::generate());
    let signer: SharedSigner = identity.clone();
    let event = |at_ms: i64, service: &str, result: &str| AuditEvent {
        at_ms,
        endpoint: "/v1/credential".into(),
        service: service.into(),
        result: result.into(),
        ..AuditEvent::default()
    };
    assert_eq!(s.audit_count().await.unwrap(), 0);
    assert_eq!(
        s.append_audit(
            vec![event(100, "a", "ok"), event(200, "b", "ticket_invalid")],
            signer.clone()
        )
        .await
        .unwrap(),
        2
    );
    assert_eq!(
        s.append_audit(vec![event(300, "a", "ok policy=p")], signer.clone())
            .await
            .unwrap(),
        3
    );
    assert_eq!(s.audit_count().await.unwrap(), 3);
    assert_eq!(s.last_credential_use().await.unwrap(), Some(300));
    let all = s.audit_entries(AuditFilter::default()).await.unwrap();
    assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(all[1].prev_hash, all[0].hash, "chained");
    assert!(
        all[0].signature.is_none() && all[1].signature.is_some(),
        "newest of a batch signed"
    );
    let only_a = s
        .audit_entries(AuditFilter {
            service: Some("a".into()),
            ..AuditFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(only_a.len(), 2);
    let newest = s
        .audit_entries(AuditFilter {
            limit: Some(1),
            ..AuditFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(newest[0].seq, 3);
    let since = s
        .audit_entries(AuditFilter {
            since_ms: Some(200),
            through_seq: Some(2),
            ..AuditFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(since.iter().map(|e| e.seq).collect::<Vec<_>>(), [2]);
    let ok = s.verify_audit(identity.verifying_key()).await.unwrap();
    assert!(ok.problem.is_none(), "{:?}", ok.problem);
    assert_eq!((ok.entries, ok.head_seq), (3, 3));
    let other = keyholder_protocol::IdentityKey::generate();
    assert!(s
        .verify_audit(other.verifying_key())
        .await
        .unwrap()
        .problem
        .is_some());
    // Prune everything before 250 ms: entries 1 and 2, behind a signed prune entry.
    let boundary = s.prune_boundary(250).await.unwrap().unwrap();
    assert_eq!(boundary.through_seq, 2);
    assert_eq!(s.prune_boundary(50).await.unwrap(), None);
    s.append_audit(vec![crate::audit::prune_event(boundary, "test")], signer)
        .await
        .unwrap();
    let mut removed = 0;
    loop {
        let n = s.delete_pruned(boundary).await.unwrap();
        if n == 0 {
            break;
        }
        removed += n;
    }
    assert_eq!(removed, 2);
    let after = s.verify_audit(identity.verifying_key()).await.unwrap();
    assert!(after.problem.is_none(), "{:?}", after.problem);
    assert_eq!((after.first_seq, after.head_seq), (3, 4));
}

/// Change sets: all or none, audit entries and the generation bump in the same transaction.
pub async fn change_sets(engine: &dyn Engine) {
    let s = fresh(engine).await;
    let identity = Arc::new(keyholder_protocol::IdentityKey::generate());
    let signer: SharedSigner = identity.clone();
    let change = ChangeSet::owner()
        .check(Check::SettingIs(Setting::Sealed, None))
        .check(Check::DocumentAbsent(Collection::Tokens, "gh".into()))
        .write(Write::PutSetting(Setting::Sealed, "true".into()))
        .write(Write::PutDocument {
            collection: Collection::Tokens,
            key: "gh".into(),
            doc: "{\"a\":1}".into(),
            now: 1,
        })
        .audited(AuditEvent::owner("seal", ""), signer.clone());
    assert_eq!(done(s.apply(change.clone()).await.unwrap()), [true, true]);
    assert_eq!(s.owner_generation().await.unwrap(), 1);
    assert_eq!(s.audit_count().await.unwrap(), 1);
    // Its checks no longer hold: nothing written, no entry, no bump.
    assert_eq!(s.apply(change).await.unwrap(), Applied::CheckFailed(0));
    assert_eq!(s.owner_generation().await.unwrap(), 1);
    assert_eq!(s.audit_count().await.unwrap(), 1);
    let rewrite = ChangeSet::default()
        .check(Check::DocumentIs(
            Collection::Tokens,
            "gh".into(),
            "{\"a\":1}".into(),
        ))
        .write(Write::RewriteDocument(
            Collection::Tokens,
            "gh".into(),
            "{\"a\":2}".into(),
        ))
        .write(Write::DeleteSetting(Setting::Sealed))
        .write(Write::DeleteSetting(Setting::Sealed));
    assert_eq!(
        done(s.apply(rewrite.clone()).await.unwrap()),
        [true, true, false]
    );
    assert_eq!(s.apply(rewrite).await.unwrap(), Applied::CheckFailed(0));
    assert_eq!(s.owner_generation().await.unwrap(), 1, "no bump asked");
    assert_eq!(
        s.document(Collection::Tokens, "gh")
            .await
            .unwrap()
            .as_deref(),
        Some("{\"a\":2}")
    );
    // The platform keys check sees the set as a whole.
    let key = |id: &str| StoredPlatformKey {
        key_id: id.into(),
        public_key: vec![1; 32],
        added_at: 1,
    };
    let add = |id: &str, current: &[&str]| {
        ChangeSet::default()
            .check(Check::PlatformKeysAre(
                current.iter().map(|s| s.to_string()).collect(),
            ))
            .write(Write::AddPlatformKey(key(id)))
    };
    done(s.apply(add("k1", &[])).await.unwrap());
    done(s.apply(add("k2", &["k1"])).await.unwrap());
    assert_eq!(
        s.apply(add("k3", &["k1"])).await.unwrap(),
        Applied::CheckFailed(0)
    );
    done(
        s.apply(
            ChangeSet::default()
                .check(Check::PlatformKeysAre(vec!["k2".into(), "k1".into()]))
                .write(Write::RemovePlatformKey("k1".into()))
                .write(Write::DeleteBindCodes)
                .write(Write::PutPendingSecret("none".into(), vec![1])),
        )
        .await
        .unwrap(),
    );
    assert_eq!(s.platform_keys().await.unwrap(), vec![key("k2")]);
    let ok = s.verify_audit(identity.verifying_key()).await.unwrap();
    assert!(ok.problem.is_none(), "{:?}", ok.problem);
}

/// The SQLite engine under the suite: real files in temporary folders.
#[cfg(test)]
mod sqlite {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use super::*;
    use crate::storage::sqlite::SqliteStorage;

    #[derive(Default)]
    struct Sqlite {
        dirs: Mutex<HashMap<String, tempfile::TempDir>>,
    }

    #[async_trait]
    impl Engine for Sqlite {
        async fn fresh(&self) -> (SharedStorage, String) {
            let dir = tempfile::tempdir().unwrap();
            let storage: SharedStorage = Arc::new(SqliteStorage::open(dir.path()).unwrap());
            let name = dir.path().display().to_string();
            self.dirs.lock().unwrap().insert(name.clone(), dir);
            (storage, name)
        }

        async fn reopen(&self, name: &str) -> SharedStorage {
            Arc::new(SqliteStorage::open(std::path::Path::new(name)).unwrap())
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn sqlite_passes_the_storage_conformance_suite() {
        run_all(&Sqlite::default()).await;
    }
}
