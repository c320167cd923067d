//! The conformance checker behind `keyholder-check`: a named matrix of checks run against any webhook
//! with the SDK itself. The platform's workflow, its adversarial probes and the protocol's refusals, each
//! reported with the exchanges it made (tickets and secrets masked).
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

use keyholder_protocol::envelope::{new_envelope_nonce, sign_envelope};
use keyholder_protocol::paths::{
    HEADER_ENVELOPE, HEADER_PLATFORM_REQUEST_ID, PATH_CREDENTIAL, PATH_HEALTH, PATH_PROXY,
    PATH_STORE, PLATFORM_EGRESS_IP,
};
use keyholder_protocol::request_id::new_request_id;
use keyholder_protocol::wire::{Collection, ListOptions};
use keyholder_protocol::{HmacSecret, PlatformSigningKey, Purpose};
use reqwest::Method;
use serde::Serialize;
use serde_json::{json, Map, Value};

use keyholder_client::builder::ClientBuilder;
use keyholder_client::error::Error;
use keyholder_client::identity::IdentityPin;
use keyholder_client::platform::{now_unix, Platform};
use keyholder_client::retry::RetryPolicy;
use keyholder_client::tickets::{Ticket, TicketIssuer};
use keyholder_client::transport::{Outgoing, RawAgent as _, RawPlatform as _, RawResponse};
use keyholder_client::{Agent, TokenData};

mod protocol24;
mod wire;

pub use protocol24::MATRIX as PROTOCOL_24_MATRIX;
pub use wire::WIRE_MATRIX;

/// Every check of the base matrix, as `(group, name)`, in the order they run (then
/// [`PROTOCOL_24_MATRIX`], the protocol 2.4.0 checks, and [`WIRE_MATRIX`], the wire refusals of
/// replays, encoded paths and ticket times).
pub const MATRIX: &[(&str, &str)] = &[
    ("workflow", "health_public"),
    ("workflow", "health_signed"),
    ("workflow", "storage_list"),
    ("workflow", "storage_write"),
    ("workflow", "storage_read_back"),
    ("workflow", "storage_list_batch"),
    ("workflow", "storage_delete"),
    ("workflow", "agent_store_and_fetch"),
    ("adversarial", "forged_credential_ticket"),
    ("adversarial", "platform_address_refused"),
    ("adversarial", "forged_store_ticket"),
    ("refusal", "stale_timestamp"),
    ("refusal", "forged_signature"),
    ("refusal", "duplicate_request_id"),
    ("refusal", "wrong_purpose"),
    ("refusal", "wrong_service"),
    ("refusal", "replayed_nonce"),
    ("refusal", "expired_ticket"),
    ("refusal", "unsigned_proxy"),
];

/// The extra checks of an asymmetric binding, run after [`MATRIX`]; `removed_platform_key` only when
/// [`CheckOptions::removed_platform_key`] is given.
pub const ENVELOPE_MATRIX: &[(&str, &str)] = &[
    ("envelope", "unknown_platform_key"),
    ("envelope", "replayed_envelope_nonce"),
    ("envelope", "body_swapped"),
    ("envelope", "hmac_signature_refused"),
    ("envelope", "hmac_ticket_refused"),
    ("envelope", "removed_platform_key"),
];

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
    /// Asymmetric binding: a platform key the operator has removed (`keyholder platform-key remove`);
    /// its envelopes must be refused. Without it, that check is not run.
    pub removed_platform_key: Option<PlatformSigningKey>,
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
        }
    }
}

/// The outcome of one check.
#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    /// `workflow`, `adversarial`, `refusal` (or `setup`).
    pub group: String,
    /// The check's name.
    pub name: String,
    /// Whether the webhook behaved as the protocol requires.
    pub passed: bool,
    /// The exchanges made, one line each (tickets and secrets masked).
    pub exchanges: Vec<String>,
    /// Why it failed (empty when passed).
    pub detail: String,
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
}

