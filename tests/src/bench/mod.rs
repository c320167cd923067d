//! `keyholder-bench`: starts a fresh release keyholder (temp data folder, real SQLite, fsync on)
//! and a bare actix-web baseline as child processes, drives both with an in-process load
//! generator that mints a fresh ticket, nonce and request id per request, and reports figures as
//! ratios measured in one run.

pub mod http1;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use keyholder_protocol::paths::*;
use keyholder_protocol::signing::signature_header_value;
use keyholder_protocol::ticket::encode_ticket;
use keyholder_protocol::{HmacSecret, Purpose, TicketClaims};
use serde_json::{json, Value};

use http1::{request, Connection};

/// How long and how hard to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Seconds of load per scenario and connection count.
    pub seconds: f64,
    /// Round-robin rounds the seconds are split into.
    pub rounds: usize,
    /// Connection counts.
    pub connections: Vec<usize>,
    /// The `keyholder` binary.
    pub keyholder_bin: PathBuf,
    /// Server worker threads (keyholder and baseline alike).
    pub workers: usize,
    /// Scenarios to run (all when empty).
    pub only: Vec<String>,
}

/// One scenario at one connection count.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ScenarioResult {
    /// Scenario name.
    pub scenario: String,
    /// Concurrent connections.
    pub connections: usize,
    /// Requests answered with the expected status.
    pub ok: u64,
    /// Requests answered otherwise, or failed.
    pub errors: u64,
    /// Failed requests by status (0: no answer).
    pub error_statuses: std::collections::BTreeMap<u16, u64>,
    /// Successful requests per second.
    pub rps: f64,
    /// Latency percentiles, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// CPU time the server process (keyholder, baseline or forwarder) spent per answered
    /// request, microseconds (all its threads; the load generator not included).
    pub server_cpu_us: Option<f64>,
}

/// Makes the bytes of request number `n`.
pub type RequestFactory = Arc<dyn Fn(u64) -> Vec<u8> + Send + Sync>;

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
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

/// A child server that is killed when dropped.
pub struct ChildServer {
    child: Child,
    /// Its address.
    pub addr: SocketAddr,
}

