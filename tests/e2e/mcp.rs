//! A real MCP session through `/v1/proxy` (issue 20): the official MCP Python SDK's server
//! (`tests/mcp/mcp_server.py`, streamable HTTP, SSE and JSON modes) on 127.0.0.1 behind a
//! keyholder, driven as the platform drives it, every answer read with the SDK's
//! `Platform::proxy_stream` (head verified at once, body incrementally, end frame at the end).
//! The `mcp` package comes from `KEYHOLDER_MCP_PYTHON` (set by `.ci/run`) or a venv made under
//! `target/mcp-venv` on first use.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keyholder_client::{IdentityPin, Platform, ProxyCall};
use keyholder_protocol::Purpose;
use keyholder_tests::*;
use serde_json::{json, Value};

use crate::proxy::proxy_keyholder;

/// A Python interpreter that can import the MCP SDK.
fn mcp_python() -> PathBuf {
    keyholder_tests::python::python_with(
        "KEYHOLDER_MCP_PYTHON",
        "mcp-venv",
        "mcp.server.fastmcp",
        "mcp>=1.10,<2",
    )
}

/// The MCP server process; killed when dropped.
struct McpServer {
    child: Child,
    url: String,
}

impl McpServer {
    async fn start(json_mode: bool) -> McpServer {
        let python = mcp_python();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("mcp/mcp_server.py");
        let mut cmd = Command::new(python);
        cmd.arg(script).arg(port.to_string());
        if json_mode {
            cmd.arg("json");
        }
        let child = cmd.stdout(Stdio::null()).spawn().unwrap();
        let server = McpServer {
            child,
            url: format!("http://127.0.0.1:{port}/mcp"),
        };
        let t0 = Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "MCP server did not start"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        server
    }
}

impl Drop for McpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The platform's side: the SDK with the keyholder's identity pinned.
async fn platform(kh: &Keyholder) -> Platform {
    let answer = read(kh.http.get(kh.url("/v1/identity")).send().await.unwrap()).await;
    let doc: keyholder_protocol::IdentityDocument = serde_json::from_value(answer.json()).unwrap();
    kh.sdk_builder()
        .pin_identity(IdentityPin::document(&doc).unwrap())
        .platform(keyholder_protocol::HmacSecret::from_bytes(
            *kh.secret.as_ref().unwrap().expose(),
        ))
        .unwrap()
}

/// One MCP HTTP request through `/v1/proxy`, its answer read to the (verified) end: status, the
/// upstream's session id, and each JSON-RPC message with its arrival time since the call.
struct Exchange {
    status: u16,
    session: Option<String>,
    content_type: String,
    messages: Vec<(Duration, Value)>,
}

fn mcp_call(
    server: &McpServer,
    method: &str,
    session: Option<&str>,
    body: Option<&Value>,
) -> ProxyCall {
    let mut call = ProxyCall::new(server.url.clone())
        .method(method)
        .header("Accept", "application/json, text/event-stream")
        .header("MCP-Protocol-Version", "2025-06-18")
        .template("Authorization", "Bearer ${TOKEN}");
    if let Some(session) = session {
        call = call.header("Mcp-Session-Id", session);
    }
    if let Some(body) = body {
        call = call
            .header("Content-Type", "application/json")
            .body(serde_json::to_vec(body).unwrap());
    }
    call
}

