//! Connection abuse: hundreds of idle connections, slowloris clients dribbling a header line a
//! second, and clients sending megabyte headers do not stop the keyholder serving others; memory
//! stays bounded and the server closes what never completes a request head in time.

use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{rss_mb, Platform, Server};

const IDLE: usize = 300;
const SLOW: usize = 200;
const HUGE: usize = 20;

/// Latencies of `n` credential fetches, sorted, milliseconds.
async fn control(platform: &Platform, n: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        let (status, body) = platform.credential("svc").await;
        assert_eq!(status, 200, "{body}");
        out.push(t0.elapsed().as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    out.sort_by(f64::total_cmp);
    out
}

fn pct(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// True when the server has closed the connection (EOF, reset, or an error status then EOF).
async fn closed_by_server(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

#[test]
fn idle_slow_and_huge_header_clients_do_not_stop_service() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let rt = super::runtime();
    rt.block_on(async {
        let mut server = Server::start(&data).await;
        let platform = Platform::bind(&server).await;
        let (status, _) = platform
            .send(&platform.store("svc", json!({"accessToken": "tok"})))
            .await
            .unwrap();
        assert_eq!(status, 200);
        let quiet = control(&platform, 40).await;
        let rss_before = rss_mb(server.pid());
        let addr = server.base.trim_start_matches("http://").to_string();

        let mut idle = Vec::new();
        for _ in 0..IDLE {
            idle.push(TcpStream::connect(&addr).await.unwrap());
        }
        // Slowloris: a request head that never ends, one header line a second.
        let mut slow_tasks = Vec::new();
        for i in 0..SLOW {
            let addr = addr.clone();
            slow_tasks.push(tokio::spawn(async move {
                let mut s = TcpStream::connect(&addr).await.unwrap();
                let started = Instant::now();
                if s.write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n").await.is_err() {
                    return started.elapsed();
                }
                for n in 0..60 {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let line = format!("X-Slow-{i}-{n}: {}\r\n", "a".repeat(8));
                    if s.write_all(line.as_bytes()).await.is_err() {
                        break;
                    }
                    if closed_by_server_now(&mut s).await {
                        break;
                    }
                }
                started.elapsed()
            }));
        }
        // Huge headers: 1 MiB in one header, and 200 headers.
        let mut huge_status = Vec::new();
        for i in 0..HUGE {
            let mut s = TcpStream::connect(&addr).await.unwrap();
            let head = if i % 2 == 0 {
                format!("GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "b".repeat(1 << 20))
            } else {
                let many: String = (0..200).map(|n| format!("X-H{n}: v\r\n")).collect();
                format!("GET /v1/health HTTP/1.1\r\nHost: x\r\n{many}\r\n")
            };
            let _ = s.write_all(head.as_bytes()).await;
            let mut buf = vec![0u8; 64];
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
            let status = match n {
                Ok(Ok(n)) if n >= 12 => String::from_utf8_lossy(&buf[9..12]).to_string(),
                _ => "closed".to_string(),
            };
            assert!(status != "200", "a {}-byte head was served", head.len());
            huge_status.push(status);
        }

        tokio::time::sleep(Duration::from_secs(2)).await;
        let loaded = control(&platform, 60).await;
        let rss_loaded = rss_mb(server.pid());

        // Nothing sent: closed after the request-head timeout.
        let idle_started = Instant::now();
        let mut idle_closed = 0;
        tokio::time::sleep(Duration::from_secs(9)).await;
        for s in idle.iter_mut() {
            if closed_by_server(s).await {
                idle_closed += 1;
            }
        }
        let slow_lived: Vec<Duration> =
            futures_util::future::join_all(slow_tasks).await.into_iter().map(|r| r.unwrap()).collect();
        let slow_max = slow_lived.iter().max().copied().unwrap_or_default();
        assert!(server.alive());
        eprintln!(
            "connections: control credential GET p50/p99 {:.1}/{:.1} ms quiet, {:.1}/{:.1} ms with {IDLE} idle, \
             {SLOW} slowloris and {HUGE} huge-header clients; huge heads answered {:?}; RSS {:.1} -> {:.1} MiB; \
             {idle_closed}/{IDLE} idle connections closed within {:.0} s; slowloris connections closed after at most {:.1} s",
            pct(&quiet, 0.5), pct(&quiet, 0.99), pct(&loaded, 0.5), pct(&loaded, 0.99),
            { let mut h = huge_status.clone(); h.dedup(); h },
            rss_before, rss_loaded,
            idle_started.elapsed().as_secs_f64() + 2.0,
            slow_max.as_secs_f64(),
        );
        assert!(pct(&loaded, 0.99) < 500.0, "control latency under abuse");
        assert!(rss_loaded - rss_before < 64.0, "memory grew by {} MiB", rss_loaded - rss_before);
        assert_eq!(idle_closed, IDLE, "idle connections kept open");
        assert!(slow_max < Duration::from_secs(20), "slowloris connection kept for {slow_max:?}");
        server.stop();
    });
}

/// Non-blocking check whether the server already closed (used between dribbled lines).
async fn closed_by_server_now(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1024];
    match tokio::time::timeout(Duration::from_millis(1), stream.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) => true,
        Err(_) => false,
    }
}
