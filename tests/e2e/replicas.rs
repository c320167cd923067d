//! Several replicas on one PostgreSQL database: real keyholder processes (the `keyholder` command
//! built as `keyholder-replica`), each test its own database. Skipped, with a message, when no
//! PostgreSQL is reachable (and `KEYHOLDER_TEST_DATABASE_URL` is unset).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use keyholder_protocol::paths::{PATH_CREDENTIAL, PATH_STORAGE, PATH_STORE};
use keyholder_protocol::{HmacSecret, Purpose};
use keyholder_tests::replicas::{can_restart_postgres, restart_postgres, Cluster, Nginx};
use keyholder_tests::{now, random_hex, Keyholder};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_keyholder-replica");

async fn cluster(n: usize) -> Option<Cluster> {
    let mut cluster = Cluster::start(std::path::Path::new(BIN), n).await?;
    cluster.bind(0).await;
    Some(cluster)
}

/// A cluster alone on the PostgreSQL server (the test restarts it).
async fn exclusive_cluster(n: usize) -> Option<Cluster> {
    let mut cluster = Cluster::start_exclusive(std::path::Path::new(BIN), n).await?;
    cluster.bind(0).await;
    Some(cluster)
}

/// A store that may fail in transport (a killed replica): `Some(status)` when answered.
async fn try_store(kh: &Keyholder, service: &str, token: &str) -> Option<u16> {
    let ticket = kh.ticket(Purpose::Store, service);
    let sent = kh
        .http
        .post(kh.url(PATH_STORE))
        .json(&json!({ "ticket": ticket, "service": service,
                        "tokenData": { "accessToken": token } }))
        .send()
        .await
        .ok()?;
    Some(sent.status().as_u16())
}

/// The credential's access token read through `kh`, or the status when refused.
async fn access_token(kh: &Keyholder, service: &str) -> Result<String, u16> {
    let answer = kh.credential(service).await;
    if answer.status != 200 {
        eprintln!(
            "{service}: {} {}",
            answer.status,
            String::from_utf8_lossy(&answer.body)
        );
        return Err(answer.status);
    }
    Ok(answer.json()["token"]["accessToken"]
        .as_str()
        .unwrap_or_default()
        .to_string())
}