impl ChildServer {
    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn wait_healthy(addr: SocketAddr, path: &str, limit: Duration) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let req = request("GET", path, &[], b"");
    loop {
        if let Ok(mut conn) = Connection::open(addr).await {
            if let Ok((200, _)) = conn.send(&req).await {
                return Ok(started.elapsed());
            }
        }
        if started.elapsed() > limit {
            bail!("{addr} did not become healthy within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Starts the keyholder on a fresh data folder; returns it and the time to a healthy `/v1/health`.
pub async fn start_keyholder(
    opts: &BenchOptions,
    data_dir: &Path,
) -> anyhow::Result<(ChildServer, Duration)> {
    start_keyholder_with(opts, data_dir, &[]).await
}

/// [`start_keyholder`] with extra environment variables (`credential_traced`: an OTLP endpoint).
pub async fn start_keyholder_with(
    opts: &BenchOptions,
    data_dir: &Path,
    env: &[(&str, String)],
) -> anyhow::Result<(ChildServer, Duration)> {
    let port = free_port()?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    // `KEYHOLDER_BENCH_LOG=<filter>` shows the server's log on stderr (to study a run).
    let log = std::env::var("KEYHOLDER_BENCH_LOG").ok();
    let spawned = Instant::now();
    let child = Command::new(&opts.keyholder_bin)
        .arg("serve")
        .env("KEYHOLDER_DATA_DIR", data_dir)
        .env("KEYHOLDER_LISTEN", addr.to_string())
        .env("KEYHOLDER_PUBLIC_URL", "https://bench.invalid")
        .env("KEYHOLDER_WORKERS", opts.workers.to_string())
        .env("KEYHOLDER_LOG", log.as_deref().unwrap_or("warn"))
        .env("KEYHOLDER_EGRESS_ALLOW_PRIVATE", "true")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::null())
        .stderr(match log {
            Some(_) => Stdio::inherit(),
            None => Stdio::null(),
        })
        .spawn()
        .with_context(|| format!("cannot start {}", opts.keyholder_bin.display()))?;
    let server = ChildServer { child, addr };
    wait_healthy(addr, PATH_HEALTH, Duration::from_secs(30)).await?;
    Ok((server, spawned.elapsed()))
}

/// Starts this same binary as a helper server on a free loopback port: `--<mode> <addr>` followed by
/// `args`, healthy once `/` answers 200.
async fn start_helper(mode: &str, args: &[String]) -> anyhow::Result<ChildServer> {
    let port = free_port()?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let child = Command::new(std::env::current_exe()?)
        .arg(format!("--{mode}"))
        .arg(addr.to_string())
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let server = ChildServer { child, addr };
    wait_healthy(addr, "/", Duration::from_secs(10)).await?;
    Ok(server)
}

/// Starts the baseline server: this same binary in `--serve-baseline` mode.
pub async fn start_baseline(workers: usize) -> anyhow::Result<ChildServer> {
    start_helper("serve-baseline", &["--workers".into(), workers.to_string()]).await
}

/// The baseline: a bare actix-web handler returning a small JSON body.
pub fn serve_baseline(addr: SocketAddr, workers: usize) -> anyhow::Result<()> {
    use actix_web::{web, App, HttpResponse, HttpServer};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        HttpServer::new(|| {
            App::new()
                .route(LARGE_PATH, web::get().to(large_answer))
                .route(EVENTS_PATH, web::get().to(event_stream))
                .route(OTLP_TRACES_PATH, web::post().to(otlp_sink))
                .default_service(web::to(|| async {
                    HttpResponse::Ok().json(json!({"status": "ok", "service": "baseline"}))
                }))
        })
        .workers(workers)
        .bind(addr)?
        .run()
        .await
    })?;
    Ok(())
}

/// The baseline is also the OTLP/HTTP collector of `credential_traced`: it reads each export
/// whole and answers an empty success.
pub const OTLP_TRACES_PATH: &str = "/v1/traces";

async fn otlp_sink(mut payload: actix_web::web::Payload) -> actix_web::HttpResponse {
    use futures_util::StreamExt as _;
    while let Some(chunk) = payload.next().await {
        if chunk.is_err() {
            return actix_web::HttpResponse::BadRequest().finish();
        }
    }
    actix_web::HttpResponse::Ok()
        .content_type("application/json")
        .body("{}")
}

/// The baseline's 1 MiB answer (`proxy_large`).
pub const LARGE_PATH: &str = "/api/large";
/// The baseline's event stream: [`STREAM_EVENTS`] SSE events [`STREAM_GAP`] apart (`proxy_stream`).
pub const EVENTS_PATH: &str = "/api/events";
/// Events per stream.
pub const STREAM_EVENTS: usize = 10;
/// Pause between two events.
pub const STREAM_GAP: Duration = Duration::from_millis(5);

async fn large_answer() -> actix_web::HttpResponse {
    static BODY: std::sync::OnceLock<actix_web::web::Bytes> = std::sync::OnceLock::new();
    let body = BODY.get_or_init(|| actix_web::web::Bytes::from(vec![b'x'; 1 << 20]));
    actix_web::HttpResponse::Ok()
        .content_type("application/octet-stream")
        .body(body.clone())
}

async fn event_stream() -> actix_web::HttpResponse {
    let events = futures_util::stream::unfold(0usize, |i| async move {
        if i >= STREAM_EVENTS {
            return None;
        }
        if i > 0 {
            tokio::time::sleep(STREAM_GAP).await;
        }
        let event = actix_web::web::Bytes::from(format!("event: message\ndata: {{\"n\":{i}}}\n\n"));
        Some((Ok::<_, std::io::Error>(event), i + 1))
    });
    actix_web::HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .streaming(events)
}

/// Time to the first event and the number of events of one streamed answer, read raw from a
/// fresh connection (`request` asks for an event stream, directly or through `/v1/proxy`).
pub async fn first_event(addr: SocketAddr, request: &[u8]) -> anyhow::Result<(Duration, usize)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut req = request.to_vec();
    if let Some(pos) = req.windows(2).position(|w| w == b"\r\n") {
        req.splice(pos + 2..pos + 2, b"Connection: close\r\n".iter().copied());
    }
    let started = Instant::now();
    stream.write_all(&req).await?;
    let mut out = Vec::new();
    let mut first = None;
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        out.extend_from_slice(&chunk[..n]);
        if first.is_none() && out.windows(6).any(|w| w == b"data: ") {
            first = Some(started.elapsed());
        }
    }
    let events = out.windows(6).filter(|w| *w == b"data: ").count();
    Ok((first.context("no event arrived")?, events))
}

