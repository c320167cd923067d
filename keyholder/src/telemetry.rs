//! Logs and, when an OTLP endpoint is configured, OpenTelemetry traces (OTLP/HTTP, protobuf by
//! default, JSON with `OTEL_EXPORTER_OTLP_PROTOCOL=http/json`).
//!
//! Off by default, and then free: nothing is started, and the request path only reads one atomic
//! flag before skipping the trace work. With `--otlp-endpoint` (or `OTEL_EXPORTER_OTLP_ENDPOINT`)
//! each request is a server span named by its route pattern, with child spans for ticket
//! verification, the custody policy, the egress policy, decryption, the upstream call and the
//! group commit; a W3C `traceparent` from the platform makes it part of the platform's trace
//! (W3C parsing and injection are the OpenTelemetry SDK's `TraceContextPropagator`), and proxied
//! calls carry the trace context on to the upstream. Span attributes are ids, routes, methods,
//! statuses and host names only: never a secret, a ticket or a credential.
//!
//! Why not through `tracing-opentelemetry` and the SDK's batch processor (which an earlier version
//! used): measured with `keyholder-bench`, the bridge's span bookkeeping (a registry slot per span,
//! enter/exit on every poll, attributes visited field by field) and the SDK's export path (a
//! `SpanData` per span, then a copy of each into the OTLP message types, allocated on one thread
//! and freed on another) cost ~45% of a credential GET. Here a request's spans are one record: the
//! request span's ids, times and attributes, and its children as already-timed spans (start, end,
//! static name, kept in a task-local while the request runs). At the end of the request they are
//! written as OTLP protobuf with prost's field encoders (static keys, no message structs, no
//! per-span allocation) on the request's own thread and appended to one buffer, which the exporter
//! thread takes whole, wraps and posts. The `opentelemetry` crates still carry the W3C trace
//! context in and out, and the tests read the export back with `opentelemetry-proto`'s types.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// Child span names (the names; the e2e test looks for them).
pub const SPAN_TICKET: &str = "ticket.verify";
/// The custody policy (`http::policy`).
pub const SPAN_POLICY: &str = "policy";
/// The egress policy of a proxied call.
pub const SPAN_EGRESS_POLICY: &str = "egress.policy";
/// Reading and decrypting a credential.
pub const SPAN_DECRYPT: &str = "credential.decrypt";
/// The proxied call to the upstream (a client span).
pub const SPAN_UPSTREAM: &str = "upstream.call";
/// Waiting for a group commit (durable before the answer).
pub const SPAN_COMMIT: &str = "db.group_commit";

static ENABLED: AtomicBool = AtomicBool::new(false);
static EXPORTER: OnceLock<Arc<Exporter>> = OnceLock::new();

/// Where traces go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpSettings {
    /// The OTLP/HTTP traces URL (`<endpoint>/v1/traces`).
    pub traces_url: String,
    /// `service.name` of the resource (`OTEL_SERVICE_NAME`, default `keyholder`).
    pub service_name: String,
    /// How often finished spans are sent (sooner when a batch is full).
    pub export_interval: Duration,
    /// Protobuf (`http/protobuf`, the default) or JSON (`http/json`).
    pub json: bool,
}

impl OtlpSettings {
    /// From `--otlp-endpoint` / `OTEL_EXPORTER_OTLP_ENDPOINT` (the collector's base URL, as the
    /// OpenTelemetry specification defines it: `/v1/traces` is appended unless already there).
    pub fn from_endpoint(endpoint: &str) -> anyhow::Result<OtlpSettings> {
        let url = url::Url::parse(endpoint.trim()).map_err(|e| {
            anyhow::anyhow!("invalid setting --otlp-endpoint / OTEL_EXPORTER_OTLP_ENDPOINT: {e}")
        })?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            anyhow::bail!(
                "invalid setting --otlp-endpoint / OTEL_EXPORTER_OTLP_ENDPOINT: must be an http(s) URL such as http://127.0.0.1:4318"
            );
        }
        let base = url.as_str().trim_end_matches('/');
        let traces_url = if base.ends_with("/v1/traces") {
            base.to_string()
        } else {
            format!("{base}/v1/traces")
        };
        let service_name = std::env::var("OTEL_SERVICE_NAME")
            .ok()
            .filter(|s| !s.trim().is_empty())
            .unwrap_or_else(|| "keyholder".to_string());
        let protocol = std::env::var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL"))
            .ok()
            .filter(|s| !s.trim().is_empty());
        let json = match protocol.as_deref().map(str::trim) {
            None | Some("http/protobuf") => false,
            Some("http/json") => true,
            Some(other) => anyhow::bail!(
                "invalid setting OTEL_EXPORTER_OTLP_PROTOCOL: '{other}' (Keyholder exports OTLP/HTTP: http/protobuf or http/json)"
            ),
        };
        Ok(OtlpSettings {
            traces_url,
            service_name,
            export_interval: Duration::from_secs(2),
            json,
        })
    }
}