#[tokio::test]
async fn two_replicas_share_credentials_replay_marks_and_the_seal() {
    let Some(cluster) = cluster(2).await else {
        return;
    };
    let (a, b) = (cluster.view(0), cluster.view(1));

    // A store through A is read through B.
    assert_eq!(
        a.store("github", json!({"accessToken": "gho_one"}))
            .await
            .status,
        200
    );
    assert_eq!(access_token(&b, "github").await.as_deref(), Ok("gho_one"));
    // Replaced through B (B's cache held the old one), read through A and B.
    assert_eq!(
        b.store("github", json!({"accessToken": "gho_two"}))
            .await
            .status,
        200
    );
    assert_eq!(access_token(&a, "github").await.as_deref(), Ok("gho_two"));
    assert_eq!(access_token(&b, "github").await.as_deref(), Ok("gho_two"));
    // ... and replaced through A again: B's cache forgets what A wrote.
    assert_eq!(
        a.store("github", json!({"accessToken": "gho_three"}))
            .await
            .status,
        200
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(access_token(&b, "github").await.as_deref(), Ok("gho_three"));

    // A ticket used on A is refused on B (and on A again).
    let ticket = a.ticket(Purpose::AgentCredential, "github");
    assert_eq!(a.credential_with(&ticket, "github").await.status, 200);
    let replay = b.credential_with(&ticket, "github").await;
    replay.assert_error(401, "ticket_invalid");
    assert_eq!(replay.json()["message"], "Ticket already used");
    assert!(
        !replay.body.windows(9).any(|w| w == b"gho_three"),
        "nothing leaked"
    );
    a.credential_with(&ticket, "github")
        .await
        .assert_error(401, "ticket_invalid");
    // The same ticket sent to both at once: one answer carries the credential, never two.
    let ticket = a.ticket(Purpose::AgentCredential, "github");
    let (x, y) = tokio::join!(
        a.credential_with(&ticket, "github"),
        b.credential_with(&ticket, "github")
    );
    let ok = [x.status, y.status].iter().filter(|s| **s == 200).count();
    assert_eq!(ok, 1, "{} {}", x.status, y.status);

    // A request id used on A is refused on B, whatever else the request says.
    let id = format!("req_{}", random_hex(8));
    let raw = br#"{"operation":"list","collection":"tokens"}"#;
    assert_eq!(
        a.signed_raw(PATH_STORAGE, raw, now(), &id).await.status,
        200
    );
    let replayed = b.signed_raw(PATH_STORAGE, raw, now(), &id).await;
    replayed.assert_error(401, "auth_failed");
    assert_eq!(replayed.json()["message"], "Duplicate request ID");
    let other = br#"{"operation":"get","collection":"tokens","key":"github"}"#;
    b.signed_raw(PATH_STORAGE, other, now(), &id)
        .await
        .assert_error(401, "auth_failed");

    // Sealed with the owner CLI (against the database): in force on both within a second.
    let sealed_at = Instant::now();
    cluster.owner(&["seal"]);
    let mut both = false;
    while sealed_at.elapsed() < Duration::from_secs(1) {
        let (x, y) = tokio::join!(a.credential("github"), b.credential("github"));
        if x.status == 503 && y.status == 503 {
            x.assert_error(503, "sealed");
            y.assert_error(503, "sealed");
            both = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(both, "seal not in force on both replicas within a second");
    cluster.owner(&["unseal"]);
    let unsealed_at = Instant::now();
    loop {
        let (x, y) = tokio::join!(a.credential("github"), b.credential("github"));
        if x.status == 200 && y.status == 200 {
            break;
        }
        assert!(
            unsealed_at.elapsed() < Duration::from_secs(1),
            "unseal not followed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Every replica's audit chain verifies (one chain per replica, and the CLI's own).
    let out = cluster.owner(&["audit", "verify"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("OK:"), "{text}");
    let db = cluster.db.target().connect().await.unwrap();
    let nodes: Vec<String> = db
        .query("SELECT node FROM audit_heads ORDER BY node", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        nodes.contains(&"replica-a".to_string()) && nodes.contains(&"replica-b".to_string()),
        "{nodes:?}"
    );
    // An entry removed from B's chain: `audit verify` fails and names that chain.
    db.execute(
        "DELETE FROM audit_log WHERE node = 'replica-b' AND seq = 1",
        &[],
    )
    .await
    .unwrap();
    let out = cluster.owner_output(&["audit", "verify"]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("replica-b") && text.contains("missing"),
        "{text}"
    );
}

#[tokio::test]
async fn key_rotation_and_rewrap_while_both_serve_lose_nothing() {
    let Some(cluster) = cluster(2).await else {
        return;
    };
    let views = [cluster.view(0), cluster.view(1)];
    for i in 0..20 {
        let kh = &views[i % 2];
        let service = format!("svc{i}");
        let stored = kh
            .store(&service, json!({"accessToken": format!("tok{i}")}))
            .await;
        assert_eq!(stored.status, 200);
    }
    // Traffic on both while the owner rotates the data key and rewraps everything.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut traffic = Vec::new();
    for r in 0..2 {
        let kh = cluster.view(r);
        let stop = std::sync::Arc::clone(&stop);
        traffic.push(tokio::spawn(async move {
            let mut acked: BTreeMap<String, String> = BTreeMap::new();
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let service = format!("live{r}_{n}");
                let token = format!("t{r}_{n}");
                if kh
                    .store(&service, json!({"accessToken": token}))
                    .await
                    .status
                    == 200
                {
                    acked.insert(service, token);
                }
                let read = access_token(&kh, &format!("svc{}", n % 20)).await;
                assert_eq!(read, Ok(format!("tok{}", n % 20)), "read during rotation");
                n += 1;
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.owner(&["rotate-key"]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.owner(&["rewrap"]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut acked = BTreeMap::new();
    for t in traffic {
        acked.extend(t.await.unwrap());
    }
    assert!(acked.len() >= 4, "too little traffic: {}", acked.len());
    // Everything decrypts through both, also what was written during the rotation.
    for kh in &views {
        for i in 0..20 {
            assert_eq!(
                access_token(kh, &format!("svc{i}")).await,
                Ok(format!("tok{i}"))
            );
        }
        for (service, token) in &acked {
            assert_eq!(
                access_token(kh, service).await.as_deref(),
                Ok(token.as_str())
            );
        }
    }
}

#[tokio::test]
async fn kill_9_of_a_replica_under_durable_writes_loses_no_acknowledged_write() {
    let Some(mut cluster) = cluster(2).await else {
        return;
    };
    // A real nginx in front of both replicas.
    let balancer = Nginx::start(&cluster.addrs()).await;
    let front = cluster.view_at(&balancer.base());
    let writers = 8;
    let per_writer = 40;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let kh = cluster.view_at(&balancer.base());
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut failed = 0;
            for n in 0..per_writer {
                let service = format!("w{w}_{n}");
                let token = format!("secret_{w}_{n}");
                match try_store(&kh, &service, &token).await {
                    Some(200) => acked.push((service, token)),
                    _ => failed += 1,
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (acked, failed)
        }));
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    cluster.kill9(0);
    let (mut acked, mut failed) = (Vec::new(), 0);
    for t in tasks {
        let (a, f) = t.await.unwrap();
        acked.extend(a);
        failed += f;
    }
    eprintln!(
        "kill -9 through nginx: {} of {} stores acknowledged, {failed} failed",
        acked.len(),
        writers * per_writer
    );
    // nginx went on choosing A after the kill and passed those requests on to B.
    let log = balancer.error_log();
    assert!(
        log.contains("Connection refused") && log.contains(&cluster.replicas[0].addr.to_string()),
        "nginx never found A dead: {log}"
    );
    assert!(
        acked.len() > writers * per_writer / 2,
        "B did not keep serving: {} acknowledged",
        acked.len()
    );
    // Every acknowledged write is present and decrypts, through B and through the front.
    let b = cluster.view(1);
    for (service, token) in &acked {
        assert_eq!(
            access_token(&b, service).await.as_deref(),
            Ok(token.as_str())
        );
    }
    // A rejoins and serves them too.
    cluster.restart(0).await;
    let a = cluster.view(0);
    for (service, token) in acked.iter().step_by(7) {
        assert_eq!(
            access_token(&a, service).await.as_deref(),
            Ok(token.as_str())
        );
    }
    assert_eq!(
        front
            .store("after", json!({"accessToken": "x"}))
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn postgres_restarted_under_load_answers_503_then_recovers_by_itself() {
    if !can_restart_postgres() {
        eprintln!("SKIPPED: cannot stop and start the local PostgreSQL here (needs root and pg_ctlcluster)");
        return;
    }
    let Some(cluster) = exclusive_cluster(1).await else {
        return;
    };
    let kh = cluster.view(0);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let kh = cluster.view(0);
        let stop = std::sync::Arc::clone(&stop);
        tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
            let mut bodies = Vec::new();
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let service = format!("pg{n}");
                let ticket = kh.ticket(Purpose::Store, &service);
                let answer = kh
                    .http
                    .post(kh.url(PATH_STORE))
                    .json(&json!({"ticket": ticket, "service": service,
                                   "tokenData": {"accessToken": format!("v{n}")}}))
                    .send()
                    .await;
                if let Ok(resp) = answer {
                    let status = resp.status().as_u16();
                    *statuses.entry(status).or_default() += 1;
                    let body: Value = resp.json().await.unwrap_or(Value::Null);
                    if status == 200 {
                        acked.push((service, format!("v{n}")));
                    } else {
                        bodies.push((status, body));
                    }
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (acked, statuses, bodies)
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    tokio::task::spawn_blocking(|| restart_postgres(Duration::from_secs(2)))
        .await
        .unwrap()
        .expect("PostgreSQL restarted");
    // Service back by itself: a store succeeds within 10 s of PostgreSQL's start.
    let back = Instant::now();
    loop {
        if try_store(&kh, "probe", "p").await == Some(200) {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(10),
            "not back by itself"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (acked, statuses, bodies) = writer.await.unwrap();
    assert!(
        statuses.get(&503).copied().unwrap_or(0) > 0,
        "no 503 during the outage: {statuses:?}"
    );
    assert!(!statuses.contains_key(&500), "a 500: {statuses:?}");
    for (status, body) in &bodies {
        assert_eq!(*status, 503, "{body}");
        assert_eq!(body["error"], "storage_unavailable", "{body}");
    }
    for (service, token) in &acked {
        assert_eq!(
            access_token(&kh, service).await.as_deref(),
            Ok(token.as_str())
        );
    }
    let _ = PATH_CREDENTIAL;
}

/// A credential GET: the status, the body and how long the answer took.
async fn timed_credential(kh: &Keyholder, service: &str) -> (u16, Value, Duration) {
    let started = Instant::now();
    let answer = kh.credential(service).await;
    let body = serde_json::from_slice(&answer.body).unwrap_or(Value::Null);
    (answer.status, body, started.elapsed())
}

/// One bound replica reaching PostgreSQL through a relay the test can freeze, and a client that
/// waits longer than the keyholder's own time limits.
async fn relayed_replica() -> Option<(Cluster, Keyholder)> {
    let mut cluster = Cluster::start_relayed(std::path::Path::new(BIN), 1).await?;
    cluster.bind(0).await;
    let mut kh = cluster.view(0);
    kh.http = reqwest::Client::builder()
        .timeout(Duration::from_secs(40))
        .build()
        .unwrap();
    Some((cluster, kh))
}

/// Waits until `service` is served again by itself (`503` meanwhile, for less than `within`); the
/// answer's body.
async fn until_served(kh: &Keyholder, service: &str, within: Duration) -> Value {
    let back = Instant::now();
    loop {
        let (status, body, _) = timed_credential(kh, service).await;
        if status == 200 {
            return body;
        }
        assert_eq!(status, 503, "{body}");
        assert!(back.elapsed() < within, "not back by itself");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_database_lost_without_a_reset_answers_503_within_seconds_then_recovers() {
    let Some((cluster, kh)) = relayed_replica().await else {
        return;
    };
    kh.store("lost", json!({"accessToken": "before"}))
        .await
        .assert_ok();
    assert_eq!(access_token(&kh, "lost").await.as_deref(), Ok("before"));

    // The host goes silent: no RST, no FIN, every byte held.
    cluster.relay.as_ref().unwrap().freeze();
    let (status, body, took) = timed_credential(&kh, "lost").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "storage_unavailable", "{body}");
    assert!(body.get("token").is_none(), "{body}");
    assert!(took < Duration::from_secs(15), "took {took:?}");
    // A queued one is answered too (not held behind the timed-out connection).
    let (status, body, took) = timed_credential(&kh, "lost").await;
    assert_eq!(
        (status, &body["error"]),
        (503, &json!("storage_unavailable")),
        "{body}"
    );
    assert!(took < Duration::from_secs(15), "took {took:?}");
    let store = try_store(&kh, "lost", "during").await;
    assert_eq!(store, Some(503));

    cluster.relay.as_ref().unwrap().thaw();
    let body = until_served(&kh, "lost", Duration::from_secs(15)).await;
    assert_eq!(body["token"]["accessToken"], "before", "{body}");
    assert_eq!(try_store(&kh, "lost", "after").await, Some(200));
    assert_eq!(access_token(&kh, "lost").await.as_deref(), Ok("after"));
}

#[tokio::test]
async fn an_audit_append_lost_with_its_connection_gives_up_and_the_trail_records_the_gap() {
    let Some((cluster, kh)) = relayed_replica().await else {
        return;
    };
    kh.store("gap", json!({"accessToken": "t"}))
        .await
        .assert_ok();
    let relay = cluster.relay.as_ref().unwrap();
    // The store's audit entry is appended within the recorder's interval: on a connection that
    // goes silent now, for good.
    relay.freeze();
    let (status, body, _) = timed_credential(&kh, "gap").await;
    assert_eq!(status, 503, "{body}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    relay.replace_host();
    let back = Instant::now();
    until_served(&kh, "gap", Duration::from_secs(30)).await;
    // The append held by the lost connection gives up: later entries reach the trail within
    // seconds, with a marker that counts what could not be written.
    let db = cluster.db.target().connect().await.unwrap();
    loop {
        let entries: Vec<(String, String, String)> = db
            .query(
                "SELECT endpoint, service, result FROM audit_log WHERE node = 'replica-a' ORDER BY seq",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        let marker = entries.iter().any(|e| e.0 == "audit:dropped");
        let later = entries
            .iter()
            .any(|e| e.1 == "gap" && e.2.starts_with("ok"));
        if marker && later {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(40),
            "the trail did not resume: {entries:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until both replicas refuse `probe` (a policy attached after the ones under test): then
/// both follow every owner change made before it.
async fn until_both_follow(views: &[Keyholder; 2], probe: &str) {
    let started = Instant::now();
    loop {
        let (x, y) = tokio::join!(views[0].credential(probe), views[1].credential(probe));
        if x.status == 403 && y.status == 403 {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the replicas did not follow the policy change: {} {}",
            x.status,
            y.status
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_usage_cap_is_exact_across_two_replicas_under_concurrent_agents() {
    let Some(cluster) = cluster(2).await else {
        return;
    };
    let views = [cluster.view(0), cluster.view(1)];
    for service in ["github", "probe"] {
        assert_eq!(
            views[0]
                .store(service, json!({"accessToken": "gho_capped_secret"}))
                .await
                .status,
            200
        );
    }
    let cap = 7;
    cluster.owner(&[
        "policy",
        "create",
        "cap",
        "--max-uses",
        &cap.to_string(),
        "--per",
        "total",
    ]);
    cluster.owner(&["policy", "attach", "cap", "--service", "github"]);
    cluster.owner(&["policy", "create", "few", "--max-uses", "3", "--per", "day"]);
    cluster.owner(&["policy", "attach", "few", "--service", "missing"]);
    cluster.owner(&["policy", "create", "gate", "--agents", "nobody"]);
    cluster.owner(&["policy", "attach", "gate", "--service", "probe"]);
    until_both_follow(&views, "probe").await;

    // 60 agents at once, split over both replicas, each with its own ticket.
    let agents = 60;
    let mut tasks = Vec::new();
    for i in 0..agents {
        let kh = cluster.view(i % 2);
        tasks.push(tokio::spawn(async move { kh.credential("github").await }));
    }
    let (mut served, mut refused) = ([0usize; 2], 0usize);
    for (i, task) in tasks.into_iter().enumerate() {
        let answer = task.await.unwrap();
        match answer.status {
            200 => served[i % 2] += 1,
            _ => {
                answer.assert_error(429, "rate_limited");
                let message = answer.json()["message"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                assert!(
                    message.contains("usage cap reached (7 uses in total)"),
                    "{message}"
                );
                assert!(answer.header("retry-after").is_some());
                assert!(
                    !answer.body.windows(17).any(|w| w == b"gho_capped_secret"),
                    "a refused use carried the credential"
                );
                refused += 1;
            }
        }
    }
    eprintln!("usage cap {cap}: served {served:?} by replica, {refused} refused");
    assert_eq!(served[0] + served[1], cap, "exactly the cap is served");
    assert_eq!(refused, agents - cap);
    // The stored count is the cap, on both replicas' shared database and in the owner's view.
    let db = cluster.db.target().connect().await.unwrap();
    let count: i64 = db
        .query_one(
            "SELECT count FROM policy_usage WHERE policy = 'cap' AND target = 'service:github'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, cap as i64);
    let shown: Value =
        serde_json::from_slice(&cluster.owner(&["policy", "show", "cap", "--json"]).stdout)
            .unwrap();
    assert_eq!(shown["usage"][0]["count"], cap, "{shown}");
    // And stays refused on both afterwards.
    for kh in &views {
        kh.credential("github")
            .await
            .assert_error(429, "rate_limited");
    }

    // Uses that fail after admission (nothing stored under `missing`) give their counts back on
    // whichever replica took them: concurrent failures leave the counter at zero.
    let mut tasks = Vec::new();
    for i in 0..20 {
        let kh = cluster.view(i % 2);
        tasks.push(tokio::spawn(async move {
            kh.credential("missing").await.status
        }));
    }
    for task in tasks {
        let status = task.await.unwrap();
        assert!(status == 404 || status == 429, "{status}");
    }
    let count: i64 = db
        .query_one(
            "SELECT count FROM policy_usage WHERE policy = 'few' AND target = 'service:missing'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 0, "every failed use gave its count back");
}

/// The platform's first calls after a binding (or a rebinding) made through one replica may reach
/// another before that replica hears of it: it then reads the binding from the database at once
/// instead of refusing (`setup_required`, or `auth_failed` with the old secret).
#[tokio::test]
async fn calls_right_after_a_binding_on_another_replica_are_served() {
    let Some(mut cluster) = Cluster::start(std::path::Path::new(BIN), 2).await else {
        return;
    };
    let exchange = |cluster: &Cluster, args: &[&str], through: usize| {
        let out = cluster.owner(args);
        let issued: Value = serde_json::from_slice(&out.stdout).unwrap();
        let code = issued["code"].as_str().unwrap().to_string();
        let view = cluster.view(through);
        async move {
            let answer = view.exchange(&code).await;
            answer.assert_ok();
            HmacSecret::from_base64(answer.json()["hmacSecret"].as_str().unwrap()).unwrap()
        }
    };
    // Bound through A; the store and the fetch go to B at once.
    cluster.secret = Some(exchange(&cluster, &["bind", "--json"], 0).await);
    let b = cluster.view(1);
    b.store("github", json!({"accessToken": "gho_first"}))
        .await
        .assert_ok();
    assert_eq!(access_token(&b, "github").await.as_deref(), Ok("gho_first"));

    // Rebound through one replica, again and again; the new secret's first signed call and
    // ticket go to the other at once.
    let mut old_secret = *cluster.secret.as_ref().unwrap().expose();
    for round in 0..10 {
        let (through, other) = (round % 2, 1 - round % 2);
        old_secret = *cluster.secret.as_ref().unwrap().expose();
        cluster.secret = Some(exchange(&cluster, &["bind", "--rebind", "--json"], through).await);
        let view = cluster.view(other);
        view.storage(json!({"operation": "list", "collection": "tokens"}))
            .await
            .assert_ok();
        assert_eq!(
            access_token(&view, "github").await.as_deref(),
            Ok("gho_first")
        );
    }
    // The old secret is refused on both.
    for replica in 0..2 {
        let mut stale = cluster.view(replica);
        stale.secret = Some(HmacSecret::from_bytes(old_secret));
        stale
            .credential("github")
            .await
            .assert_error(401, "ticket_invalid");
    }
}