/// `/v1/proxy` to `path` on `upstream`.
pub fn proxy_path_factory(
    secret: Arc<HmacSecret>,
    upstream: SocketAddr,
    path: &'static str,
) -> RequestFactory {
    Arc::new(move |n| {
        let service = format!("bench-{:03}", n % 100);
        let t = ticket(&secret, Purpose::Proxy, &service, n);
        let body = serde_json::to_vec(&json!({
            "ticket": t, "service": service,
            "upstream": {"url": format!("http://{upstream}{path}"), "method": "GET"},
            "headerTemplates": {"Authorization": "Bearer ${TOKEN}"}
        }))
        .unwrap_or_default();
        signed_request(&secret, PATH_PROXY, &body, n)
    })
}

/// Starts the bare forwarder (this same binary in `--serve-forwarder` mode) in front of `upstream`.
pub async fn start_forwarder(workers: usize, upstream: SocketAddr) -> anyhow::Result<ChildServer> {
    let args = [
        "--forward-to".into(),
        upstream.to_string(),
        "--workers".into(),
        workers.to_string(),
    ];
    start_helper("serve-forwarder", &args).await
}

/// The floor of any forwarding proxy built from the keyholder's parts: a bare actix-web handler
/// that sends each request on to `upstream` with a pooled `reqwest` client per worker thread (as the
/// keyholder does) and returns the answer. No ticket, replay mark, credential or signature.
pub fn serve_forwarder(
    addr: SocketAddr,
    upstream: SocketAddr,
    workers: usize,
) -> anyhow::Result<()> {
    use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
    thread_local! {
        static CLIENT: reqwest::Client = reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(256)
            .tcp_nodelay(true)
            .build()
            .unwrap_or_default();
    }
    async fn forward(req: HttpRequest, upstream: web::Data<SocketAddr>) -> HttpResponse {
        let url = format!("http://{}{}", upstream.get_ref(), req.path());
        let client = CLIENT.with(Clone::clone);
        match client
            .get(url)
            .header("Accept", "application/json")
            .send()
            .await
        {
            Ok(answer) => {
                let status = answer.status().as_u16();
                match answer.bytes().await {
                    Ok(body) => HttpResponse::build(
                        actix_web::http::StatusCode::from_u16(status)
                            .unwrap_or(actix_web::http::StatusCode::BAD_GATEWAY),
                    )
                    .content_type("application/json")
                    .body(body),
                    Err(_) => HttpResponse::BadGateway().finish(),
                }
            }
            Err(_) => HttpResponse::BadGateway().finish(),
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        HttpServer::new(move || {
            App::new()
                .app_data(web::Data::new(upstream))
                .default_service(web::to(forward))
        })
        .workers(workers)
        .bind(addr)?
        .run()
        .await
    })?;
    Ok(())
}

/// CPU time (user + system, all threads) a process has used so far, seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    // Fields 14 and 15 of /proc/<pid>/stat, in clock ticks (USER_HZ, 100 on Linux).
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // The command name (field 2) may hold spaces: count from the closing parenthesis.
            let rest = &s[s.rfind(')')? + 2..];
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let utime: f64 = fields.get(11)?.parse().ok()?;
            let stime: f64 = fields.get(12)?.parse().ok()?;
            Some((utime + stime) / 100.0)
        })
        .unwrap_or(0.0)
}

/// What one or more slices of a scenario measured; slices of one scenario merge.
#[derive(Debug, Clone)]
pub struct Measured {
    hist: Histogram<u64>,
    ok: u64,
    errors: u64,
    error_statuses: std::collections::BTreeMap<u16, u64>,
    elapsed_s: f64,
    server_cpu_s: f64,
}

impl Measured {
    /// Adds another slice of the same scenario.
    pub fn merge(&mut self, other: Measured) -> anyhow::Result<()> {
        self.hist.add(other.hist)?;
        self.ok += other.ok;
        self.errors += other.errors;
        for (status, count) in other.error_statuses {
            *self.error_statuses.entry(status).or_default() += count;
        }
        self.elapsed_s += other.elapsed_s;
        self.server_cpu_s += other.server_cpu_s;
        Ok(())
    }

    /// The figures of the scenario.
    pub fn result(&self, name: &str, connections: usize) -> ScenarioResult {
        let ms = |q: f64| self.hist.value_at_quantile(q) as f64 / 1000.0;
        ScenarioResult {
            scenario: name.to_string(),
            connections,
            ok: self.ok,
            errors: self.errors,
            error_statuses: self.error_statuses.clone(),
            rps: self.ok as f64 / self.elapsed_s.max(1e-9),
            p50_ms: ms(0.50),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
            server_cpu_us: (self.ok > 0)
                .then(|| (self.server_cpu_s * 1e7 / self.ok as f64).round() / 10.0),
        }
    }
}

