//! The conformance checker behind `keyholder-check`: a named matrix of checks run against any webhook
//! with the SDK itself. The platform's workflow, its adversarial probes and the protocol's refusals, each
//! reported with the exchanges it made (tickets and secrets masked).
//!
//! Every check is one variant of [`Check`] (name, group, matrix and the one function that runs it,
//! declared once in `matrix.rs`); the matrices run in order: [`MATRIX`], [`PROTOCOL_24_MATRIX`],
//! [`WIRE_MATRIX`], then [`ENVELOPE_MATRIX`], [`RESTART_MATRIX`] and [`STREAM_MATRIX`] where they
//! apply.
//!
//! The probes write only under keys named `keyholder-check-<random>` and delete them again.
//!
//! Over an asymmetric binding ([`CheckAuth::PlatformKey`]) the same matrix runs with Ed25519 envelopes
//! and `kh2` tickets (forgeries are then made in that scheme), plus [`ENVELOPE_MATRIX`]: an unknown
//! key, a replayed nonce, a body swapped under a valid signature, HMAC headers and HMAC tickets
//! (refused in an asymmetric binding) and, when the operator names a key already removed with
//! `keyholder platform-key remove` ([`CheckOptions::removed_platform_key`]), that key's signature.
#![warn(missing_docs)]

use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keyholder_protocol::paths::{PATH_CREDENTIAL, PATH_HEALTH, PATH_STORE};
use keyholder_protocol::wire::Collection;
use keyholder_protocol::{HmacSecret, PlatformSigningKey};
use reqwest::Method;
use serde::Serialize;
use serde_json::{json, Value};

use keyholder_client::builder::ClientBuilder;
use keyholder_client::error::Error;
use keyholder_client::identity::IdentityPin;
use keyholder_client::platform::{now_unix, Platform};
use keyholder_client::retry::RetryPolicy;
use keyholder_client::tickets::{Ticket, TicketIssuer};
use keyholder_client::transport::{Outgoing, RawAgent as _, RawPlatform as _, RawResponse};
use keyholder_client::Agent;

mod base;
mod envelope;
mod matrix;
mod protocol24;
mod restart;
mod signing;
mod stream;
mod wire;

pub use matrix::{
    Check, Matrix, ENVELOPE_MATRIX, MATRIX, PROTOCOL_24_MATRIX, RESTART_MATRIX, STREAM_MATRIX,
    WIRE_MATRIX,
};

/// How the checker authenticates as the platform.
pub enum CheckAuth {
    /// Bind first with this one-time code (HMAC binding).
    BindCode(String),
    /// The webhook is bound already; sign with this secret.
    Secret(HmacSecret),
    /// Asymmetric binding with the platform's Ed25519 key: bind first with `bind_code` (from
    /// `keyholder bind --platform-key`), or, without one, the webhook is bound to this key already.
    PlatformKey {
        /// The platform's signing key (boxed: it is much larger than the other variants).
        key: Box<PlatformSigningKey>,
        /// An asymmetric bind code to exchange first.
        bind_code: Option<String>,
    },
}

impl CheckAuth {
    fn is_asymmetric(&self) -> bool {
        matches!(self, CheckAuth::PlatformKey { .. })
    }
}

impl std::fmt::Debug for CheckAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CheckAuth::BindCode(_) => "CheckAuth::BindCode(<masked>)",
            CheckAuth::Secret(_) => "CheckAuth::Secret(<masked>)",
            CheckAuth::PlatformKey { .. } => "CheckAuth::PlatformKey(<masked>)",
        })
    }
}