/// Reads a proxied MCP answer to its end: SSE events or one JSON body.
async fn exchange(kh: &Keyholder, p: &Platform, call: ProxyCall) -> Exchange {
    let t0 = Instant::now();
    let ticket = kh.ticket(Purpose::Proxy, "github");
    let mut stream = p.proxy_stream(&ticket, "github", &call).await.unwrap();
    let header = |n: &str| {
        stream
            .headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let (status, session) = (stream.status, header("mcp-session-id"));
    let content_type = header("content-type").unwrap_or_default();
    let mut messages = Vec::new();
    let mut pending = Vec::new();
    while let Some(chunk) = stream.next_chunk().await.expect("verified to its end") {
        if content_type.starts_with("text/event-stream") {
            // sse-starlette ends lines with CR LF; JSON text never holds a raw CR.
            pending.extend(chunk.iter().filter(|b| **b != b'\r'));
        } else {
            pending.extend_from_slice(&chunk);
        }
        if content_type.starts_with("text/event-stream") {
            take_events(&mut pending, t0.elapsed(), &mut messages);
        }
    }
    if !content_type.starts_with("text/event-stream") && !pending.is_empty() {
        messages.push((t0.elapsed(), serde_json::from_slice(&pending).unwrap()));
    }
    Exchange {
        status,
        session,
        content_type,
        messages,
    }
}

/// Moves every complete SSE event's `data` (JSON) out of `pending`.
fn take_events(pending: &mut Vec<u8>, at: Duration, out: &mut Vec<(Duration, Value)>) {
    while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
        let event: Vec<u8> = pending.drain(..end + 2).collect();
        let text = String::from_utf8_lossy(&event);
        let data: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(str::trim_start)
            .collect();
        if !data.is_empty() {
            out.push((at, serde_json::from_str(&data.join("\n")).unwrap()));
        }
    }
}

fn request(id: u64, method: &str, params: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params})
}

fn initialize() -> Value {
    request(
        1,
        "initialize",
        json!({"protocolVersion": "2025-06-18", "capabilities": {},
               "clientInfo": {"name": "keyholder-e2e", "version": "1"}}),
    )
}

/// Initialize and `notifications/initialized`: the session id.
async fn open_session(kh: &Keyholder, p: &Platform, server: &McpServer) -> String {
    let init = exchange(kh, p, mcp_call(server, "POST", None, Some(&initialize()))).await;
    assert_eq!(init.status, 200);
    assert_eq!(
        init.messages.last().unwrap().1["result"]["serverInfo"]["name"],
        "keyholder-e2e"
    );
    let session = init.session.expect("Mcp-Session-Id passes through");
    let note = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    let done = exchange(kh, p, mcp_call(server, "POST", Some(&session), Some(&note))).await;
    assert_eq!(done.status, 202);
    session
}

fn tool_call(id: u64, name: &str, arguments: Value, progress: Option<&str>) -> Value {
    let mut params = json!({"name": name, "arguments": arguments});
    if let Some(token) = progress {
        params["_meta"] = json!({"progressToken": token});
    }
    request(id, "tools/call", params)
}

