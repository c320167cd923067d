//! A deliberately faulty webhook for the checker's own tests: the real keyholder (harness server on
//! its own temp folder) behind a small HTTP/1.1 front on 127.0.0.1 that injects exactly one
//! [`Fault`], each a defect seen in the wild (the public Python reference webhook). The checker run
//! against it must fail exactly the check that finds that fault.
//!
//! Like the reference, the front answers unsigned: it drops the identity from the bind exchange and
//! the `X-Keyholder-Signature` of every answer, so the checker runs unpinned and each fault reaches
//! the check's own logic (a pinned checker would refuse any altered answer for its signature alone).
//!
//! `restart_cmd()` is a shell command that asks the front to restart the keyholder behind it (stop,
//! start again on the same data folder); with [`Fault::NoReplayMemoryAcrossRestart`] the replay
//! memory is wiped in between, as a webhook that keeps it only in memory would.

use std::path::PathBuf;
use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

use crate::Keyholder;

/// One defect the front injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// None: the front forwards everything.
    None,
    /// `HEAD /v1/health` answers 405.
    HeadHealth405,
    /// `limit` gives no pagination (the `pagination` object is dropped from list answers).
    NoPagination,
    /// `list_batch` refused as an unknown operation.
    ListBatchRefused,
    /// A proxy ticket is accepted on `/v1/credential`.
    ProxyTicketOnCredential,
    /// A store ticket is accepted on `/v1/credential`.
    StoreTicketOnCredential,
    /// `X-Forwarded-For` is ignored, so the platform's address is not refused.
    PlatformAddressAccepted,
    /// A signed body that is not UTF-8 answers 500.
    NonUtf8Body500,
    /// `set` with data that is not an object is accepted.
    SetNonObjectAccepted,
    /// Replay memory is lost on restart.
    NoReplayMemoryAcrossRestart,
    /// A streamed proxy answer loses its end frame (truncated).
    StreamEndFrameMissing,
    /// A streamed proxy answer arrives with one body byte changed (the end frame kept).
    StreamBodyAltered,
}

/// The service the checker's streamed-answer check proxies for (`CheckOptions::stream_service`):
/// the keyholder behind the front lets it reach loopback upstreams.
pub const STREAM_SERVICE: &str = "keyholder-check-stream";

impl Fault {
    /// Every fault, with the check that must find it first, then any other check it breaks (a
    /// refused `list_batch` also hides what `totp_uri_sealed` reads through it).
    pub const ALL: &'static [(Fault, &'static [&'static str])] = &[
        (Fault::HeadHealth405, &["health_head"]),
        (Fault::NoPagination, &["storage_list_limit"]),
        (
            Fault::ListBatchRefused,
            &["storage_list_batch", "totp_uri_sealed", "aws_secret_sealed"],
        ),
        (
            Fault::ProxyTicketOnCredential,
            &["proxy_ticket_on_credential"],
        ),
        (Fault::StoreTicketOnCredential, &["wrong_purpose"]),
        (
            Fault::PlatformAddressAccepted,
            &["platform_address_refused"],
        ),
        (Fault::NonUtf8Body500, &["non_utf8_body"]),
        (Fault::SetNonObjectAccepted, &["storage_set_non_object"]),
        (
            Fault::NoReplayMemoryAcrossRestart,
            &["replay_after_restart"],
        ),
        (Fault::StreamEndFrameMissing, &["streamed_answer"]),
        (Fault::StreamBodyAltered, &["streamed_answer"]),
    ];
}