/// Runs one scenario: `connections` connections, each sending requests back to back, against
/// the server process `pid` (whose CPU time is measured).
pub async fn run_scenario(
    addr: SocketAddr,
    pid: u32,
    connections: usize,
    seconds: f64,
    make: RequestFactory,
    expect_status: u16,
) -> anyhow::Result<Measured> {
    run_scenario_on(&[(addr, pid)], connections, seconds, make, expect_status).await
}

/// [`run_scenario`] spread over several servers (replicas): connection `i` goes to server
/// `i % servers.len()`, as a load balancer would spread them; the CPU time is all of theirs.
pub async fn run_scenario_on(
    servers: &[(SocketAddr, u32)],
    connections: usize,
    seconds: f64,
    make: RequestFactory,
    expect_status: u16,
) -> anyhow::Result<Measured> {
    if servers.is_empty() {
        bail!("no server to load");
    }
    let cpu = || {
        servers
            .iter()
            .map(|(_, pid)| cpu_seconds(*pid))
            .sum::<f64>()
    };
    // One sequence for the whole run: nonces and request ids never repeat across scenarios.
    static SEQUENCE: AtomicU64 = AtomicU64::new(0);
    // Connections open before the clock starts, so a slice measures only requests.
    let mut conns = Vec::with_capacity(connections);
    for i in 0..connections {
        conns.push(Connection::open(servers[i % servers.len()].0).await?);
    }
    let cpu_before = cpu();
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for mut conn in conns {
        let make = Arc::clone(&make);
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            let mut ok = 0u64;
            let mut errors = 0u64;
            let mut statuses = std::collections::BTreeMap::<u16, u64>::new();
            while Instant::now() < deadline {
                let n = SEQUENCE.fetch_add(1, Ordering::Relaxed);
                let req = make(n);
                let t0 = Instant::now();
                match conn.send(&req).await {
                    Ok((status, _)) if status == expect_status => {
                        ok += 1;
                        hist.record(t0.elapsed().as_micros().max(1) as u64)?;
                    }
                    Ok((status, _)) => {
                        errors += 1;
                        *statuses.entry(status).or_default() += 1;
                    }
                    Err(_) => {
                        errors += 1;
                        *statuses.entry(0).or_default() += 1;
                    }
                }
            }
            Ok::<_, anyhow::Error>((hist, ok, errors, statuses))
        }));
    }
    let mut measured = Measured {
        hist: Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?,
        ok: 0,
        errors: 0,
        error_statuses: Default::default(),
        elapsed_s: 0.0,
        server_cpu_s: 0.0,
    };
    for task in tasks {
        let (h, o, e, statuses) = task.await??;
        measured.hist.add(h)?;
        measured.ok += o;
        measured.errors += e;
        for (status, count) in statuses {
            *measured.error_statuses.entry(status).or_default() += count;
        }
    }
    measured.elapsed_s = started.elapsed().as_secs_f64();
    measured.server_cpu_s = cpu() - cpu_before;
    Ok(measured)
}

/// Sends one request on a fresh connection and returns status and JSON body.
async fn call(addr: SocketAddr, req: &[u8]) -> anyhow::Result<(u16, Value)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut req = req.to_vec();
    // Ask the server to close so the whole answer can be read to the end.
    if let Some(pos) = req.windows(2).position(|w| w == b"\r\n") {
        req.splice(pos + 2..pos + 2, b"Connection: close\r\n".iter().copied());
    }
    stream.write_all(&req).await?;
    let mut out = Vec::new();
    stream.read_to_end(&mut out).await?;
    let end = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no header end")?
        + 4;
    let status: u16 = std::str::from_utf8(&out[9..12])?.parse()?;
    let body = serde_json::from_slice(&out[end..]).unwrap_or(Value::Null);
    Ok((status, body))
}

/// Binds the keyholder like the owner and the platform would; returns the HMAC secret.
pub async fn bind(
    opts: &BenchOptions,
    data_dir: &Path,
    addr: SocketAddr,
) -> anyhow::Result<Arc<HmacSecret>> {
    bind_with(opts, data_dir, addr, &[]).await
}

