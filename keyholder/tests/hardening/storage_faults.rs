//! Storage faults: the data folder on a full file system (a small tmpfs), on a read-only one, and
//! the database locked by another process. Writes fail with `503 storage_unavailable` (which the
//! platform retries), what is stored stays intact and readable, the server stays up and recovers
//! when the fault clears. The mount tests need root (they print SKIP otherwise).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{integrity_check, Platform, Server};

/// A tmpfs mounted for one test; unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .stderr(std::process::Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        ok.then(|| Tmpfs(at.to_path_buf()))
    }

    fn remount(&self, mode: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,{mode}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(status.success(), "remount {mode}");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Stores a few credentials and documents; returns them for later checks.
async fn baseline(platform: &Platform) -> Vec<(String, String)> {
    let mut stored = Vec::new();
    for i in 0..5 {
        let service = format!("base-{i}");
        let token = format!("tok-base-{i}-{}", super::random_hex(8));
        let (status, body) = platform
            .send(&platform.store(&service, json!({"accessToken": token})))
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
        let (status, body) = platform
            .send(&platform.storage(json!({"operation": "set", "collection": "vault_config", "key": service, "data": {"token": token}})))
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
        stored.push((service, token));
    }
    stored
}

async fn assert_intact(platform: &Platform, stored: &[(String, String)]) {
    for (service, token) in stored {
        let (status, body) = platform.credential(service).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["token"]["accessToken"], json!(token));
        let (status, data) = platform.get("vault_config", service).await;
        assert_eq!((status, data), (200, json!({"token": token})));
    }
}

/// A write under the fault: `Ok(true)` acknowledged, `Ok(false)` refused with 503 storage_unavailable.
fn judge(status: u16, body: &Value) -> bool {
    match status {
        200 => true,
        503 => {
            assert_eq!(body["error"], "storage_unavailable", "{body}");
            false
        }
        other => panic!("write under a storage fault answered {other}: {body}"),
    }
}