/// What to check and how.
#[derive(Debug)]
pub struct CheckOptions {
    /// The webhook's base URL.
    pub url: String,
    /// Bind code or secret.
    pub auth: CheckAuth,
    /// Allow plain http (loopback tests).
    pub danger_allow_http: bool,
    /// Pin the webhook's identity.
    pub pin: Option<IdentityPin>,
    /// Retry policy of the SDK calls (default: the platform's).
    pub retry: RetryPolicy,
    /// Per-request timeout.
    pub timeout: Duration,
    /// A shell command (run with `sh -c`) that restarts the webhook under test; with it the checker
    /// runs [`RESTART_MATRIX`]: requests made before the restart are replayed after it.
    pub restart_cmd: Option<String>,
    /// Asymmetric binding: a platform key the operator has removed (`keyholder platform-key remove`);
    /// its envelopes must be refused. Without it, that check is not run.
    pub removed_platform_key: Option<PlatformSigningKey>,
    /// A service whose egress policy lets the webhook call the checker's loopback upstream (on the
    /// webhook's machine, with private egress allowed: `keyholder egress allow NAME 127.0.0.1`);
    /// with it the checker runs [`STREAM_MATRIX`] and stores a dummy credential under it.
    pub stream_service: Option<String>,
}

impl CheckOptions {
    /// Options with the defaults: https only, no pin, the platform's retries, 35 s timeout.
    pub fn new(url: impl Into<String>, auth: CheckAuth) -> Self {
        CheckOptions {
            url: url.into(),
            auth,
            danger_allow_http: false,
            pin: None,
            retry: RetryPolicy::platform(),
            timeout: keyholder_client::builder::DEFAULT_TIMEOUT,
            removed_platform_key: None,
            restart_cmd: None,
            stream_service: None,
        }
    }
}

/// The outcome of one check.
#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    /// The check's group ([`Check::group`]: `workflow`, `adversarial`, `refusal`, `protocol-2.4.0`,
    /// `wire`, `envelope`, `restart`), or `setup` when the checker could not connect.
    pub group: String,
    /// The check's name.
    pub name: String,
    /// Whether the webhook behaved as the protocol requires.
    pub passed: bool,
    /// The exchanges made, one line each (tickets and secrets masked).
    pub exchanges: Vec<String>,
    /// Why it failed (empty when passed).
    pub detail: String,
    /// When it failed: the last raw request of the check (method, path, headers and body excerpt,
    /// secrets masked) and the answer (status, body excerpt).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed_exchange: Option<String>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The webhook checked.
    pub url: String,
    /// One result per check.
    pub checks: Vec<CheckResult>,
    /// Number passed.
    pub passed: usize,
    /// Number failed.
    pub failed: usize,
    /// The protocol version the webhook reports in health, when it answered.
    pub protocol_version: Option<String>,
}

impl Report {
    /// True when every check passed.
    pub fn ok(&self) -> bool {
        self.failed == 0 && !self.checks.is_empty()
    }

    /// The check named `name`.
    pub fn check(&self, name: &str) -> Option<&CheckResult> {
        self.checks.iter().find(|c| c.name == name)
    }

    /// One line per check, then the summary line `N passed, N failed`.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for c in &self.checks {
            let _ = write!(
                out,
                "{} {}/{}: {}",
                if c.passed { "PASS" } else { "FAIL" },
                c.group,
                c.name,
                c.exchanges.join(" ; ")
            );
            if !c.passed {
                let _ = write!(out, " -- {}", c.detail);
                if let Some(exchange) = &c.failed_exchange {
                    for line in exchange.lines() {
                        let _ = write!(out, "\n    {line}");
                    }
                }
            }
            out.push('\n');
        }
        if let Some(version) = &self.protocol_version {
            let _ = writeln!(out, "The webhook {}", protocol24::version_note(version));
        }
        let _ = writeln!(out, "{} passed, {} failed", self.passed, self.failed);
        out
    }

    /// The machine-readable report.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

/// One check being run: its exchanges and verdict.
struct Run {
    exchanges: Vec<String>,
    /// The last raw exchange in full, shown when the check fails.
    last: Option<String>,
}

impl Run {
    fn new() -> Self {
        Run {
            exchanges: Vec::new(),
            last: None,
        }
    }

    /// Records a raw exchange: one summary line, and the whole of it as the last exchange.
    fn record(&mut self, out: &Outgoing, note: &str, resp: &Result<RawResponse, Error>) {
        self.note(format!("{} -> {}", describe(out, note), outcome(resp)));
        self.last = Some(transcript(out, resp));
    }

    fn note(&mut self, line: impl Into<String>) {
        self.exchanges.push(line.into());
    }