/// [`bind`] with extra environment variables for the owner CLI (a PostgreSQL cluster's).
pub async fn bind_with(
    opts: &BenchOptions,
    data_dir: &Path,
    addr: SocketAddr,
    env: &[(&str, String)],
) -> anyhow::Result<Arc<HmacSecret>> {
    let out = Command::new(&opts.keyholder_bin)
        .args(["bind", "--json"])
        .env("KEYHOLDER_DATA_DIR", data_dir)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()?;
    if !out.status.success() {
        bail!(
            "keyholder bind failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let issued: Value = serde_json::from_slice(&out.stdout)?;
    let body = serde_json::to_vec(&json!({"code": issued["code"]}))?;
    let (status, answer) = call(addr, &request("POST", PATH_EXCHANGE, &[], &body)).await?;
    if status != 200 {
        bail!("exchange failed: {status} {answer}");
    }
    let secret = HmacSecret::from_base64(answer["hmacSecret"].as_str().unwrap_or_default())
        .map_err(|_| anyhow::anyhow!("exchange returned no secret"))?;
    Ok(Arc::new(secret))
}

fn ticket(secret: &HmacSecret, purpose: Purpose, service: &str, n: u64) -> String {
    let t = now();
    // The purpose is part of the nonce: scenarios number their requests from 0 each, and one
    // nonce space is shared by all tickets (a proxy ticket must not replay a credential one).
    let nonce = format!(
        "{}{}{:016x}",
        keyholder_tests_nonce_prefix(),
        purpose.as_str(),
        n
    );
    encode_ticket(
        secret,
        &TicketClaims::new("bench", service, purpose, t, t + 60, nonce),
    )
}

/// A per-run random prefix so nonces never collide across runs against one data folder.
fn keyholder_tests_nonce_prefix() -> &'static str {
    static PREFIX: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PREFIX.get_or_init(|| crate::random_hex(8))
}

/// A signed platform request; `object` is a JSON object, sent (as the platform does) with the
/// request id as its first member, so that no two requests are the same signed bytes.
fn signed_request(secret: &HmacSecret, path: &str, object: &[u8], n: u64) -> Vec<u8> {
    let ts = now();
    let rid = format!(
        "bench_{}_{}_{n}",
        keyholder_tests_nonce_prefix(),
        path.trim_start_matches("/v1/")
    );
    let rest = object.strip_prefix(b"{").unwrap_or(object);
    let separator: &[u8] = if rest.starts_with(b"}") { b"" } else { b"," };
    let body = [
        format!(r#"{{"requestId":"{rid}""#).as_bytes(),
        separator,
        rest,
    ]
    .concat();
    let body = body.as_slice();
    let sig = signature_header_value(secret, ts, body);
    request(
        "POST",
        path,
        &[
            (HEADER_SIGNATURE, &sig),
            (HEADER_TIMESTAMP, &ts.to_string()),
            (HEADER_PLATFORM_REQUEST_ID, &rid),
        ],
        body,
    )
}

fn store_body(secret: &HmacSecret, service: &str, n: u64) -> Vec<u8> {
    let t = ticket(secret, Purpose::Store, service, n);
    serde_json::to_vec(&json!({"ticket": t, "service": service, "tokenData": {
        "accessToken": format!("tok_{n:08}_{}", "x".repeat(24)), "scope": "repo", "tokenType": "oauth"}}))
    .unwrap_or_default()
}

/// Stores `count` credentials named `bench-000`...
pub async fn populate(addr: SocketAddr, secret: &HmacSecret, count: usize) -> anyhow::Result<()> {
    let mut conn = Connection::open(addr).await?;
    for i in 0..count {
        let service = format!("bench-{i:03}");
        let body = store_body(secret, &service, 1_000_000 + i as u64);
        let (status, _) = conn.send(&request("POST", PATH_STORE, &[], &body)).await?;
        if status != 200 {
            bail!("populating {service} failed with {status}");
        }
    }
    Ok(())
}

/// The owner allows the local upstream for the `count` bench services (`keyholder egress allow
/// bench-NNN 127.0.0.1`): the default egress mode `known` sends a credential only to its
/// provider's catalogued origins.
pub fn allow_local_upstream(
    opts: &BenchOptions,
    data_dir: &Path,
    count: usize,
) -> anyhow::Result<()> {
    for i in 0..count {
        let service = format!("bench-{i:03}");
        let out = Command::new(&opts.keyholder_bin)
            .args(["egress", "allow", &service, "127.0.0.1"])
            .env("KEYHOLDER_DATA_DIR", data_dir)
            .output()?;
        if !out.status.success() {
            bail!(
                "keyholder egress allow failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    Ok(())
}

/// Scenario request factories.
pub fn credential_factory(secret: Arc<HmacSecret>) -> RequestFactory {
    Arc::new(move |n| {
        let service = format!("bench-{:03}", n % 100);
        let t = ticket(&secret, Purpose::AgentCredential, &service, n);
        request(
            "GET",
            &format!("{PATH_CREDENTIAL}?ticket={t}&service={service}"),
            &[],
            b"",
        )
    })
}

/// The agent whose tickets the `credential_policy` scenario carries (its policy is attached to it).
pub const POLICY_AGENT: &str = "bench_policy_agent";

/// `credential` under a custody policy with a time window, client-ip, rate and usage cap
/// (attached to [`POLICY_AGENT`] by [`create_policy`]); its own nonce space.
pub fn credential_policy_factory(secret: Arc<HmacSecret>) -> RequestFactory {
    Arc::new(move |n| {
        let service = format!("bench-{:03}", n % 100);
        let t = now();
        let nonce = format!("{}pol{:016x}", keyholder_tests_nonce_prefix(), n);
        let mut claims = TicketClaims::new(
            "bench",
            &service,
            Purpose::AgentCredential,
            t,
            t + 60,
            nonce,
        );
        claims.aid = Some(POLICY_AGENT.into());
        let t = encode_ticket(&secret, &claims);
        request(
            "GET",
            &format!("{PATH_CREDENTIAL}?ticket={t}&service={service}"),
            &[],
            b"",
        )
    })
}

/// The owner's policy for `credential_policy`: every rule that costs on the hot path and never
/// refuses a bench request (all week, loopback, a huge rate and daily cap).
pub fn create_policy(opts: &BenchOptions, data_dir: &Path) -> anyhow::Result<()> {
    for args in [
        vec![
            "policy",
            "create",
            "bench",
            "--hours",
            "Mon-Sun 00:00-24:00",
            "--time-zone",
            "Europe/Berlin",
            "--client-ip",
            "127.0.0.0/8,::1/128",
            "--rate",
            "1000000/s",
            "--max-uses",
            "1000000000",
            "--per",
            "day",
        ],
        vec!["policy", "attach", "bench", "--agent", POLICY_AGENT],
    ] {
        let out = Command::new(&opts.keyholder_bin)
            .args(&args)
            .env("KEYHOLDER_DATA_DIR", data_dir)
            .output()?;
        if !out.status.success() {
            bail!(
                "keyholder {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    Ok(())
}

/// Signed storage list over the 100 stored documents.
pub fn storage_list_factory(secret: Arc<HmacSecret>) -> RequestFactory {
    Arc::new(move |n| {
        signed_request(
            &secret,
            PATH_STORAGE,
            br#"{"operation":"list","collection":"tokens"}"#,
            n,
        )
    })
}

/// Durable `/v1/store` overwriting one of 100 credentials.
pub fn store_factory(secret: Arc<HmacSecret>) -> RequestFactory {
    Arc::new(move |n| {
        let service = format!("bench-{:03}", n % 100);
        request(
            "POST",
            PATH_STORE,
            &[],
            &store_body(&secret, &service, 2_000_000_000 + n),
        )
    })
}

/// `/v1/proxy` to `upstream` with the credential injected.
pub fn proxy_factory(secret: Arc<HmacSecret>, upstream: SocketAddr) -> RequestFactory {
    Arc::new(move |n| {
        let service = format!("bench-{:03}", n % 100);
        let t = ticket(&secret, Purpose::Proxy, &service, n);
        let body = serde_json::to_vec(&json!({
            "ticket": t, "service": service,
            "upstream": {"url": format!("http://{upstream}/api/item"), "method": "GET", "headers": {"Accept": "application/json"}},
            "headerTemplates": {"Authorization": "Bearer ${TOKEN}"}
        }))
        .unwrap_or_default();
        signed_request(&secret, PATH_PROXY, &body, n)
    })
}

/// A fixed request (baseline, direct upstream).
pub fn fixed_factory(target: &str) -> RequestFactory {
    let req = request("GET", target, &[], b"");
    Arc::new(move |_| req.clone())
}

/// One sample of a sustained run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SustainSample {
    /// Seconds since the start of the paced load.
    pub t_s: f64,
    /// Answered requests per second in this window.
    pub rps: f64,
    /// Median latency in this window (from the scheduled send time), milliseconds.
    pub p50_ms: f64,
    /// 99th percentile in this window, milliseconds.
    pub p99_ms: f64,
    /// Failed or unexpected answers in this window.
    pub errors: u64,
    /// Resident memory of the keyholder at the end of the window, MiB.
    pub rss_mb: f64,
    /// The keyholder's CPU time per answered request in this window, microseconds: at a fixed
    /// rate the figure that tells two builds (or a slow phase of the machine) apart.
    pub cpu_us: f64,
}

/// What a paced run sends: `rate` requests per second over `connections` for `seconds`, sampled
/// every `sample` seconds.
#[derive(Debug, Clone, Copy)]
pub struct PacedLoad {
    pub connections: usize,
    pub rate: f64,
    pub seconds: f64,
    pub sample: f64,
    /// Number of the first request (nonces and request ids derive from it): runs against the
    /// same keyholder must not overlap, or their requests are refused as replays.
    pub first_request: u64,
    /// Print a line per sample.
    pub verbose: bool,
}

/// Paced (open-loop) load as `load` says. Latency counts from the time a request was due, so a
/// stall shows up in full (no coordinated omission).
pub async fn run_paced(
    addr: SocketAddr,
    load: PacedLoad,
    make: RequestFactory,
    expect_status: u16,
    pid: u32,
) -> anyhow::Result<PacedRun> {
    let PacedLoad {
        connections,
        rate,
        seconds,
        sample,
        first_request,
        verbose,
    } = load;
    use std::sync::Mutex;
    let window = Arc::new(Mutex::new((
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?,
        0u64,
    )));
    let counter = Arc::new(AtomicU64::new(first_request));
    let started = Instant::now();
    let end = started + Duration::from_secs_f64(seconds);
    let interval = Duration::from_secs_f64(connections as f64 / rate);
    let mut tasks = Vec::new();
    for c in 0..connections {
        let (make, counter, window) =
            (Arc::clone(&make), Arc::clone(&counter), Arc::clone(&window));
        // Spread the connections' schedules evenly over one interval.
        let offset = interval.mul_f64(c as f64 / connections as f64);
        tasks.push(tokio::spawn(async move {
            let mut conn = Connection::open(addr).await?;
            let mut due = started + offset;
            while due < end {
                tokio::time::sleep_until(due.into()).await;
                let req = make(counter.fetch_add(1, Ordering::Relaxed));
                let result = conn.send(&req).await;
                let latency = due.elapsed().as_micros().max(1) as u64;
                if let Ok(mut w) = window.lock() {
                    match result {
                        Ok((status, _)) if status == expect_status => {
                            let _ = w.0.record(latency.min(60_000_000));
                        }
                        _ => w.1 += 1,
                    }
                }
                due += interval;
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    let mut samples = Vec::new();
    let mut overall = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut next = started + Duration::from_secs_f64(sample);
    let mut cpu_before = cpu_seconds(pid);
    let cpu_at_start = cpu_before;
    let per_request = |cpu: f64, answered: u64| (cpu * 1e6 / answered.max(1) as f64).round();
    while next <= end + Duration::from_millis(10) {
        tokio::time::sleep_until(next.into()).await;
        let (hist, errors) = {
            let mut w = window
                .lock()
                .map_err(|_| anyhow::anyhow!("sample lock poisoned"))?;
            let taken = (w.0.clone(), w.1);
            w.0.reset();
            w.1 = 0;
            taken
        };
        overall.add(&hist)?;
        let cpu_now = cpu_seconds(pid);
        let s = SustainSample {
            t_s: (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
            rps: hist.len() as f64 / sample,
            p50_ms: hist.value_at_quantile(0.5) as f64 / 1000.0,
            p99_ms: hist.value_at_quantile(0.99) as f64 / 1000.0,
            errors,
            rss_mb: (rss_mb(pid) * 10.0).round() / 10.0,
            cpu_us: per_request(cpu_now - cpu_before, hist.len()),
        };
        cpu_before = cpu_now;
        if verbose {
            println!(
                "t={:>6.1}s rps={:>8.0} p50={:>7.2}ms p99={:>7.2}ms errors={} rss={:.1}MiB cpu={:.0}us/req",
                s.t_s, s.rps, s.p50_ms, s.p99_ms, s.errors, s.rss_mb, s.cpu_us
            );
        }
        samples.push(s);
        next += Duration::from_secs_f64(sample);
    }
    for task in tasks {
        task.await??;
    }
    let ms = |q: f64| overall.value_at_quantile(q) as f64 / 1000.0;
    Ok(PacedRun {
        cpu_us: per_request(cpu_before - cpu_at_start, overall.len()),
        samples,
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        max_ms: overall.max() as f64 / 1000.0,
    })
}

/// A paced run: its samples, and latency over the whole run (from the time each request was due).
#[derive(Debug, Clone)]
pub struct PacedRun {
    /// One per sample window.
    pub samples: Vec<SustainSample>,
    /// Median, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile, milliseconds.
    pub p99_ms: f64,
    /// 99.9th percentile, milliseconds.
    pub p999_ms: f64,
    /// Slowest request, milliseconds.
    pub max_ms: f64,
    /// The keyholder's CPU time per answered request over the whole run, microseconds.
    pub cpu_us: f64,
}

/// Least-squares slope of `y` over `x` (per unit of `x`).
pub fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let (mx, my) = (
        points.iter().map(|p| p.0).sum::<f64>() / n,
        points.iter().map(|p| p.1).sum::<f64>() / n,
    );
    let num: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let den: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if den == 0.0 {
        0.0
    } else {
        num / den
    }
}

/// Credential GET and proxy, alternating: the sustained-load mix.
pub fn mixed_factory(secret: Arc<HmacSecret>, upstream: SocketAddr) -> RequestFactory {
    let credential = credential_factory(Arc::clone(&secret));
    let proxy = proxy_factory(secret, upstream);
    Arc::new(move |n| if n % 2 == 0 { credential(n) } else { proxy(n) })
}

/// Two keyholder replicas on one fresh PostgreSQL database (`--database-url`), sharing one master
/// key file, bound and holding the 100 bench credentials. The database is dropped with it.
pub struct PgCluster {
    /// Replica A (the one-replica scenarios run against it alone).
    pub a: ChildServer,
    /// Replica B.
    pub b: ChildServer,
    /// The binding's secret.
    pub secret: Arc<HmacSecret>,
    // Dropped after the replicas (field order): the database goes once they are gone.
    _db: keyholder::storage::postgres::testing::TestDatabase,
    _dir: tempfile::TempDir,
}

impl PgCluster {
    /// Makes the database on the server `url` names (a role allowed to create databases) and
    /// starts both replicas on it.
    pub async fn start(opts: &BenchOptions, url: &str) -> anyhow::Result<PgCluster> {
        use base64::Engine as _;
        let db = keyholder::storage::postgres::testing::TestDatabase::create_on(url)
            .await
            .map_err(|e| anyhow::anyhow!("--database-url {url}: cannot create a database: {e}"))?;
        let dir = tempfile::tempdir()?;
        let master_key = dir.path().join("master.key");
        std::fs::write(
            &master_key,
            base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>()),
        )?;
        let env = |node: &str| {
            vec![
                ("KEYHOLDER_DATABASE_URL", db.url()),
                (
                    "KEYHOLDER_MASTER_KEY_FILE",
                    master_key.display().to_string(),
                ),
                ("KEYHOLDER_NODE_ID", node.to_string()),
            ]
        };
        let (a_dir, b_dir, cli_dir) = (
            dir.path().join("a"),
            dir.path().join("b"),
            dir.path().join("cli"),
        );
        for d in [&a_dir, &b_dir, &cli_dir] {
            std::fs::create_dir_all(d)?;
        }
        let (a, _) = start_keyholder_with(opts, &a_dir, &env("bench-a")).await?;
        let (b, _) = start_keyholder_with(opts, &b_dir, &env("bench-b")).await?;
        let secret = bind_with(opts, &cli_dir, a.addr, &env("bench-cli")).await?;
        // B follows the binding (an owner change) within a second: wait until it serves.
        let list = signed_request(
            &secret,
            PATH_STORAGE,
            br#"{"operation":"list","collection":"tokens"}"#,
            7_000_000_000,
        );
        let started = Instant::now();
        while !matches!(call(b.addr, &list).await, Ok((200, _))) {
            if started.elapsed() > Duration::from_secs(5) {
                bail!("replica B did not follow the binding");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        populate(a.addr, &secret, 100)
            .await
            .context("populating 100 credentials on PostgreSQL")?;
        Ok(PgCluster {
            a,
            b,
            secret,
            _db: db,
            _dir: dir,
        })
    }
}