/// Whether traces are exported (an OTLP endpoint was configured at start).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Installs the process's logging (filter, `text` or `json` on stderr) and, with `otlp`, starts
/// the trace exporter. Once per process.
pub fn init(filter: &str, format: &str, otlp: Option<&OtlpSettings>) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .map_err(|e| anyhow::anyhow!("invalid setting --log / KEYHOLDER_LOG: {e}"))?;
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        // By default a failed log write is reported with `eprintln!`, which panics when stderr
        // cannot be written (a log file on a full disk): the worker died and the connection dropped.
        .log_internal_errors(false);
    let fmt = if format == "json" {
        fmt.json().with_filter(filter).boxed()
    } else {
        fmt.with_filter(filter).boxed()
    };
    tracing_subscriber::registry()
        .with(fmt)
        .try_init()
        .map_err(|e| anyhow::anyhow!("logging already set up: {e}"))?;
    if let Some(settings) = otlp {
        init_traces_only(settings)?;
    }
    Ok(())
}

/// Only the trace exporter (no log output), for embedding the server (the e2e tests).
pub fn init_traces_only(otlp: &OtlpSettings) -> anyhow::Result<()> {
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| anyhow::anyhow!("--otlp-endpoint: {e}"))?;
    let exporter = Arc::new(Exporter {
        pending: Mutex::new(Pending::default()),
        ready: Condvar::new(),
        sender: Mutex::new(Sender {
            client,
            url: otlp.traces_url.clone(),
            resource: Resource::new(&otlp.service_name),
        }),
        json: otlp.json,
        interval: otlp.export_interval,
        dropped: AtomicU64::new(0),
    });
    if EXPORTER.set(Arc::clone(&exporter)).is_err() {
        anyhow::bail!("traces already set up");
    }
    std::thread::Builder::new()
        .name("otlp-export".into())
        .spawn(move || exporter.run())
        .map_err(|e| anyhow::anyhow!("cannot start the trace exporter: {e}"))?;
    ENABLED.store(true, Ordering::Relaxed);
    Ok(())
}

/// Sends every finished span now (blocking: call off the async runtime).
pub fn flush() {
    if let Some(exporter) = EXPORTER.get() {
        exporter.export_pending();
    }
}

/// Sends what is left (at exit).
pub fn shutdown() {
    flush();
}

// ---------------------------------------------------------------------------------------------
// Recording: one record per request

tokio::task_local! {
    /// The trace of the request being handled (set by the request-context layer around the
    /// request's future, only with traces on).
    static CURRENT: Rc<RequestTrace>;
}

/// A request's span while it runs: its ids, and its children as they finish.
pub struct RequestTrace {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    /// The platform's span, when its `traceparent` named one.
    parent: Option<[u8; 8]>,
    /// The platform's `tracestate`, passed on unchanged (and its header form, for the export).
    trace_state: TraceState,
    trace_state_header: Option<String>,
    /// Recorded and exported (the platform's sampled flag; set when we start the trace).
    sampled: bool,
    start: u64,
    children: RefCell<Vec<ChildSpan>>,
}

/// What the request-context layer knows once the answer is ready.
pub struct RequestOutcome<'a> {
    /// `GET`, `POST`, ... (`_OTHER` for anything else).
    pub method: &'static str,
    /// The route pattern (never the raw path).
    pub route: &'a str,
    /// The answer's status.
    pub status: u16,
    /// The request id.
    pub request_id: &'a str,
    /// The agent named by the ticket, if any.
    pub agent_id: Option<&'a str>,
    /// The proxy named by the ticket, if any.
    pub proxy_id: Option<&'a str>,
}

impl RequestTrace {
    /// A request's trace: a child of the W3C trace context in `headers` (`traceparent`,
    /// `tracestate`) if the platform sent one, else a new trace. `None` with traces off.
    pub fn start(headers: &actix_web::http::header::HeaderMap) -> Option<Rc<RequestTrace>> {
        if !enabled() {
            return None;
        }
        let start = now_nanos();
        let remote = match headers.contains_key("traceparent") {
            true => {
                let cx = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
                let sc = cx.span().span_context().clone();
                sc.is_valid().then_some(sc)
            }
            false => None,
        };
        let (trace_id, parent, trace_state, sampled) = match remote {
            Some(sc) => (
                sc.trace_id().to_bytes(),
                Some(sc.span_id().to_bytes()),
                sc.trace_state().clone(),
                sc.is_sampled(),
            ),
            None => {
                let (a, b) = (fast_random(), fast_random());
                let mut id = [0u8; 16];
                id[..8].copy_from_slice(&a.to_be_bytes());
                id[8..].copy_from_slice(&b.to_be_bytes());
                (id, None, TraceState::default(), true)
            }
        };
        let trace_state_header = match trace_state.header() {
            h if h.is_empty() => None,
            h => Some(h),
        };
        Some(Rc::new(RequestTrace {
            trace_id,
            span_id: new_span_id(),
            parent,
            trace_state,
            trace_state_header,
            sampled,
            start,
            children: RefCell::new(Vec::new()),
        }))
    }