    /// Records a typed SDK call's outcome.
    fn call<T>(&mut self, what: &str, result: &Result<T, Error>) {
        match result {
            Ok(_) => self.note(format!("{what} -> ok")),
            Err(e) => self.note(format!("{what} -> {e}")),
        }
    }
}

fn describe(out: &Outgoing, note: &str) -> String {
    let mut target = out.path.clone();
    for (i, (name, value)) in out.query.iter().enumerate() {
        let shown = if name == "ticket" { "<masked>" } else { value };
        let _ = write!(target, "{}{name}={shown}", if i == 0 { '?' } else { '&' });
    }
    if note.is_empty() {
        format!("{} {target}", out.method)
    } else {
        format!("{} {target} [{note}]", out.method)
    }
}

/// Headers whose values are secrets or signatures (masked in transcripts).
fn masked_header(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    [
        "signature",
        "envelope",
        "authorization",
        "ticket",
        "cookie",
        "secret",
    ]
    .iter()
    .any(|s| n.contains(s))
}

/// Up to 400 bytes of a body, its secret-bearing JSON fields masked.
fn excerpt(body: &[u8]) -> String {
    const SECRET_KEYS: &[&str] = &["ticket", "tokenData", "code", "secret", "hmacSecret"];
    let text = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(mut map)) => {
            for key in SECRET_KEYS {
                if let Some(v) = map.get_mut(*key) {
                    if !v.is_null() {
                        *v = json!("<masked>");
                    }
                }
            }
            Value::Object(map).to_string()
        }
        _ => String::from_utf8_lossy(body).into_owned(),
    };
    match text.char_indices().nth(400) {
        Some((i, _)) => format!("{}... ({} bytes)", &text[..i], body.len()),
        None => text,
    }
}

/// The whole of one raw exchange: request line, headers (secrets masked), body excerpt, and the answer.
fn transcript(out: &Outgoing, resp: &Result<RawResponse, Error>) -> String {
    let mut text = format!("request: {}", describe(out, ""));
    for (name, value) in &out.headers {
        let shown = if masked_header(name) {
            "<masked>"
        } else {
            value
        };
        let _ = write!(text, "\n  {name}: {shown}");
    }
    if let Some(body) = &out.body {
        let _ = write!(text, "\n  body: {}", excerpt(body));
    }
    match resp {
        Ok(r) => {
            let _ = write!(text, "\nanswer: {}\n  body: {}", r.status, excerpt(&r.body));
        }
        Err(_) => {
            let _ = write!(text, "\nanswer: {}", outcome(resp));
        }
    }
    text
}

/// A connection that broke before any answer (for instance a pooled one the webhook closed after
/// an earlier failure): the probe is sent once more, since it says nothing about this request.
fn is_transport(resp: &Result<RawResponse, Error>) -> bool {
    matches!(resp, Err(Error::Transport { .. }))
}

fn outcome(resp: &Result<RawResponse, Error>) -> String {
    match resp {
        Ok(r) => match r.error_body() {
            Some(b) if !(200..300).contains(&r.status) => format!("{} {}", r.status, b.error),
            _ => r.status.to_string(),
        },
        Err(e @ Error::Transport { source, .. }) => format!("{e}: {source}"),
        Err(e) => e.to_string(),
    }
}

/// `Ok(())` when the answer is `status` with wire code `code`.
fn expect(
    resp: &Result<RawResponse, Error>,
    status: &[u16],
    code: Option<&str>,
) -> Result<(), String> {
    let wanted = || {
        let s: Vec<String> = status.iter().map(u16::to_string).collect();
        format!(
            "expected {}{}",
            s.join(" or "),
            code.map(|c| format!(" {c}")).unwrap_or_default()
        )
    };
    match resp {
        Ok(r) if status.contains(&r.status) => match code {
            Some(code) if r.error_body().map(|b| b.error) != Some(code.to_owned()) => {
                Err(format!("{}, got {}", wanted(), outcome(resp)))
            }
            _ => Ok(()),
        },
        _ => Err(format!("{}, got {}", wanted(), outcome(resp))),
    }
}

