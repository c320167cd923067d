//! Logs and, when an OTLP endpoint is configured, OpenTelemetry traces (OTLP/HTTP, protobuf by
//! default, JSON with `OTEL_EXPORTER_OTLP_PROTOCOL=http/json`).
//!
//! Off by default, and then free: no OpenTelemetry layer is installed, and the request path only
//! reads one atomic flag before skipping the trace-context work. With `--otlp-endpoint` (or
//! `OTEL_EXPORTER_OTLP_ENDPOINT`) each request is a server span named by its route pattern, with
//! child spans for ticket verification, the egress policy, decryption, the upstream call and the
//! group commit; a W3C `traceparent` from the platform makes it part of the platform's trace, and
//! proxied calls carry the trace context on to the upstream. Span attributes are ids, routes,
//! methods, statuses and service names only: never a secret, a ticket or a credential.
//!
//! With traces on, a request costs a few spans (measured by `keyholder-bench`'s `trace_cpu_ratio`):
//! spans carry only the attributes named above (no source location, thread or busy/idle times,
//! which the bridge would add to every span and measure on every poll), events below `warn` are
//! not turned into span events, and spans are exported as protobuf (JSON encoding cost several
//! times the CPU of the whole request path).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// Target of the child spans (debug level): disabled by the default log filter, so they cost
/// nothing when traces are off; the OpenTelemetry layer takes them.
pub const TARGET: &str = "keyholder::trace";

static ENABLED: AtomicBool = AtomicBool::new(false);
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Where traces go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpSettings {
    /// The OTLP/HTTP traces URL (`<endpoint>/v1/traces`).
    pub traces_url: String,
    /// `service.name` of the resource (`OTEL_SERVICE_NAME`, default `keyholder`).
    pub service_name: String,
    /// How often finished spans are sent.
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

/// Installs the process's logging (filter, `text` or `json` on stderr) and, with `otlp`, the
/// OpenTelemetry layer. Once per process.
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
    let otel = match otlp {
        Some(settings) => Some(otel_layer(settings)?),
        None => None,
    };
    tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init()
        .map_err(|e| anyhow::anyhow!("logging already set up: {e}"))?;
    Ok(())
}

/// Only the OpenTelemetry layer (no log output), for embedding the server (the e2e tests).
pub fn init_traces_only(otlp: &OtlpSettings) -> anyhow::Result<()> {
    tracing_subscriber::registry()
        .with(otel_layer(otlp)?)
        .try_init()
        .map_err(|e| anyhow::anyhow!("tracing already set up: {e}"))?;
    Ok(())
}

fn otel_layer<S>(settings: &OtlpSettings) -> anyhow::Result<Box<dyn Layer<S> + Send + Sync>>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a> + Send + Sync,
{
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(if settings.json {
            Protocol::HttpJson
        } else {
            Protocol::HttpBinary
        })
        .with_endpoint(settings.traces_url.clone())
        .with_timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| anyhow::anyhow!("--otlp-endpoint: {e}"))?;
    let processor = BatchSpanProcessor::builder(exporter)
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_scheduled_delay(settings.export_interval)
                // Room for a couple of seconds of spans under load before any is dropped.
                .with_max_queue_size(16 * 1024)
                .with_max_export_batch_size(1024)
                .build(),
        )
        .build();
    let resource = opentelemetry_sdk::Resource::builder_empty()
        .with_service_name(settings.service_name.clone())
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("keyholder");
    let _ = PROVIDER.set(provider);
    ENABLED.store(true, Ordering::Relaxed);
    Ok(tracing_opentelemetry::layer()
        .with_tracer(tracer)
        // What the spans are for is in their names and ids; these would be attributes (and
        // clock reads on every poll of an instrumented future) on every span.
        .with_location(false)
        .with_threads(false)
        .with_target(false)
        .with_tracked_inactivity(false)
        // Outbound trace context is taken from the span itself (`inject_current`).
        .with_context_activation(false)
        .with_filter(TraceFilter)
        .boxed())
}

/// What the OpenTelemetry layer sees: Keyholder's own spans (info, and the debug-level child
/// spans under [`TARGET`]) and its warnings and errors (as span events), whatever the log filter
/// says. Decided per call site once (never per call), so everything else stays free.
struct TraceFilter;

impl TraceFilter {
    fn wants(meta: &tracing::Metadata<'_>) -> bool {
        let target = meta.target();
        let ours = target == "keyholder" || target.starts_with("keyholder::");
        if !ours {
            return false;
        }
        if meta.is_span() {
            let child = target == TARGET;
            *meta.level()
                <= if child {
                    tracing::Level::DEBUG
                } else {
                    tracing::Level::INFO
                }
        } else {
            *meta.level() <= tracing::Level::WARN
        }
    }
}

impl<S> tracing_subscriber::layer::Filter<S> for TraceFilter {
    fn enabled(
        &self,
        meta: &tracing::Metadata<'_>,
        _cx: &tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        Self::wants(meta)
    }

    fn callsite_enabled(
        &self,
        meta: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        if Self::wants(meta) {
            tracing::subscriber::Interest::always()
        } else {
            tracing::subscriber::Interest::never()
        }
    }

    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(tracing::level_filters::LevelFilter::DEBUG)
    }
}

/// Sends every finished span now (blocking: call off the async runtime).
pub fn flush() {
    if let Some(provider) = PROVIDER.get() {
        let _ = provider.force_flush();
    }
}

/// Flushes and stops the exporter (at exit).
pub fn shutdown() {
    if let Some(provider) = PROVIDER.get() {
        let _ = provider.shutdown();
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

/// Makes `span` a child of the W3C trace context in `headers` (`traceparent`, `tracestate`), if
/// any and if traces are on.
pub fn adopt_remote_parent(span: &tracing::Span, headers: &actix_web::http::header::HeaderMap) {
    if !enabled() || !headers.contains_key("traceparent") {
        return;
    }
    let cx = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    let _ = span.set_parent(cx);
}

/// Writes the current span's W3C trace context into an outbound request's headers (replacing any
/// `traceparent`/`tracestate` already there), if traces are on.
pub fn inject_current(headers: &mut reqwest::header::HeaderMap) {
    if !enabled() {
        return;
    }
    let cx = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
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
    fn off_by_default_nothing_is_injected_or_adopted() {
        // No `init` in this process: traces are off.
        assert!(!enabled());
        let mut headers = reqwest::header::HeaderMap::new();
        inject_current(&mut headers);
        assert!(headers.is_empty());
    }
}