fn result_text(message: &Value) -> String {
    message["result"]["content"][0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_mcp_session_streams_through_the_proxy() {
    let kh = proxy_keyholder(|_| {}).await;
    let server = McpServer::start(false).await;
    let p = platform(&kh).await;
    let session = open_session(&kh, &p, &server).await;

    // The server-initiated event stream (GET), read in parallel with the calls below.
    let get_stream = {
        let (kh_ref, p_ref, server_ref, session) = (&kh, &p, &server, session.clone());
        async move {
            let t0 = Instant::now();
            let ex = exchange(
                kh_ref,
                p_ref,
                mcp_call(server_ref, "GET", Some(&session), None),
            )
            .await;
            (t0, ex)
        }
    };
    let calls = async {
        // Let the GET stream open, then start the server's notifications (every 10 s).
        tokio::time::sleep(Duration::from_millis(500)).await;
        let ticker_started = Instant::now();
        let ticker = exchange(
            &kh,
            &p,
            mcp_call(
                &server,
                "POST",
                Some(&session),
                Some(&tool_call(
                    2,
                    "start_ticker",
                    json!({"interval": 10.0}),
                    None,
                )),
            ),
        )
        .await;
        assert_eq!(result_text(&ticker.messages.last().unwrap().1), "ticking");

        let tools = exchange(
            &kh,
            &p,
            mcp_call(
                &server,
                "POST",
                Some(&session),
                Some(&request(3, "tools/list", json!({}))),
            ),
        )
        .await;
        assert!(tools.content_type.starts_with("text/event-stream"));
        let names: Vec<String> = tools.messages.last().unwrap().1["result"]["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap().to_string())
            .collect();
        assert!(names.contains(&"count".to_string()), "{names:?}");

        // A tool streaming progress: the events arrive as sent, before the tool ends.
        let short = exchange(
            &kh,
            &p,
            mcp_call(
                &server,
                "POST",
                Some(&session),
                Some(&tool_call(
                    4,
                    "count",
                    json!({"steps": 6, "interval": 0.3}),
                    Some("p1"),
                )),
            ),
        )
        .await;
        let progress: Vec<Duration> = short
            .messages
            .iter()
            .filter(|(_, m)| m["method"] == "notifications/progress")
            .map(|(t, _)| *t)
            .collect();
        let (end_at, end) = short.messages.last().unwrap();
        assert_eq!(result_text(end), "counted 6");
        assert_eq!(progress.len(), 6);
        eprintln!("mcp: progress events arrived at {progress:?}, the result at {end_at:?}");
        assert!(
            progress[0] < Duration::from_millis(600),
            "first progress after {:?}",
            progress[0]
        );
        assert!(
            *end_at >= progress[0] + Duration::from_millis(1400),
            "{progress:?} {end_at:?}"
        );
        assert!(
            progress[5] > progress[0] + Duration::from_millis(1200),
            "progress bunched: {progress:?}"
        );

        // A 40 s tool call with progress every 0.5 s: longer than the old 30 s total limit.
        let long_started = Instant::now();
        let long = exchange(
            &kh,
            &p,
            mcp_call(
                &server,
                "POST",
                Some(&session),
                Some(&tool_call(
                    5,
                    "count",
                    json!({"steps": 80, "interval": 0.5}),
                    Some("p2"),
                )),
            ),
        )
        .await;
        assert_eq!(long.status, 200);
        assert_eq!(result_text(&long.messages.last().unwrap().1), "counted 80");
        let long_progress = long
            .messages
            .iter()
            .filter(|(_, m)| m["method"] == "notifications/progress")
            .count();
        assert_eq!(long_progress, 80);
        assert!(long_started.elapsed() >= Duration::from_secs(40));

        // DELETE ends the session (and with it the GET stream); the id is then unknown.
        let deleted = exchange(&kh, &p, mcp_call(&server, "DELETE", Some(&session), None)).await;
        assert_eq!(deleted.status, 200);
        let after = exchange(
            &kh,
            &p,
            mcp_call(
                &server,
                "POST",
                Some(&session),
                Some(&request(6, "tools/list", json!({}))),
            ),
        )
        .await;
        assert_eq!(after.status, 404);
        ticker_started
    };
    let ((get_opened, get), ticker_started) = tokio::join!(get_stream, calls);
    assert_eq!(get.status, 200);
    assert!(get.content_type.starts_with("text/event-stream"));
    let notes: Vec<Duration> = get
        .messages
        .iter()
        .filter(|(_, m)| m["method"] == "notifications/tools/list_changed")
        .map(|(t, _)| *t)
        .collect();
    let first_after_start = (get_opened + notes[0]).duration_since(ticker_started);
    eprintln!("mcp: GET stream notifications at {notes:?} after it opened; the first {first_after_start:?} after the ticker started");
    assert!(
        first_after_start < Duration::from_secs(1),
        "first notification {first_after_start:?} after the ticker started"
    );
    assert!(
        notes.iter().any(|t| *t > Duration::from_secs(31)),
        "the GET stream stayed open past 30 s: {notes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mcp_session_in_json_mode() {
    let kh = proxy_keyholder(|_| {}).await;
    let server = McpServer::start(true).await;
    let p = platform(&kh).await;
    let session = open_session(&kh, &p, &server).await;
    let tools = exchange(
        &kh,
        &p,
        mcp_call(
            &server,
            "POST",
            Some(&session),
            Some(&request(2, "tools/list", json!({}))),
        ),
    )
    .await;
    assert!(
        tools.content_type.starts_with("application/json"),
        "{}",
        tools.content_type
    );
    assert_eq!(tools.messages.len(), 1);
    let echo = exchange(
        &kh,
        &p,
        mcp_call(
            &server,
            "POST",
            Some(&session),
            Some(&tool_call(
                3,
                "echo",
                json!({"text": "through the keyholder"}),
                None,
            )),
        ),
    )
    .await;
    assert_eq!(result_text(&echo.messages[0].1), "through the keyholder");
    let deleted = exchange(&kh, &p, mcp_call(&server, "DELETE", Some(&session), None)).await;
    assert_eq!(deleted.status, 200);
}