/// Everything the checks share.
struct Ctx {
    platform: Platform,
    agent: Agent,
    tickets: TicketIssuer,
    forger: TicketIssuer,
    key: String,
    service: String,
    /// Asymmetric binding (envelopes and `kh2` tickets).
    asymmetric: bool,
    /// A platform key the operator removed.
    removed: Option<PlatformSigningKey>,
    /// The command that restarts the webhook under test.
    restart_cmd: Option<String>,
    /// Per-request timeout (the restart check waits for health this long).
    timeout: Duration,
    /// The service of the streamed-answer check.
    stream_service: Option<String>,
}

impl Ctx {
    async fn probe(&self, run: &mut Run, out: &Outgoing, note: &str) -> Result<RawResponse, Error> {
        let mut resp = self.agent.send_once(out).await;
        if is_transport(&resp) {
            run.record(out, note, &resp);
            resp = self.agent.send_once(out).await;
        }
        run.record(out, note, &resp);
        resp
    }

    async fn signed_probe(
        &self,
        run: &mut Run,
        platform: &Platform,
        timestamp: i64,
        request_id: &str,
        note: &str,
    ) -> Result<RawResponse, Error> {
        let body = serde_json::to_vec(&json!({ "requestId": request_id })).unwrap_or_default();
        let out = platform.signed_outgoing(PATH_HEALTH, body, timestamp, request_id);
        let mut resp = platform.send_once(&out, Some(request_id)).await;
        if is_transport(&resp) {
            run.record(&out, note, &resp);
            resp = platform.send_once(&out, Some(request_id)).await;
        }
        run.record(&out, note, &resp);
        resp
    }

    /// A signed `POST /v1/health` prepared once (to send it more than once, or alter it).
    fn health_outgoing(&self, platform: &Platform, request_id: &str) -> Outgoing {
        let body = serde_json::to_vec(&json!({ "requestId": request_id })).unwrap_or_default();
        platform.signed_outgoing(PATH_HEALTH, body, now_unix(), request_id)
    }

    async fn send_probe(
        &self,
        run: &mut Run,
        out: &Outgoing,
        request_id: &str,
        note: &str,
    ) -> Result<RawResponse, Error> {
        let mut resp = self.platform.send_once(out, Some(request_id)).await;
        if is_transport(&resp) {
            run.record(out, note, &resp);
            resp = self.platform.send_once(out, Some(request_id)).await;
        }
        run.record(out, note, &resp);
        resp
    }

    fn credential_get(&self, ticket: &Ticket, service: &str) -> Outgoing {
        let mut out = Outgoing::new(Method::GET, PATH_CREDENTIAL);
        out.query = vec![
            ("ticket".into(), ticket.expose().to_owned()),
            ("service".into(), service.to_owned()),
        ];
        out
    }

    fn store_post(&self, ticket: &Ticket, service: &str) -> Outgoing {
        let mut out = Outgoing::new(Method::POST, PATH_STORE);
        out.body = serde_json::to_vec(&json!({
            "ticket": ticket.expose(),
            "service": service,
            "tokenData": {"accessToken": "keyholder-check-not-a-secret"},
        }))
        .ok();
        out
    }
}

/// A loopback HTTP server that answers `200 ok` and counts connections: the upstream of the proxy probe
/// (it must never be reached by an unsigned request).
struct LocalUpstream {
    url: String,
    hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl LocalUpstream {
    async fn start() -> std::io::Result<Self> {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/keyholder-check", listener.local_addr()?);
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = stream.read(&mut buf).await;
                    let _ = stream
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                        )
                        .await;
                });
            }
        });
        Ok(LocalUpstream { url, hits, task })
    }
}

impl Drop for LocalUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn random_suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}