    /// Runs `fut` (the rest of the request) with this trace as the current one.
    pub async fn scope<F: Future>(self: &Rc<Self>, fut: F) -> F::Output {
        CURRENT.scope(Rc::clone(self), fut).await
    }

    /// Ends the request span and hands it with its children to the exporter (written out here,
    /// on the request's thread, so nothing allocated for the request outlives it).
    pub fn finish(&self, outcome: RequestOutcome<'_>) {
        if !self.sampled {
            return;
        }
        let Some(exporter) = EXPORTER.get() else {
            return;
        };
        let Ok(children) = self.children.try_borrow() else {
            return;
        };
        exporter.append(&RequestSpans {
            trace_id: self.trace_id,
            span_id: self.span_id,
            parent: self.parent,
            trace_state: self.trace_state_header.as_deref(),
            start: self.start,
            end: now_nanos(),
            outcome: &outcome,
            children: &children,
        });
    }
}

/// A finished child span (kept until the request's record is handed over).
struct ChildSpan {
    name: &'static str,
    span_id: [u8; 8],
    client: bool,
    start: u64,
    end: u64,
    attributes: Vec<(&'static str, String)>,
}

/// A child span of the current request while it runs: `start`, then `end`. Without traces (or
/// outside a request) it holds nothing and costs one atomic load.
pub struct Child {
    name: &'static str,
    at: Option<([u8; 8], u64)>,
}

impl Child {
    /// Starts a child span of the current request's span.
    pub fn start(name: &'static str) -> Child {
        let at = match enabled() {
            true => CURRENT.try_with(|_| (new_span_id(), now_nanos())).ok(),
            false => None,
        };
        Child { name, at }
    }

    /// Whether this span is recorded (traces on, inside a request): its attributes are worth
    /// working out.
    pub fn is_recording(&self) -> bool {
        self.at.is_some()
    }

    /// Writes this span's W3C trace context into an outbound request's headers (replacing any
    /// `traceparent`/`tracestate` already there), so the upstream's spans are its children.
    pub fn inject(&self, headers: &mut reqwest::header::HeaderMap) {
        let Some((span_id, _)) = self.at else {
            return;
        };
        let _ = CURRENT.try_with(|trace| {
            let flags = match trace.sampled {
                true => TraceFlags::SAMPLED,
                false => TraceFlags::default(),
            };
            let sc = SpanContext::new(
                TraceId::from_bytes(trace.trace_id),
                SpanId::from_bytes(span_id),
                flags,
                false,
                trace.trace_state.clone(),
            );
            let cx = opentelemetry::Context::new().with_remote_span_context(sc);
            TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
        });
    }

    /// Ends the span now.
    pub fn end(self) {
        self.end_with(false, Vec::new());
    }

