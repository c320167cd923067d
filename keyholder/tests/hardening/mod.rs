//! Hardening tests on the built binary (issue 9): SIGKILL in the middle of durable writes, storage
//! faults (full and read-only file systems, a database locked by another process), and connection
//! abuse (idle and slowloris clients, huge headers). Shared here: start/kill a `keyholder serve`
//! child process, bind it, and speak the protocol to it as the platform and the browser do.

mod connections;
mod crash;
mod policy_caps;
mod storage_faults;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use keyholder_protocol::paths::*;
use keyholder_protocol::signing::signature_header_value;
use keyholder_protocol::ticket::encode_ticket;
use keyholder_protocol::{HmacSecret, Purpose, TicketClaims};
use serde_json::{json, Value};

use super::harness::{bind_json, free_port, now, wait_healthy, BIN};
pub use super::harness::{random_hex, runtime};

/// A `keyholder serve` child process; SIGKILLed when dropped.
pub struct Server {
    child: Child,
    pub base: String,
    pub data: PathBuf,
    /// stderr of the process, outside the data folder (which may be on a full or read-only mount).
    log: PathBuf,
}

impl Server {
    /// Starts `keyholder serve` on `data` (a fresh port) without waiting.
    pub fn spawn(data: &Path) -> Server {
        let log = std::env::temp_dir().join(format!("keyholder-hardening-{}.log", random_hex(6)));
        Self::spawn_logging_to(data, log)
    }

    /// Like [`Server::spawn`], with stderr appended to `log_path`.
    pub fn spawn_logging_to(data: &Path, log_path: PathBuf) -> Server {
        let port = free_port();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap();
        let child = Command::new(BIN)
            .arg("serve")
            .env("KEYHOLDER_DATA_DIR", data)
            .env("KEYHOLDER_LISTEN", format!("127.0.0.1:{port}"))
            .env("KEYHOLDER_PUBLIC_URL", "https://kh.example.org")
            .env("KEYHOLDER_WORKERS", "2")
            .env("KEYHOLDER_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Server {
            child,
            base: format!("http://127.0.0.1:{port}"),
            data: data.to_path_buf(),
            log: log_path,
        }
    }

    /// Starts one and waits until `/v1/health` answers.
    pub async fn start(data: &Path) -> Server {
        let mut server = Server::spawn(data);
        server.wait_healthy().await;
        server
    }

    pub async fn wait_healthy(&mut self) {
        let base = self.base.clone();
        wait_healthy(&client(), &base, Duration::from_secs(30), || {
            let status = self.child.try_wait().unwrap()?;
            Some(format!("{status}: {}", self.log()))
        })
        .await
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "{status:?}: {}", self.log());
    }

    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// The server's log (stderr) so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A client that never reuses a connection across a restart.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// Resident memory of a process, MiB.
pub fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// A prepared request: sent as is, and sent again to prove a replay is refused.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub path: &'static str,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

/// The platform and the browser, speaking to one keyholder.
#[derive(Clone)]
pub struct Platform {
    pub http: reqwest::Client,
    pub base: String,
    pub secret: Arc<HmacSecret>,
}

impl Platform {
    /// Binds the keyholder in `data` (owner's CLI, then the platform's exchange).
    pub async fn bind(server: &Server) -> Platform {
        let issued = bind_json(&server.data);
        let http = client();
        let answer: Value = http
            .post(format!("{}{PATH_EXCHANGE}", server.base))
            .json(&json!({ "code": issued["code"] }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let secret = HmacSecret::from_base64(answer["hmacSecret"].as_str().unwrap()).unwrap();
        Platform {
            http,
            base: server.base.clone(),
            secret: Arc::new(secret),
        }
    }

    /// The same platform talking to a restarted server.
    pub fn to(&self, server: &Server) -> Platform {
        Platform {
            http: client(),
            base: server.base.clone(),
            secret: Arc::clone(&self.secret),
        }
    }

    pub fn ticket(&self, purpose: Purpose, service: &str) -> String {
        let n = now();
        let claims = TicketClaims::new("u", service, purpose, n, n + 600, random_hex(16));
        encode_ticket(&self.secret, &claims)
    }

    /// A browser `/v1/store` of `tokenData`.
    pub fn store(&self, service: &str, token_data: Value) -> Prepared {
        let ticket = self.ticket(Purpose::Store, service);
        Prepared {
            path: PATH_STORE,
            headers: vec![("content-type", "application/json".into())],
            body: serde_json::to_vec(
                &json!({"ticket": ticket, "service": service, "tokenData": token_data}),
            )
            .unwrap(),
        }
    }

    /// A signed `/v1/storage` call with a fresh request id.
    pub fn storage(&self, mut body: Value) -> Prepared {
        let rid = format!("req_{}", random_hex(12));
        body["requestId"] = json!(rid);
        let raw = serde_json::to_vec(&body).unwrap();
        let ts = now();
        Prepared {
            path: PATH_STORAGE,
            headers: vec![
                ("content-type", "application/json".into()),
                (
                    HEADER_SIGNATURE,
                    signature_header_value(&self.secret, ts, &raw),
                ),
                (HEADER_TIMESTAMP, ts.to_string()),
                (HEADER_PLATFORM_REQUEST_ID, rid),
            ],
            body: raw,
        }
    }

    /// Sends a prepared request: status and JSON body, or the transport error.
    pub async fn send(&self, req: &Prepared) -> Result<(u16, Value), reqwest::Error> {
        let mut builder = self
            .http
            .post(format!("{}{}", self.base, req.path))
            .body(req.body.clone());
        for (name, value) in &req.headers {
            builder = builder.header(*name, value);
        }
        let resp = builder.send().await?;
        let status = resp.status().as_u16();
        let body = resp.bytes().await?;
        Ok((status, serde_json::from_slice(&body).unwrap_or(Value::Null)))
    }

    /// The agent's credential fetch with a fresh ticket.
    pub async fn credential(&self, service: &str) -> (u16, Value) {
        let ticket = self.ticket(Purpose::AgentCredential, service);
        let resp = self
            .http
            .get(format!("{}{PATH_CREDENTIAL}", self.base))
            .query(&[("ticket", ticket.as_str()), ("service", service)])
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// `storage get` of one document: status and `data`.
    pub async fn get(&self, collection: &str, key: &str) -> (u16, Value) {
        let req = self.storage(json!({"operation": "get", "collection": collection, "key": key}));
        let (status, body) = self.send(&req).await.unwrap();
        (status, body["data"].clone())
    }

    /// Every key of a collection.
    pub async fn keys(&self, collection: &str) -> std::collections::BTreeSet<String> {
        let req = self.storage(json!({"operation": "list", "collection": collection}));
        let (status, body) = self.send(&req).await.unwrap();
        assert_eq!(status, 200, "{body}");
        body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["key"].as_str().unwrap().to_string())
            .collect()
    }
}

/// `PRAGMA integrity_check` of a stopped keyholder's database.
pub fn integrity_check(data: &Path) {
    let conn = rusqlite::Connection::open(data.join("keyholder.db")).unwrap();
    let result: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(result, "ok");
}