/// Run the whole matrix.
pub async fn run(options: CheckOptions) -> Report {
    let mut checks = Vec::new();
    let mut protocol_version = None;
    match setup(&options).await {
        Ok(ctx) => {
            protocol_version = ctx.platform.health().await.ok().map(|h| h.version);
            for check in Check::ALL.iter().copied().filter(|c| c.applies(&ctx)) {
                let mut run = Run::new();
                let verdict = check.run(&ctx, &mut run).await;
                checks.push(CheckResult {
                    group: check.group().to_owned(),
                    name: check.name().to_owned(),
                    passed: verdict.is_ok(),
                    failed_exchange: if verdict.is_ok() { None } else { run.last },
                    exchanges: run.exchanges,
                    detail: verdict.err().unwrap_or_default(),
                });
            }
            // Best-effort cleanup of anything a failed check left behind.
            let _ = ctx
                .platform
                .storage_delete(Collection::VaultConfig, &ctx.key)
                .await;
            let _ = ctx
                .platform
                .storage_delete(Collection::Tokens, &ctx.service)
                .await;
            if let Some(service) = &ctx.stream_service {
                let _ = ctx
                    .platform
                    .storage_delete(Collection::Tokens, service)
                    .await;
            }
        }
        Err((exchanges, detail)) => checks.push(CheckResult {
            group: "setup".into(),
            name: "connect".into(),
            passed: false,
            exchanges,
            failed_exchange: None,
            detail,
        }),
    }
    let passed = checks.iter().filter(|c| c.passed).count();
    Report {
        url: options.url.clone(),
        failed: checks.len() - passed,
        passed,
        checks,
        protocol_version,
    }
}

async fn setup(options: &CheckOptions) -> Result<Ctx, (Vec<String>, String)> {
    let mut builder = ClientBuilder::new(options.url.clone())
        .retry(options.retry.clone())
        .timeout(options.timeout);
    if options.danger_allow_http {
        builder = builder.danger_allow_http();
    }
    if let Some(pin) = &options.pin {
        builder = builder.pin_identity(pin.clone());
    }
    let agent = builder
        .clone()
        .agent()
        .map_err(|e| (Vec::new(), e.to_string()))?;
    let bind_failed = |e: Error| {
        (
            vec![format!(
                "POST /v1/exchange {{\"code\":\"<masked>\"}} -> {e}"
            )],
            format!("bind failed: {e}"),
        )
    };
    let platform = match &options.auth {
        CheckAuth::BindCode(code) => builder.bind(code).await.map_err(bind_failed)?,
        CheckAuth::Secret(secret) => builder
            .platform(HmacSecret::from_bytes(*secret.expose()))
            .map_err(|e| (Vec::new(), e.to_string()))?,
        CheckAuth::PlatformKey {
            key,
            bind_code: Some(code),
        } => builder
            .bind_with_key(code, key.duplicate())
            .await
            .map_err(bind_failed)?,
        CheckAuth::PlatformKey {
            key,
            bind_code: None,
        } => builder
            .platform(key.duplicate())
            .map_err(|e| (Vec::new(), e.to_string()))?,
    };
    // After a bind, the agent side must trust the same identity the platform pinned from the exchange.
    let agent = match (&options.pin, platform.pin()) {
        (None, Some(pin)) => {
            let mut b = ClientBuilder::new(options.url.clone())
                .retry(options.retry.clone())
                .timeout(options.timeout)
                .pin_identity(pin.clone());
            if options.danger_allow_http {
                b = b.danger_allow_http();
            }
            b.agent().map_err(|e| (Vec::new(), e.to_string()))?
        }
        _ => agent,
    };
    let suffix = random_suffix();
    let asymmetric = options.auth.is_asymmetric();
    // Forgeries are made in the binding's own scheme (the other scheme is refused anyway).
    let forger = if asymmetric {
        TicketIssuer::with_auth(PlatformSigningKey::generate())
    } else {
        TicketIssuer::new(HmacSecret::generate())
    };
    Ok(Ctx {
        tickets: platform.ticket_issuer().subject("keyholder-check"),
        forger: forger.subject("keyholder-check"),
        asymmetric,
        removed: options
            .removed_platform_key
            .as_ref()
            .map(PlatformSigningKey::duplicate),
        restart_cmd: options.restart_cmd.clone(),
        timeout: options.timeout,
        stream_service: options.stream_service.clone(),
        platform,
        agent,
        key: format!("keyholder-check-{suffix}"),
        service: format!("keyholder-check-{suffix}"),
    })
}

/// Replaces (or adds) a header of a prepared request.
fn set_header(out: &mut Outgoing, name: &str, value: String) {
    out.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
    out.headers.push((name.to_owned(), value));
}