    /// Ends a client span (an outbound call) now, with its attributes.
    pub fn end_client(self, attributes: Vec<(&'static str, String)>) {
        self.end_with(true, attributes);
    }

    fn end_with(self, client: bool, attributes: Vec<(&'static str, String)>) {
        let Some((span_id, start)) = self.at else {
            return;
        };
        let end = now_nanos();
        let _ = CURRENT.try_with(|trace| {
            if let Ok(mut children) = trace.children.try_borrow_mut() {
                children.push(ChildSpan {
                    name: self.name,
                    span_id,
                    client,
                    start,
                    end,
                    attributes,
                });
            }
        });
    }
}

/// Awaits `fut` as a child span named `name` of the current request.
pub async fn timed<F: Future>(name: &'static str, fut: F) -> F::Output {
    if !enabled() {
        return fut.await;
    }
    let child = Child::start(name);
    let out = fut.await;
    child.end();
    out
}

/// The `http.request.method` value of `method` (semantic conventions: `_OTHER` for the rest).
pub fn method_name(method: &actix_web::http::Method) -> &'static str {
    use actix_web::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "_OTHER",
    }
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

thread_local! {
    static RNG: Cell<u64> = Cell::new(rand::random::<u64>() | 1);
}

/// Ids need to be unique, not secret: splitmix64 from a per-thread random seed (the SDK uses a
/// small non-cryptographic generator too).
fn fast_random() -> u64 {
    RNG.with(|state| {
        let s = state.get().wrapping_add(0x9E37_79B9_7F4A_7C15);
        state.set(s);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    })
}

fn new_span_id() -> [u8; 8] {
    loop {
        let id = fast_random();
        if id != 0 {
            return id.to_be_bytes();
        }
    }
}

struct HeaderExtractor<'a>(&'a actix_web::http::header::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct HeaderInjector<'a>(&'a mut reqwest::header::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            reqwest::header::HeaderName::from_bytes(key.as_bytes()),
            reqwest::header::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Export: a buffer of request records, taken whole by one thread, written as OTLP and posted

/// A finished request: its span and its children.
struct RequestSpans<'a> {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    parent: Option<[u8; 8]>,
    trace_state: Option<&'a str>,
    start: u64,
    end: u64,
    outcome: &'a RequestOutcome<'a>,
    children: &'a [ChildSpan],
}

/// Requests per export (the exporter is woken early when this many are waiting).
const BATCH: usize = 4096;
/// Encoded spans kept while the collector is slow or away (under the OpenTelemetry Collector's
/// default request limit); beyond this, requests' spans are dropped (and the drop logged).
const MAX_PENDING_BYTES: usize = 8 << 20;

/// Spans written but not yet sent: the repeated `ScopeSpans.spans` fields (protobuf) or the
/// comma-separated span objects (JSON).
#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    requests: usize,
}

struct Exporter {
    pending: Mutex<Pending>,
    ready: Condvar,
    /// Held while a batch is sent (by the thread or by `flush`), so batches go in order.
    sender: Mutex<Sender>,
    json: bool,
    interval: Duration,
    dropped: AtomicU64,
}