impl Fault {
    /// What the failed check's detail must say: it failed for this fault, not for another reason.
    pub fn finding(self) -> &'static str {
        match self {
            Fault::None => "",
            Fault::HeadHealth405 => "expected 200, got 405",
            Fault::NoPagination => "answered no pagination",
            Fault::ListBatchRefused => "HTTP 400 invalid_request",
            Fault::ProxyTicketOnCredential
            | Fault::StoreTicketOnCredential
            | Fault::PlatformAddressAccepted => "got 404 token_not_found",
            Fault::NonUtf8Body500 => "got 500",
            Fault::SetNonObjectAccepted => "expected 400, got 200",
            Fault::NoReplayMemoryAcrossRestart => {
                "after the restart: expected 401 auth_failed, got 200"
            }
            Fault::StreamEndFrameMissing | Fault::StreamBodyAltered => {
                "the streamed answer does not verify"
            }
        }
    }
}

struct Front {
    fault: Fault,
    backend: Mutex<Keyholder>,
    restart_flag: PathBuf,
    http: reqwest::Client,
}

/// The faulty webhook: its URL, its restart command, and the keyholder behind it.
pub struct FaultyWebhook {
    pub url: String,
    front: Arc<Front>,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl FaultyWebhook {
    /// Starts a keyholder and the front injecting `fault`.
    pub async fn start(fault: Fault) -> FaultyWebhook {
        let backend = Keyholder::start_with(|c| c.egress_allow_private = true).await;
        backend
            .egress("allow", STREAM_SERVICE, &["127.0.0.1"], false)
            .await;
        let dir = tempfile::tempdir().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let front = Arc::new(Front {
            fault,
            backend: Mutex::new(backend),
            restart_flag: dir.path().join("restart"),
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
        });
        let shared = front.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let front = shared.clone();
                tokio::spawn(async move {
                    let _ = serve(stream, &front).await;
                });
            }
        });
        FaultyWebhook {
            url,
            front,
            task,
            _dir: dir,
        }
    }

    /// A one-time bind code of the keyholder behind the front.
    pub async fn bind_code(&self) -> String {
        self.front.backend.lock().await.issue_code(false).code
    }

    /// The shell command that restarts the keyholder behind the front (on the next request).
    pub fn restart_cmd(&self) -> String {
        format!("touch '{}'", self.front.restart_flag.display())
    }
}

impl Drop for FaultyWebhook {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Restarts the backend when the restart command has run since the last request.
async fn restart_if_asked(front: &Front) {
    if std::fs::remove_file(&front.restart_flag).is_err() {
        return;
    }
    let mut backend = front.backend.lock().await;
    backend.stop().await;
    if front.fault == Fault::NoReplayMemoryAcrossRestart {
        let db = backend.data_dir.join(keyholder::store::DATABASE_FILE);
        let conn = rusqlite::Connection::open(db).unwrap();
        let tables: Vec<String> = conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE 'replay%'")
            .unwrap()
            .query_map([], |row| row.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(!tables.is_empty(), "no replay tables to wipe");
        for table in tables {
            conn.execute(&format!("DELETE FROM {table}"), []).unwrap();
        }
    }
    backend.restart().await;
}

fn ticket_purpose(target: &str) -> Option<String> {
    let query = target.split_once('?')?.1;
    let ticket = url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "ticket")?
        .1
        .into_owned();
    let payload = URL_SAFE_NO_PAD.decode(ticket.split('.').next()?).ok()?;
    let claims: Value = serde_json::from_slice(&payload).ok()?;
    claims["pur"].as_str().map(str::to_owned)
}

/// The front's own answer for a request its fault changes, or `None` to forward it.
fn injected(fault: Fault, method: &str, target: &str, body: &[u8]) -> Option<(u16, Value)> {
    let path = target.split('?').next().unwrap_or_default();
    let doc: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    match fault {
        Fault::HeadHealth405 if method == "HEAD" && path == "/v1/health" => {
            Some((405, json!({"detail": "Method Not Allowed"})))
        }
        Fault::ListBatchRefused if path == "/v1/storage" && doc["operation"] == "list_batch" => {
            Some((
                400,
                json!({"error": "invalid_request", "message": "unknown operation"}),
            ))
        }
        Fault::ProxyTicketOnCredential | Fault::StoreTicketOnCredential
            if path == "/v1/credential" =>
        {
            let accepted = if fault == Fault::ProxyTicketOnCredential {
                "proxy"
            } else {
                "store"
            };
            (ticket_purpose(target).as_deref() == Some(accepted)).then(|| {
                (
                    404,
                    json!({"error": "token_not_found", "message": "no credential stored"}),
                )
            })
        }
        Fault::NonUtf8Body500 if method == "POST" && std::str::from_utf8(body).is_err() => {
            Some((500, json!({"detail": "Internal Server Error"})))
        }
        Fault::SetNonObjectAccepted
            if path == "/v1/storage" && doc["operation"] == "set" && !doc["data"].is_object() =>
        {
            Some((200, json!({"status": "ok"})))
        }
        _ => None,
    }
}

async fn serve(mut stream: TcpStream, front: &Front) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 || buf.len() > 1024 * 1024 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next().unwrap_or_default().split(' ');
    let method = request_line.next().unwrap_or_default().to_string();
    let target = request_line.next().unwrap_or_default().to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    restart_if_asked(front).await;