async fn public_endpoints_answer(platform: &Platform) {
    for path in ["/v1/health", "/v1/identity"] {
        let r = platform
            .http
            .get(format!("{}{path}", platform.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
}

fn fill(path: &Path) {
    use std::io::Write;
    let mut file = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 256 * 1024];
    while file.write_all(&chunk).is_ok() {}
    let _ = file.sync_all();
}

#[test]
fn full_then_read_only_file_system() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mount) = Tmpfs::mount(&dir.path().join("mnt"), "24m") else {
        eprintln!("SKIP full_then_read_only_file_system: cannot mount a tmpfs (needs root)");
        return;
    };
    let data = mount.0.join("data");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // The log on the same file system, as with `keyholder serve 2>> /data/keyholder.log`.
    let log = mount.0.join("keyholder.log");
    rt.block_on(async {
        let mut server = Server::spawn_logging_to(&data, log.clone());
        server.wait_healthy().await;
        let platform = Platform::bind(&server).await;
        let stored = baseline(&platform).await;

        // Disk full.
        fill(&mount.0.join("filler"));
        let (mut acked, mut refused) = (Vec::new(), 0);
        for i in 0..24 {
            let service = format!("full-{i}");
            let token = format!("tok-full-{i}-{}", super::random_hex(8));
            let req = if i % 2 == 0 {
                platform.store(&service, json!({"accessToken": token, "note": super::random_hex(20_000)}))
            } else {
                platform.storage(json!({"operation": "set", "collection": "vault_config", "key": service,
                    "data": {"token": token, "blob": super::random_hex(200_000)}}))
            };
            let (status, body) = match platform.send(&req).await {
                Ok(answer) => answer,
                Err(err) => panic!("write {i} under a full disk: {err}; log: {}", server.log()),
            };
            if judge(status, &body) {
                acked.push((i, service, token));
            } else {
                refused += 1;
            }
            public_endpoints_answer(&platform).await;
        }
        let (reads_ok, reads_refused) = {
            let (mut ok, mut no) = (0, 0);
            for (service, _) in &stored {
                let (status, body) = platform.credential(service).await;
                if judge(status, &body) { ok += 1 } else { no += 1 }
            }
            (ok, no)
        };
        assert!(refused > 0, "the full disk never refused a write");
        assert!(server.alive(), "the server died on a full disk: {}", server.log());

        // Space again: writes work without a restart.
        std::fs::remove_file(mount.0.join("filler")).unwrap();
        let cleared = Instant::now();
        loop {
            let (status, body) = platform
                .send(&platform.store("after-full", json!({"accessToken": "tok-after"})))
                .await
                .unwrap();
            if status == 200 {
                break;
            }
            judge(status, &body);
            assert!(cleared.elapsed() < Duration::from_secs(10), "no recovery after the disk was freed");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_intact(&platform, &stored).await;
        for (i, service, token) in &acked {
            if i % 2 == 0 {
                assert_eq!(platform.credential(service).await.1["token"]["accessToken"], json!(token));
            } else {
                assert_eq!(platform.get("vault_config", service).await.1["token"], json!(token));
            }
        }
        eprintln!(
            "full disk: {refused} writes refused with 503, {} acknowledged (and kept); credential reads \
             during the fault: {reads_ok} served, {reads_refused} refused with 503 (their nonce cannot be \
             recorded); recovered {} ms after space was freed",
            acked.len(),
            cleared.elapsed().as_millis()
        );

        // Read-only file system. The kernel refuses `remount,ro` while the database is open for
        // writing (EBUSY), so the fault is applied between runs: the server refuses to start, clearly.
        server.stop();
        mount.remount("ro");
        let mut readonly = Server::spawn(&data);
        let deadline = Instant::now() + Duration::from_secs(20);
        while readonly.alive() {
            assert!(Instant::now() < deadline, "started on a read-only data folder: {}", readonly.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let log = readonly.log();
        eprintln!("read-only start: {}", log.lines().last().unwrap_or_default());
        mount.remount("rw");
        let server = Server::start(&data).await;
        let platform = platform.to(&server);
        assert_intact(&platform, &stored).await;
        drop(server);
    });
    integrity_check(&data);
}

#[test]
fn database_locked_by_another_process() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let rt = super::runtime();
    rt.block_on(async {
        let server = Server::start(&data).await;
        let platform = Platform::bind(&server).await;
        let stored = baseline(&platform).await;

        // Another process holds the write lock (in WAL mode readers are not blocked).
        let locker = rusqlite::Connection::open(data.join("keyholder.db")).unwrap();
        locker.execute_batch("BEGIN EXCLUSIVE").unwrap();
        let write = {
            let platform = platform.clone();
            tokio::spawn(async move {
                let t0 = Instant::now();
                let req = platform.storage(json!({"operation": "set", "collection": "vault_config",
                    "key": "locked", "data": {"x": 1}}));
                let (status, body) = platform.send(&req).await.unwrap();
                (status, body, t0.elapsed())
            })
        };
        // Meanwhile the public endpoints answer promptly.
        let mut worst = Duration::ZERO;
        for _ in 0..20 {
            let t0 = Instant::now();
            public_endpoints_answer(&platform).await;
            worst = worst.max(t0.elapsed());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (status, body, took) = write.await.unwrap();
        assert!(!judge(status, &body), "a write went through a held lock");
        locker.execute_batch("ROLLBACK").unwrap();
        drop(locker);
        let (status, body) = platform
            .send(&platform.storage(json!({"operation": "set", "collection": "vault_config", "key": "unlocked", "data": {"x": 2}})))
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
        assert_intact(&platform, &stored).await;
        eprintln!(
            "locked database: write refused with 503 after {} ms (busy timeout), public endpoints' worst \
             latency meanwhile {} ms, writes work again once the lock is released",
            took.as_millis(),
            worst.as_millis()
        );
        drop(server);
    });
    integrity_check(&data);
}