thread_local! {
    /// Where a request's spans are written before they join the batch (reused, never shrunk).
    static SCRATCH: RefCell<(Vec<u8>, Vec<u8>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

impl Exporter {
    fn append(&self, spans: &RequestSpans<'_>) {
        let _ = SCRATCH.try_with(|scratch| {
            let Ok(mut scratch) = scratch.try_borrow_mut() else {
                return;
            };
            let (out, span) = &mut *scratch;
            out.clear();
            match self.json {
                true => json::request_spans(out, spans),
                false => proto::request_spans(out, span, spans),
            }
            let Ok(mut pending) = self.pending.lock() else {
                return;
            };
            if pending.bytes.len() + out.len() > MAX_PENDING_BYTES {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            if self.json && !pending.bytes.is_empty() {
                pending.bytes.push(b',');
            }
            pending.bytes.extend_from_slice(out);
            pending.requests += 1;
            // Woken once per batch, never per request.
            if pending.requests == BATCH {
                self.ready.notify_one();
            }
        });
    }

    fn run(&self) {
        loop {
            let Ok(pending) = self.pending.lock() else {
                return;
            };
            let waited = self
                .ready
                .wait_timeout_while(pending, self.interval, |p| p.requests < BATCH);
            match waited {
                Ok(pending) => drop(pending),
                Err(_) => return,
            }
            self.export_pending();
        }
    }

    fn export_pending(&self) {
        let Ok(mut sender) = self.sender.lock() else {
            return;
        };
        let spans = match self.pending.lock() {
            Ok(mut pending) if pending.requests > 0 => {
                let capacity = pending.bytes.capacity();
                pending.requests = 0;
                std::mem::replace(&mut pending.bytes, Vec::with_capacity(capacity))
            }
            _ => return,
        };
        sender.send(&spans, self.json);
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            tracing::warn!(
                dropped,
                "trace export: requests' spans dropped while the collector was slow"
            );
        }
    }
}

struct Resource {
    service_name: String,
}

impl Resource {
    fn new(service_name: &str) -> Resource {
        Resource {
            service_name: service_name.to_string(),
        }
    }
}

struct Sender {
    client: reqwest::blocking::Client,
    url: String,
    resource: Resource,
}

impl Sender {
    fn send(&mut self, spans: &[u8], json: bool) {
        let (content_type, body) = match json {
            true => (
                "application/json",
                json::export_request(&self.resource, spans),
            ),
            false => (
                "application/x-protobuf",
                proto::export_request(&self.resource, spans),
            ),
        };
        let sent = self
            .client
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(body)
            .send();
        match sent {
            Ok(answer) if answer.status().is_success() => {}
            Ok(answer) => {
                tracing::warn!(status = answer.status().as_u16(), "trace export refused")
            }
            Err(err) => tracing::warn!(error = %err, "trace export failed"),
        }
    }
}

const SCOPE_NAME: &str = "keyholder";
const SERVICE_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The server span's attributes, in order (absent ids are left out).
fn server_attributes<'a>(
    outcome: &RequestOutcome<'a>,
) -> [(&'static str, Option<AttrValue<'a>>); 6] {
    [
        ("http.request.method", Some(AttrValue::Str(outcome.method))),
        ("http.route", Some(AttrValue::Str(outcome.route))),
        (
            "http.response.status_code",
            Some(AttrValue::Int(i64::from(outcome.status))),
        ),
        ("request_id", Some(AttrValue::Str(outcome.request_id))),
        ("agent_id", outcome.agent_id.map(AttrValue::Str)),
        ("proxy_id", outcome.proxy_id.map(AttrValue::Str)),
    ]
}

#[derive(Clone, Copy)]
enum AttrValue<'a> {
    Str(&'a str),
    Int(i64),
}

/// OTLP protobuf (`opentelemetry/proto/collector/trace/v1`), written field by field with prost's
/// encoders: no message structs are built per span, so nothing is allocated per request (the
/// tests decode the result with `opentelemetry-proto`'s own types).
mod proto {
    use prost::encoding::{self, encode_key, encode_varint, encoded_len_varint, key_len, WireType};

    use super::{server_attributes, AttrValue, RequestSpans, Resource};

    // Span.kind
    const KIND_INTERNAL: u64 = 1;
    const KIND_SERVER: u64 = 2;
    const KIND_CLIENT: u64 = 3;
    // Status.code
    const STATUS_ERROR: u64 = 2;
    // Span.flags: the W3C flags, with "whether the parent is remote" known.
    const FLAG_HAS_IS_REMOTE: u32 = 0x100;
    const FLAG_IS_REMOTE: u32 = 0x200;

    /// The head of a length-delimited field of `len` bytes.
    fn delimited(buf: &mut Vec<u8>, field: u32, len: usize) {
        encode_key(field, WireType::LengthDelimited, buf);
        encode_varint(len as u64, buf);
    }

    fn bytes(buf: &mut Vec<u8>, field: u32, value: &[u8]) {
        delimited(buf, field, value.len());
        buf.extend_from_slice(value);
    }

    /// Length of a length-delimited field of `len` bytes, head included.
    fn delimited_len(field: u32, len: usize) -> usize {
        key_len(field) + encoded_len_varint(len as u64) + len
    }

    fn fixed64(buf: &mut Vec<u8>, field: u32, value: u64) {
        encoding::fixed64::encode(field, &value, buf);
    }

    fn fixed32(buf: &mut Vec<u8>, field: u32, value: u32) {
        encoding::fixed32::encode(field, &value, buf);
    }

    fn uint(buf: &mut Vec<u8>, field: u32, value: u64) {
        encoding::uint64::encode(field, &value, buf);
    }

    /// `KeyValue { key = 1; value = 2 (AnyValue { string_value = 1 | int_value = 3 }) }`.
    fn attribute(buf: &mut Vec<u8>, field: u32, name: &str, value: AttrValue<'_>) {
        let any_len = match value {
            AttrValue::Str(s) => delimited_len(1, s.len()),
            AttrValue::Int(i) => encoding::int64::encoded_len(3, &i),
        };
        let kv_len = delimited_len(1, name.len()) + delimited_len(2, any_len);
        delimited(buf, field, kv_len);
        bytes(buf, 1, name.as_bytes());
        delimited(buf, 2, any_len);
        match value {
            AttrValue::Str(s) => bytes(buf, 1, s.as_bytes()),
            AttrValue::Int(i) => encoding::int64::encode(3, &i, buf),
        }
    }

    /// A request's spans as repeated `ScopeSpans.spans` fields, appended to `out`; `span` is
    /// where each span is written before it is length-prefixed.
    pub(super) fn request_spans(out: &mut Vec<u8>, span: &mut Vec<u8>, request: &RequestSpans<'_>) {
        span.clear();
        server_span(span, request);
        bytes(out, 2, span);
        for child in request.children {
            span.clear();
            bytes(span, 1, &request.trace_id);
            bytes(span, 2, &child.span_id);
            if let Some(state) = request.trace_state {
                bytes(span, 3, state.as_bytes());
            }
            bytes(span, 4, &request.span_id);
            bytes(span, 5, child.name.as_bytes());
            let kind = match child.client {
                true => KIND_CLIENT,
                false => KIND_INTERNAL,
            };
            uint(span, 6, kind);
            fixed64(span, 7, child.start);
            fixed64(span, 8, child.end);
            for (name, value) in &child.attributes {
                attribute(span, 9, name, AttrValue::Str(value));
            }
            fixed32(span, 16, 0x01 | FLAG_HAS_IS_REMOTE);
            bytes(out, 2, span);
        }
    }

    /// The `ExportTraceServiceRequest` around `spans` (what [`request_spans`] wrote): one
    /// resource, one scope.
    pub(super) fn export_request(resource: &Resource, spans: &[u8]) -> Vec<u8> {
        let mut head = Vec::with_capacity(128);
        // ResourceSpans.resource = 1 (Resource.attributes = 1)
        let mut res = Vec::with_capacity(64);
        attribute(
            &mut res,
            1,
            "service.name",
            AttrValue::Str(&resource.service_name),
        );
        attribute(
            &mut res,
            1,
            "service.version",
            AttrValue::Str(super::SERVICE_VERSION),
        );
        bytes(&mut head, 1, &res);
        // ResourceSpans.scope_spans = 2: ScopeSpans.scope = 1, then the spans.
        let mut scope = Vec::with_capacity(32);
        bytes(&mut scope, 1, super::SCOPE_NAME.as_bytes());
        bytes(&mut scope, 2, super::SERVICE_VERSION.as_bytes());
        let scope_spans_len = delimited_len(1, scope.len()) + spans.len();
        delimited(&mut head, 2, scope_spans_len);
        bytes(&mut head, 1, &scope);
        // ExportTraceServiceRequest.resource_spans = 1
        let resource_spans_len = head.len() + spans.len();
        let mut out = Vec::with_capacity(resource_spans_len + 16);
        delimited(&mut out, 1, resource_spans_len);
        out.extend_from_slice(&head);
        out.extend_from_slice(spans);
        out
    }

    fn server_span(span: &mut Vec<u8>, request: &RequestSpans<'_>) {
        let outcome = request.outcome;
        bytes(span, 1, &request.trace_id);
        bytes(span, 2, &request.span_id);
        if let Some(state) = request.trace_state {
            bytes(span, 3, state.as_bytes());
        }
        if let Some(parent) = &request.parent {
            bytes(span, 4, parent);
        }
        // Name: "<method> <route>", written without building the string.
        delimited(span, 5, outcome.method.len() + 1 + outcome.route.len());
        span.extend_from_slice(outcome.method.as_bytes());
        span.push(b' ');
        span.extend_from_slice(outcome.route.as_bytes());
        uint(span, 6, KIND_SERVER);
        fixed64(span, 7, request.start);
        fixed64(span, 8, request.end);
        for (name, value) in server_attributes(outcome) {
            if let Some(value) = value {
                attribute(span, 9, name, value);
            }
        }
        if outcome.status >= 500 {
            // Status { code = 3 }
            let mut status = Vec::with_capacity(2);
            uint(&mut status, 3, STATUS_ERROR);
            bytes(span, 15, &status);
        }
        let remote = match request.parent {
            Some(_) => FLAG_IS_REMOTE,
            None => 0,
        };
        fixed32(span, 16, 0x01 | FLAG_HAS_IS_REMOTE | remote);
    }
}

/// OTLP JSON (`http/json`): the protobuf messages in their JSON mapping (ids in hex, 64-bit
/// integers as strings). Opt-in, and dearer than protobuf.
mod json {
    use serde_json::{json, Value};

    use super::{server_attributes, AttrValue, RequestSpans, Resource};

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn attribute(name: &str, value: AttrValue<'_>) -> Value {
        match value {
            AttrValue::Str(s) => json!({"key": name, "value": {"stringValue": s}}),
            AttrValue::Int(i) => json!({"key": name, "value": {"intValue": i.to_string()}}),
        }
    }

    /// A request's spans as comma-separated JSON objects, appended to `out`.
    pub(super) fn request_spans(out: &mut Vec<u8>, request: &RequestSpans<'_>) {
        let outcome = request.outcome;
        let trace_id = hex(&request.trace_id);
        let span_id = hex(&request.span_id);
        let trace_state = request.trace_state.unwrap_or_default();
        let attributes: Vec<Value> = server_attributes(outcome)
            .into_iter()
            .filter_map(|(name, value)| value.map(|v| attribute(name, v)))
            .collect();
        let mut server = json!({
            "traceId": trace_id,
            "spanId": span_id,
            "traceState": trace_state,
            "parentSpanId": request.parent.map(|p| hex(&p)).unwrap_or_default(),
            "name": format!("{} {}", outcome.method, outcome.route),
            "kind": 2,
            "startTimeUnixNano": request.start.to_string(),
            "endTimeUnixNano": request.end.to_string(),
            "attributes": attributes,
        });
        if outcome.status >= 500 {
            server["status"] = json!({"code": 2});
        }
        let _ = serde_json::to_writer(&mut *out, &server);
        for child in request.children {
            let span = json!({
                "traceId": trace_id,
                "spanId": hex(&child.span_id),
                "traceState": trace_state,
                "parentSpanId": span_id,
                "name": child.name,
                "kind": if child.client { 3 } else { 1 },
                "startTimeUnixNano": child.start.to_string(),
                "endTimeUnixNano": child.end.to_string(),
                "attributes": child.attributes.iter()
                    .map(|(name, value)| attribute(name, AttrValue::Str(value)))
                    .collect::<Vec<_>>(),
            });
            out.push(b',');
            let _ = serde_json::to_writer(&mut *out, &span);
        }
    }

    /// The `ExportTraceServiceRequest` around `spans` (what [`request_spans`] wrote).
    pub(super) fn export_request(resource: &Resource, spans: &[u8]) -> Vec<u8> {
        let envelope = json!({"resourceSpans": [{
            "resource": {"attributes": [
                attribute("service.name", AttrValue::Str(&resource.service_name)),
                attribute("service.version", AttrValue::Str(super::SERVICE_VERSION)),
            ]},
            "scopeSpans": [{
                "scope": {"name": super::SCOPE_NAME, "version": super::SERVICE_VERSION},
                "spans": [],
            }],
        }]})
        .to_string();
        // The spans go inside the empty array, the one `[]` in the envelope.
        match envelope.split_once("[]") {
            Some((head, tail)) => {
                let mut out = Vec::with_capacity(envelope.len() + spans.len());
                out.extend_from_slice(head.as_bytes());
                out.push(b'[');
                out.extend_from_slice(spans);
                out.push(b']');
                out.extend_from_slice(tail.as_bytes());
                out
            }
            None => envelope.into_bytes(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_gets_the_traces_path_once_and_bad_ones_are_refused() {
        let s = OtlpSettings::from_endpoint("http://127.0.0.1:4318").unwrap();
        assert_eq!(s.traces_url, "http://127.0.0.1:4318/v1/traces");
        assert!(
            !s.json,
            "protobuf unless OTEL_EXPORTER_OTLP_PROTOCOL says http/json"
        );
        let s = OtlpSettings::from_endpoint("https://otel.example/v1/traces/").unwrap();
        assert_eq!(s.traces_url, "https://otel.example/v1/traces");
        let s = OtlpSettings::from_endpoint("https://otel.example/prefix/").unwrap();
        assert_eq!(s.traces_url, "https://otel.example/prefix/v1/traces");
        for bad in ["", "127.0.0.1:4318", "ftp://otel.example", "http://"] {
            assert!(OtlpSettings::from_endpoint(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn off_by_default_nothing_is_started_injected_or_recorded() {
        // No `init` in this process: traces are off.
        assert!(!enabled());
        let mut headers = actix_web::http::header::HeaderMap::new();
        headers.insert(
            actix_web::http::header::HeaderName::from_static("traceparent"),
            actix_web::http::header::HeaderValue::from_static(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
        );
        assert!(RequestTrace::start(&headers).is_none());
        let child = Child::start(SPAN_UPSTREAM);
        assert!(child.at.is_none());
        let mut out = reqwest::header::HeaderMap::new();
        child.inject(&mut out);
        assert!(out.is_empty());
    }

    fn children(n: usize) -> Vec<ChildSpan> {
        (0..n)
            .map(|i| ChildSpan {
                name: SPAN_DECRYPT,
                span_id: [i as u8 + 1; 8],
                client: i == 1,
                start: 1_700_000_000_000_010_000 + i as u64,
                end: 1_700_000_000_000_020_000 + i as u64,
                attributes: match i {
                    1 => vec![("server.address", "x".repeat(200))],
                    _ => Vec::new(),
                },
            })
            .collect()
    }

    fn outcome(status: u16) -> RequestOutcome<'static> {
        RequestOutcome {
            method: "GET",
            route: "/v1/credential",
            status,
            request_id: "req_0123456789ab",
            agent_id: Some("agent_é"),
            proxy_id: None,
        }
    }

    fn sample<'a>(
        children: &'a [ChildSpan],
        outcome: &'a RequestOutcome<'a>,
        parent: bool,
    ) -> RequestSpans<'a> {
        RequestSpans {
            trace_id: [0xab; 16],
            span_id: [0x11; 8],
            parent: parent.then_some([0x22; 8]),
            trace_state: parent.then_some("vendor=1"),
            start: 1_700_000_000_000_000_000,
            end: 1_700_000_000_000_250_000,
            outcome,
            children,
        }
    }

    /// The protobuf written field by field reads back, with the official OTLP message types, as the spans
    /// recorded (large fields included, so multi-byte lengths are exercised).
    #[test]
    fn protobuf_export_decodes_as_otlp() {
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
        use opentelemetry_proto::tonic::common::v1::any_value::Value;
        use prost::Message as _;
        let resource = Resource::new("svc");
        let kids: Vec<Vec<ChildSpan>> = (0..4).map(children).collect();
        let (ok, failed) = (outcome(200), outcome(503));
        let (mut spans, mut scratch) = (Vec::new(), Vec::new());
        let mut expected = 0;
        for i in 0..300 {
            let kids = &kids[i % 4];
            let outcome = if i == 7 { &failed } else { &ok };
            proto::request_spans(&mut spans, &mut scratch, &sample(kids, outcome, i % 2 == 0));
            expected += 1 + kids.len();
        }
        let out = proto::export_request(&resource, &spans);
        let decoded = ExportTraceServiceRequest::decode(out.as_slice()).unwrap();
        assert_eq!(decoded.resource_spans.len(), 1);
        let rs = &decoded.resource_spans[0];
        let res = rs.resource.as_ref().unwrap();
        assert_eq!(res.attributes[0].key, "service.name");
        let value = res.attributes[0].value.as_ref().unwrap().value.as_ref();
        assert!(matches!(value, Some(Value::StringValue(s)) if s == "svc"));
        let ss = &rs.scope_spans[0];
        assert_eq!(ss.scope.as_ref().unwrap().name, "keyholder");
        assert_eq!(ss.spans.len(), expected);
        let server = &ss.spans[0];
        assert_eq!(server.name, "GET /v1/credential");
        assert_eq!(server.trace_id, vec![0xab; 16]);
        assert_eq!(server.span_id, vec![0x11; 8]);
        assert_eq!(server.parent_span_id, vec![0x22; 8]);
        assert_eq!(server.trace_state, "vendor=1");
        assert_eq!(server.kind, 2);
        assert_eq!(server.start_time_unix_nano, 1_700_000_000_000_000_000);
        assert_eq!(server.end_time_unix_nano, 1_700_000_000_000_250_000);
        assert_eq!(server.flags, 0x301);
        let attrs: Vec<(String, String)> = server
            .attributes
            .iter()
            .map(|kv| {
                let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                    Some(Value::StringValue(s)) => s.clone(),
                    Some(Value::IntValue(i)) => i.to_string(),
                    other => format!("{other:?}"),
                };
                (kv.key.clone(), v)
            })
            .collect();
        assert_eq!(
            attrs,
            vec![
                ("http.request.method".into(), "GET".into()),
                ("http.route".into(), "/v1/credential".into()),
                ("http.response.status_code".into(), "200".into()),
                ("request_id".into(), "req_0123456789ab".into()),
                ("agent_id".into(), "agent_é".into()),
            ]
        );
        // A request without a remote parent is a root span.
        let root = ss
            .spans
            .iter()
            .find(|s| s.kind == 2 && s.parent_span_id.is_empty())
            .unwrap();
        assert_eq!(root.flags, 0x101);
        // Children: under the server span, timed, the client one with its attribute.
        let client = ss.spans.iter().find(|s| s.kind == 3).unwrap();
        assert_eq!(client.name, "credential.decrypt");
        assert_eq!(client.parent_span_id, vec![0x11; 8]);
        assert_eq!(client.attributes[0].key, "server.address");
        assert!(matches!(
            client.attributes[0].value.as_ref().and_then(|v| v.value.as_ref()),
            Some(Value::StringValue(s)) if s.len() == 200
        ));
        assert!(ss.spans.iter().any(|s| s.kind == 1));
        let failed = ss
            .spans
            .iter()
            .filter(|s| s.status.as_ref().map(|st| st.code) == Some(2))
            .count();
        assert_eq!(failed, 1, "the 503 answer's span has status ERROR");
    }

    #[test]
    fn json_export_has_the_otlp_json_shape() {
        let (kids, ok) = (children(2), outcome(200));
        let mut spans = Vec::new();
        json::request_spans(&mut spans, &sample(&kids, &ok, true));
        spans.push(b',');
        json::request_spans(&mut spans, &sample(&kids, &ok, false));
        let body = json::export_request(&Resource::new("svc"), &spans);
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            body["resourceSpans"][0]["resource"]["attributes"][0]["key"],
            "service.name"
        );
        let spans = body["resourceSpans"][0]["scopeSpans"][0]["spans"]
            .as_array()
            .unwrap();
        assert_eq!(spans.len(), 6);
        assert_eq!(spans[3]["parentSpanId"], "");
        assert_eq!(spans[0]["traceId"], "ab".repeat(16));
        assert_eq!(spans[0]["parentSpanId"], "22".repeat(8));
        assert_eq!(spans[0]["name"], "GET /v1/credential");
        assert_eq!(spans[1]["parentSpanId"], "11".repeat(8));
        assert_eq!(spans[0]["startTimeUnixNano"], "1700000000000000000");
    }
}