    let (status, answer_headers, answer) = match injected(front.fault, &method, &target, &body) {
        Some((status, value)) => (
            status,
            vec![("content-type".to_owned(), "application/json".to_owned())],
            value.to_string().into_bytes(),
        ),
        None => forward(front, &method, &target, &headers, body).await,
    };
    let mut out = format!("HTTP/1.1 {status} Faulty\r\n");
    for (name, value) in &answer_headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("Connection: close\r\n");
    out.push_str(&format!("Content-Length: {}\r\n\r\n", answer.len()));
    stream.write_all(out.as_bytes()).await?;
    if method != "HEAD" {
        stream.write_all(&answer).await?;
    }
    stream.flush().await?;
    let _ = stream.shutdown().await;
    Ok(())
}

async fn forward(
    front: &Front,
    method: &str,
    target: &str,
    headers: &[(String, String)],
    body: Vec<u8>,
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let url = front.backend.lock().await.url(target);
    let mut req = front
        .http
        .request(reqwest::Method::from_bytes(method.as_bytes()).unwrap(), url);
    for (name, value) in headers {
        let hop = ["host", "content-length", "connection", "transfer-encoding"];
        let dropped = hop.contains(&name.as_str())
            || (front.fault == Fault::PlatformAddressAccepted && name == "x-forwarded-for");
        if !dropped {
            req = req.header(name, value);
        }
    }
    let resp = req.body(body).send().await.unwrap();
    let status = resp.status().as_u16();
    let headers: Vec<(String, String)> = resp
        .headers()
        .iter()
        .filter(|(n, _)| {
            !["content-length", "connection", "transfer-encoding"].contains(&n.as_str())
        })
        .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or_default().to_owned()))
        .collect();
    let bytes = resp.bytes().await.unwrap().to_vec();
    let path = target.split('?').next().unwrap_or_default();
    let dropped = match (front.fault, path) {
        (_, "/v1/exchange") => Some("signingKey"),
        (Fault::NoPagination, "/v1/storage") => Some("pagination"),
        _ => None,
    };
    let mut bytes = match (dropped, serde_json::from_slice::<Value>(&bytes)) {
        (Some(field), Ok(Value::Object(mut map))) if map.contains_key(field) => {
            map.remove(field);
            Value::Object(map).to_string().into_bytes()
        }
        _ => bytes,
    };
    let streamed = headers.iter().any(|(n, v)| {
        n == "x-keyholder-signature" && keyholder_protocol::response_stream::is_stream_header(v)
    });
    let frame = keyholder_protocol::response_stream::END_FRAME_LEN;
    match front.fault {
        Fault::StreamEndFrameMissing if streamed && bytes.len() >= frame => {
            bytes.truncate(bytes.len() - frame);
        }
        Fault::StreamBodyAltered if streamed && bytes.len() > frame => {
            bytes[0] ^= 0x20;
        }
        _ => {}
    }
    (status, headers, bytes)
}