impl Run {
    fn new() -> Self {
        Run {
            exchanges: Vec::new(),
        }
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

fn outcome(resp: &Result<RawResponse, Error>) -> String {
    match resp {
        Ok(r) => match r.error_body() {
            Some(b) if !(200..300).contains(&r.status) => format!("{} {}", r.status, b.error),
            _ => r.status.to_string(),
        },
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
}

impl Ctx {
    async fn probe(&self, run: &mut Run, out: &Outgoing, note: &str) -> Result<RawResponse, Error> {
        let resp = self.agent.send_once(out).await;
        run.note(format!("{} -> {}", describe(out, note), outcome(&resp)));
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
        let resp = platform.send_once(&out, Some(request_id)).await;
        run.note(format!("{} -> {}", describe(&out, note), outcome(&resp)));
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
        let resp = self.platform.send_once(out, Some(request_id)).await;
        run.note(format!("{} -> {}", describe(out, note), outcome(&resp)));
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
            let envelope_checks = ENVELOPE_MATRIX
                .iter()
                .filter(|_| ctx.asymmetric)
                .filter(|(_, name)| *name != "removed_platform_key" || ctx.removed.is_some());
            for (group, name) in MATRIX
                .iter()
                .chain(PROTOCOL_24_MATRIX)
                .chain(WIRE_MATRIX)
                .chain(envelope_checks)
            {
                let mut run = Run::new();
                let verdict = run_check(&ctx, name, &mut run).await;
                checks.push(CheckResult {
                    group: (*group).to_owned(),
                    name: (*name).to_owned(),
                    passed: verdict.is_ok(),
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
        }
        Err((exchanges, detail)) => checks.push(CheckResult {
            group: "setup".into(),
            name: "connect".into(),
            passed: false,
            exchanges,
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
        platform,
        agent,
        key: format!("keyholder-check-{suffix}"),
        service: format!("keyholder-check-{suffix}"),
    })
}

async fn run_check(ctx: &Ctx, name: &str, run: &mut Run) -> Result<(), String> {
    let p = &ctx.platform;
    match name {
        "health_public" => {
            let r = p.health().await;
            run.call("GET /v1/health", &r);
            let h = r.map_err(|e| e.to_string())?;
            (h.status == "healthy")
                .then_some(())
                .ok_or(format!("status {:?}", h.status))
        }
        "health_signed" => {
            let r = p.health_signed().await;
            run.call("POST /v1/health [signed]", &r);
            let h = r.map_err(|e| e.to_string())?;
            if !h.key_configured {
                return Err("keyConfigured is false after binding".into());
            }
            match p.exchange_info() {
                Some(info) if info.capabilities != h.capabilities => Err(format!(
                    "capabilities {:?} differ from the exchange's {:?}",
                    h.capabilities, info.capabilities
                )),
                _ => Ok(()),
            }
        }
        "storage_list" => {
            let r = p
                .storage_list(Collection::Tokens, &ListOptions::default())
                .await;
            run.call("POST /v1/storage {list tokens} [signed]", &r);
            r.map(|_| ()).map_err(|e| e.to_string())
        }
        "storage_write" => {
            let mut doc = Map::new();
            doc.insert("meta".into(), json!({"writtenBy": "keyholder-check"}));
            doc.insert("value".into(), json!(ctx.key));
            let r = p.storage_set(Collection::VaultConfig, &ctx.key, &doc).await;
            run.call(
                &format!("POST /v1/storage {{set vault_config/{}}} [signed]", ctx.key),
                &r,
            );
            r.map_err(|e| e.to_string())
        }
        "storage_read_back" => {
            let r = p.storage_get(Collection::VaultConfig, &ctx.key).await;
            run.call(
                &format!("POST /v1/storage {{get vault_config/{}}} [signed]", ctx.key),
                &r,
            );
            match r.map_err(|e| e.to_string())? {
                Some(doc) if doc["value"] == json!(ctx.key) => Ok(()),
                other => Err(format!("read back {other:?}")),
            }
        }
        "storage_list_batch" => {
            let r = p
                .storage_list_batch(
                    &[Collection::Tokens, Collection::VaultConfig],
                    &ListOptions::default(),
                )
                .await;
            run.call(
                "POST /v1/storage {list_batch tokens,vault_config} [signed]",
                &r,
            );
            let results = r.map_err(|e| e.to_string())?;
            let found = results
                .get("vault_config")
                .is_some_and(|page| page.items.iter().any(|i| i["key"] == json!(ctx.key)));
            if !results.contains_key("tokens") {
                return Err("no tokens page in the batch".into());
            }
            found
                .then_some(())
                .ok_or("the written key is not listed in vault_config".into())
        }
        "storage_delete" => {
            let r = p.storage_delete(Collection::VaultConfig, &ctx.key).await;
            run.call(
                &format!(
                    "POST /v1/storage {{delete vault_config/{}}} [signed]",
                    ctx.key
                ),
                &r,
            );
            r.map_err(|e| e.to_string())?;
            let r = p.storage_get(Collection::VaultConfig, &ctx.key).await;
            run.call(
                &format!("POST /v1/storage {{get vault_config/{}}} [signed]", ctx.key),
                &r,
            );
            match r.map_err(|e| e.to_string())? {
                None => Ok(()),
                Some(_) => Err("the document is still there after delete".into()),
            }
        }
        "agent_store_and_fetch" => {
            let value = format!("kc_{}", random_suffix());
            let data = TokenData::new()
                .secret("accessToken", value.as_str())
                .field("scope", "keyholder-check");
            let ticket = ctx.tickets.store(&ctx.service);
            let r = ctx.agent.store(ticket.expose(), &ctx.service, &data).await;
            run.call(
                &format!("POST /v1/store {{ticket:<masked>, service:{}, tokenData:{{accessToken:<masked>}}}}", ctx.service),
                &r,
            );
            r.map_err(|e| e.to_string())?;
            let ticket = ctx.tickets.credential(&ctx.service);
            let r = ctx.agent.credential(ticket.expose(), &ctx.service).await;
            run.call(
                &format!("GET /v1/credential?ticket=<masked>&service={}", ctx.service),
                &r,
            );
            let credential = r.map_err(|e| e.to_string())?;
            let r = p.storage_delete(Collection::Tokens, &ctx.service).await;
            run.call(
                &format!(
                    "POST /v1/storage {{delete tokens/{}}} [signed]",
                    ctx.service
                ),
                &r,
            );
            match credential.access_token() {
                Some(token) if token.expose() == value => r.map_err(|e| e.to_string()),
                _ => Err("the fetched accessToken is not the stored one".into()),
            }
        }
        "forged_credential_ticket" => {
            let forged = ctx.forger.credential(&ctx.service);
            let resp = ctx
                .probe(
                    run,
                    &ctx.credential_get(&forged, &ctx.service),
                    "ticket signed with a foreign key",
                )
                .await;
            expect(&resp, &[401], Some("ticket_invalid"))
        }
        "platform_address_refused" => {
            let ticket = ctx.tickets.credential(&ctx.service);
            let mut out = ctx.credential_get(&ticket, &ctx.service);
            out.headers
                .push(("X-Forwarded-For".into(), PLATFORM_EGRESS_IP.into()));
            let resp = ctx
                .probe(
                    run,
                    &out,
                    &format!("valid ticket, X-Forwarded-For: {PLATFORM_EGRESS_IP}"),
                )
                .await;
            expect(&resp, &[403], Some("forbidden"))
        }
        "forged_store_ticket" => {
            let forged = ctx.forger.store(&ctx.service);
            let resp = ctx
                .probe(
                    run,
                    &ctx.store_post(&forged, &ctx.service),
                    "ticket signed with a foreign key",
                )
                .await;
            expect(&resp, &[401], Some("ticket_invalid"))
        }
        "stale_timestamp" => {
            let resp = ctx
                .signed_probe(
                    run,
                    p,
                    now_unix() - 600,
                    &new_request_id(),
                    "signed, ts=now-600",
                )
                .await;
            expect(&resp, &[401], Some("auth_failed"))
        }
        "forged_signature" if ctx.asymmetric => {
            // The real key's id, signed by another key.
            let id = new_request_id();
            let mut out = ctx.health_outgoing(p, &id);
            let real = p
                .auth()
                .signing_key()
                .map(PlatformSigningKey::key_id)
                .unwrap_or_default();
            let forger = PlatformSigningKey::generate();
            let (_, target) = p.target(PATH_HEALTH, &[]);
            let forged = sign_envelope(
                &forger,
                now_unix(),
                &new_envelope_nonce(),
                "POST",
                &target,
                out.body.as_deref().unwrap_or_default(),
            )
            .replace(&forger.key_id(), &real);
            set_header(&mut out, HEADER_ENVELOPE, forged);
            let resp = ctx
                .send_probe(
                    run,
                    &out,
                    &id,
                    "envelope with the platform's key id, signed by another key",
                )
                .await;
            expect(&resp, &[401], Some("auth_failed"))
        }
        "forged_signature" => {
            // Same transport (and pin) as the real platform, a foreign secret.
            let forged = p.with_auth(HmacSecret::generate());
            let resp = ctx
                .signed_probe(
                    run,
                    &forged,
                    now_unix(),
                    &new_request_id(),
                    "signed with a foreign secret",
                )
                .await;
            expect(&resp, &[401], Some("auth_failed"))
        }
        "duplicate_request_id" if ctx.asymmetric => {
            // The same signed request, byte for byte, twice (the envelope's nonce is the replay key).
            let id = new_request_id();
            let out = ctx.health_outgoing(p, &id);
            let first = ctx.send_probe(run, &out, &id, "signed, request id R").await;
            expect(&first, &[200], None)?;
            let second = ctx
                .send_probe(
                    run,
                    &out,
                    &id,
                    "same request, same envelope, same request id R",
                )
                .await;
            expect(&second, &[401], Some("auth_failed"))
        }
        "duplicate_request_id" => {
            let id = new_request_id();
            let ts = now_unix();
            let first = ctx
                .signed_probe(run, p, ts, &id, "signed, request id R")
                .await;
            expect(&first, &[200], None)?;
            let second = ctx
                .signed_probe(run, p, ts, &id, "same request, same request id R")
                .await;
            expect(&second, &[401], Some("auth_failed"))
        }
        "wrong_purpose" => {
            let ticket = ctx.tickets.store(&ctx.service);
            let resp = ctx
                .probe(
                    run,
                    &ctx.credential_get(&ticket, &ctx.service),
                    "store ticket on /v1/credential",
                )
                .await;
            expect(&resp, &[401], Some("ticket_invalid"))
        }
        "wrong_service" => {
            let ticket = ctx.tickets.credential(&ctx.service);
            let other = format!("{}-other", ctx.service);
            let resp = ctx
                .probe(
                    run,
                    &ctx.credential_get(&ticket, &other),
                    "ticket for another service",
                )
                .await;
            expect(&resp, &[401], Some("ticket_invalid"))
        }
        "replayed_nonce" => {
            let ticket = ctx.tickets.credential(&ctx.service);
            let out = ctx.credential_get(&ticket, &ctx.service);
            let first = ctx.probe(run, &out, "first use").await;
            // Nothing is stored under this service: 404 means the ticket itself was accepted.
            expect(&first, &[200, 404], None)?;
            let second = ctx.probe(run, &out, "same ticket again").await;
            expect(&second, &[401], Some("ticket_invalid"))
        }
        "expired_ticket" => {
            let now = now_unix();
            let ticket = ctx
                .tickets
                .ticket(Purpose::AgentCredential, &ctx.service)
                .validity(now - 120, now - 60)
                .mint();
            let resp = ctx
                .probe(
                    run,
                    &ctx.credential_get(&ticket, &ctx.service),
                    "exp=now-60",
                )
                .await;
            expect(&resp, &[401], Some("ticket_expired"))
        }
        "unsigned_proxy" => {
            let upstream = LocalUpstream::start()
                .await
                .map_err(|e| format!("local upstream: {e}"))?;
            let ticket = ctx.tickets.proxy(&ctx.service);
            let mut out = Outgoing::new(Method::POST, PATH_PROXY);
            out.body = serde_json::to_vec(&json!({
                "ticket": ticket.expose(),
                "service": ctx.service,
                "upstream": {"url": upstream.url, "method": "GET"},
                "headerTemplates": {"Authorization": "Bearer ${TOKEN}"},
                "requestId": new_request_id(),
            }))
            .ok();
            let resp = ctx
                .probe(
                    run,
                    &out,
                    &format!(
                        "valid proxy ticket, no signature, upstream {}",
                        upstream.url
                    ),
                )
                .await;
            expect(&resp, &[401, 403], None)?;
            match upstream.hits.load(Ordering::SeqCst) {
                0 => Ok(()),
                n => Err(format!(
                    "the upstream was called {n} time(s) for an unsigned request"
                )),
            }
        }
        "unknown_platform_key" => {
            let stranger = p.with_auth(PlatformSigningKey::generate());
            let resp = ctx
                .signed_probe(
                    run,
                    &stranger,
                    now_unix(),
                    &new_request_id(),
                    "envelope from an unknown key",
                )
                .await;
            expect(&resp, &[401], Some("auth_failed"))
        }
        "replayed_envelope_nonce" => {
            let id = new_request_id();
            let out = ctx.health_outgoing(p, &id);
            let first = ctx
                .send_probe(run, &out, &id, "envelope with nonce N")
                .await;
            expect(&first, &[200], None)?;
            let other_id = new_request_id();
            let mut again = Outgoing::new(out.method.clone(), &out.path);
            again.body = out.body.clone();
            again.headers = out.headers.clone();
            set_header(&mut again, HEADER_PLATFORM_REQUEST_ID, other_id.clone());
            let second = ctx
                .send_probe(
                    run,
                    &again,
                    &other_id,
                    "same envelope (nonce N), another request id",
                )
                .await;
            expect(&second, &[401], Some("auth_failed"))
        }
        "body_swapped" => {
            let id = new_request_id();
            let mut out = ctx.health_outgoing(p, &id);
            out.body = serde_json::to_vec(&json!({ "requestId": id, "swapped": true })).ok();
            let resp = ctx
                .send_probe(run, &out, &id, "valid envelope, another body")
                .await;
            expect(&resp, &[401], Some("auth_failed"))
        }
        "hmac_signature_refused" => {
            let hmac = p.with_auth(HmacSecret::generate());
            let resp = ctx
                .signed_probe(
                    run,
                    &hmac,
                    now_unix(),
                    &new_request_id(),
                    "HMAC-signed in an asymmetric binding",
                )
                .await;
            expect(&resp, &[401], Some("auth_failed"))
        }
        "hmac_ticket_refused" => {
            let ticket = TicketIssuer::new(HmacSecret::generate()).credential(&ctx.service);
            let resp = ctx
                .probe(
                    run,
                    &ctx.credential_get(&ticket, &ctx.service),
                    "HMAC platform ticket in an asymmetric binding",
                )
                .await;
            expect(&resp, &[401], Some("ticket_invalid"))
        }
        "removed_platform_key" => {
            let Some(removed) = &ctx.removed else {
                return Err("no removed platform key given".into());
            };
            let old = p.with_auth(removed.duplicate());
            let resp = ctx
                .signed_probe(
                    run,
                    &old,
                    now_unix(),
                    &new_request_id(),
                    &format!("envelope from removed key {}", removed.key_id()),
                )
                .await;
            expect(&resp, &[401], Some("auth_failed"))
        }
        other if PROTOCOL_24_MATRIX.iter().any(|(_, n)| *n == other) => {
            protocol24::run_check(ctx, other, run).await
        }
        name if wire::handles(name) => wire::run_check(ctx, name, run).await,
        other => Err(format!("unknown check {other}")),
    }
}

/// Replaces (or adds) a header of a prepared request.
fn set_header(out: &mut Outgoing, name: &str, value: String) {
    out.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
    out.headers.push((name.to_owned(), value));
}
