//! Crash safety: concurrent durable writes (`/v1/store` and storage `set`), SIGKILL at a random
//! moment, restart on the same folder. Every acknowledged write is there and decrypts, an
//! unacknowledged one is either absent or whole, and no used nonce or request id works again.
//! `KEYHOLDER_CRASH_CYCLES` sets the number of cycles (default 20).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use super::{integrity_check, Platform, Prepared, Server};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Store,
    Set,
}

#[derive(Debug, Clone)]
struct Attempt {
    kind: Kind,
    key: String,
    value: Value,
    request: Prepared,
    /// Status answered, if any (None: the connection died with the server).
    answered: Option<u16>,
}

const WRITERS: usize = 6;

async fn writer(
    platform: Platform,
    cycle: usize,
    task: usize,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Attempt>>>,
) {
    let mut n = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let key = format!("c{cycle}-t{task}-n{n}");
        let (kind, value, request) = if n.is_multiple_of(2) {
            let value = json!(format!("tok-{key}-{}", super::random_hex(8)));
            let req = platform.store(&key, json!({"accessToken": value, "note": key}));
            (Kind::Store, value, req)
        } else {
            let value = json!({"n": n, "cycle": cycle, "blob": super::random_hex(64)});
            let req = platform.storage(
                json!({"operation": "set", "collection": "proxy_configs", "key": key, "data": value}),
            );
            (Kind::Set, value, req)
        };
        let index = {
            let mut log = log.lock().unwrap();
            log.push(Attempt {
                kind,
                key,
                value,
                request: request.clone(),
                answered: None,
            });
            log.len() - 1
        };
        match platform.send(&request).await {
            Ok((status, _)) => log.lock().unwrap()[index].answered = Some(status),
            Err(_) => return,
        }
        n += 1;
    }
}

/// The stored value of an attempt after the restart: `None` when absent.
async fn stored(platform: &Platform, attempt: &Attempt) -> Option<Value> {
    match attempt.kind {
        Kind::Store => {
            let (status, body) = platform.credential(&attempt.key).await;
            match status {
                200 => Some(body["token"]["accessToken"].clone()),
                404 => {
                    assert_eq!(body["error"], "token_not_found", "{body}");
                    None
                }
                other => panic!("credential {}: {other} {body}", attempt.key),
            }
        }
        Kind::Set => {
            let (status, data) = platform.get("proxy_configs", &attempt.key).await;
            assert_eq!(status, 200, "get {}", attempt.key);
            (!data.is_null()).then_some(data)
        }
    }
}

#[test]
fn acknowledged_writes_survive_sigkill() {
    let cycles: usize = std::env::var("KEYHOLDER_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let seed: u64 = rand::random();
    eprintln!("crash test: {cycles} cycles, seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let rt = super::runtime();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let started = Instant::now();
    rt.block_on(async {
        let mut server = Server::start(&data).await;
        let mut platform = Platform::bind(&server).await;
        let (mut acked_stores, mut acked_sets) = (Vec::new(), Vec::new());
        let (mut in_flight, mut in_flight_visible, mut replays) = (0, 0, 0);
        for cycle in 0..cycles {
            let stop = Arc::new(AtomicBool::new(false));
            let log = Arc::new(Mutex::new(Vec::new()));
            let tasks: Vec<_> = (0..WRITERS)
                .map(|task| {
                    tokio::spawn(writer(
                        platform.clone(),
                        cycle,
                        task,
                        Arc::clone(&stop),
                        Arc::clone(&log),
                    ))
                })
                .collect();
            tokio::time::sleep(Duration::from_millis(rng.gen_range(20..300))).await;
            server.kill();
            stop.store(true, Ordering::Relaxed);
            for task in tasks {
                task.await.unwrap();
            }
            let log = log.lock().unwrap().clone();

            server = Server::start(&data).await;
            platform = platform.to(&server);
            let checks = futures_util::stream::iter(log.iter().cloned().map(|attempt| {
                let platform = platform.clone();
                async move {
                    let found = stored(&platform, &attempt).await;
                    let replay = match attempt.answered {
                        Some(_) => Some(platform.send(&attempt.request).await.unwrap()),
                        None => None,
                    };
                    (attempt, found, replay)
                }
            }))
            .buffer_unordered(8)
            .collect::<Vec<_>>()
            .await;
            for (attempt, found, replay) in checks {
                match attempt.answered {
                    Some(200) => {
                        assert_eq!(
                            found.as_ref(),
                            Some(&attempt.value),
                            "cycle {cycle}: acknowledged {:?} {} lost or changed",
                            attempt.kind,
                            attempt.key
                        );
                        let (status, body) = replay.unwrap();
                        let code = if attempt.kind == Kind::Store {
                            "ticket_invalid"
                        } else {
                            "auth_failed"
                        };
                        assert_eq!((status, body["error"].as_str()), (401, Some(code)), "replay of {}", attempt.key);
                        replays += 1;
                        match attempt.kind {
                            Kind::Store => acked_stores.push(attempt.key.clone()),
                            Kind::Set => acked_sets.push(attempt.key.clone()),
                        }
                    }
                    Some(other) => panic!("cycle {cycle}: {} answered {other} before the kill", attempt.key),
                    None => {
                        // Never answered: absent, or there whole and exactly as sent.
                        in_flight += 1;
                        if let Some(value) = found {
                            assert_eq!(value, attempt.value, "half-visible write {}", attempt.key);
                            in_flight_visible += 1;
                        }
                    }
                }
            }
        }
        // Nothing acknowledged in an earlier cycle went missing in a later crash.
        let tokens = platform.keys("tokens").await;
        let docs = platform.keys("proxy_configs").await;
        for key in &acked_stores {
            assert!(tokens.contains(key), "{key} lost in a later crash");
        }
        for key in &acked_sets {
            assert!(docs.contains(key), "{key} lost in a later crash");
        }
        server.stop();
        integrity_check(&data);
        eprintln!(
            "crash test: {cycles} SIGKILL cycles in {:.1} s: {} acknowledged stores and {} sets all present \
             and decrypting, {replays} replays refused, {in_flight} unanswered writes of which \
             {in_flight_visible} visible (whole), integrity_check ok",
            started.elapsed().as_secs_f64(),
            acked_stores.len(),
            acked_sets.len(),
        );
        assert!(acked_stores.len() + acked_sets.len() > cycles, "too few writes to mean anything");
    });
}
