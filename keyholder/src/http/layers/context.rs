//! The request-context layer (outermost): a request id for every request (the platform's where it
//! sent a valid one), the client address and the endpoint worked out once and kept on the request
//! as a [`RequestContext`], the request's tracing span around everything inside, the `X-Request-Id`
//! header, the request metrics and one access-log line (path only: query strings carry tickets).

use std::rc::Rc;
use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderMap, HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::web::Data;
use actix_web::{HttpMessage, HttpRequest};
use keyholder_protocol::paths::{HEADER_PLATFORM_REQUEST_ID, HEADER_REQUEST_ID};
use keyholder_protocol::request_id::{is_valid_request_id, new_request_id};
use tracing::Instrument;

use crate::http::endpoints::{self, Endpoint};
use crate::http::extract::TicketContext;
use crate::http::network::ClientAddress;
use crate::state::AppState;

/// What every layer and extractor needs to know about the request, worked out once.
#[derive(Debug)]
pub struct RequestContext {
    /// The request id (returned in `X-Request-Id`, error bodies and the response signature).
    pub request_id: String,
    /// The endpoint the path names (the path as the router matches it, percent-decoded), if any.
    pub endpoint: Option<&'static Endpoint>,
    /// Who sent it.
    pub client: ClientAddress,
    /// The path and query as received (what the response signature names).
    pub target: String,
}

impl RequestContext {
    fn of(req: &HttpRequest) -> RequestContext {
        let path = req.match_info().as_str();
        let client = match req.app_data::<Data<AppState>>() {
            Some(state) => state.network.client_address(req),
            None => req
                .peer_addr()
                .map_or(ClientAddress::Unknown, |a| ClientAddress::Known(a.ip())),
        };
        RequestContext {
            request_id: pick_request_id(req.headers()),
            endpoint: endpoints::find(path),
            client,
            target: req
                .uri()
                .path_and_query()
                .map_or_else(|| path.to_string(), |p| p.as_str().to_string()),
        }
    }
}

/// The context of `req` (worked out here if the layer did not run, as in a bare test app).
pub fn context(req: &HttpRequest) -> Rc<RequestContext> {
    if let Some(context) = req.extensions().get::<Rc<RequestContext>>() {
        return Rc::clone(context);
    }
    let context = Rc::new(RequestContext::of(req));
    req.extensions_mut().insert(Rc::clone(&context));
    context
}

fn pick_request_id(headers: &HeaderMap) -> String {
    [HEADER_PLATFORM_REQUEST_ID, HEADER_REQUEST_ID]
        .iter()
        .filter_map(|name| headers.get(*name).and_then(|v| v.to_str().ok()))
        .find(|id| is_valid_request_id(id))
        .map(str::to_string)
        .unwrap_or_else(new_request_id)
}

/// The layer function (registered with `actix_web::middleware::from_fn`).
pub async fn request_context(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let started = Instant::now();
    let context = self::context(req.request());
    let method = req.method().clone();
    let state = req.app_data::<Data<AppState>>().cloned();
    let span = tracing::info_span!(
        "request",
        request_id = %context.request_id,
        method = %method,
        path = %req.path(),
    );
    // With traces on, the request's OpenTelemetry span (the platform's `traceparent` its parent).
    let trace = crate::telemetry::RequestTrace::start(req.headers());

    let inner = next.call(req).instrument(span.clone());
    let mut res = match &trace {
        Some(trace) => trace.scope(inner).await?,
        None => inner.await?,
    };
    if let Ok(v) = HeaderValue::from_str(&context.request_id) {
        res.headers_mut()
            .insert(HeaderName::from_static("x-request-id"), v);
    }
    let status = res.status();
    if let Some(state) = state.as_ref() {
        // Labelled by the registered route pattern, never the raw path (tickets ride in queries).
        let route = res.request().match_pattern();
        state.metrics.observe_request(
            route.as_deref().unwrap_or("unmatched"),
            crate::metrics::method_label(&method),
            status.as_u16(),
            started.elapsed(),
        );
    }
    let ticket = res
        .request()
        .extensions()
        .get::<TicketContext>()
        .cloned()
        .unwrap_or_default();
    if let Some(trace) = &trace {
        // Named by the route pattern, never the raw path (tickets ride in queries).
        let pattern = match context.endpoint {
            Some(_) => None,
            None => res.request().match_pattern(),
        };
        trace.finish(crate::telemetry::RequestOutcome {
            method: crate::telemetry::method_name(&method),
            route: context
                .endpoint
                .map(|e| e.route)
                .or(pattern.as_deref())
                .unwrap_or("unmatched"),
            status: status.as_u16(),
            request_id: &context.request_id,
            agent_id: ticket.agent_id.as_deref(),
            proxy_id: ticket.proxy_id.as_deref(),
        });
    }
    span.in_scope(|| {
        tracing::info!(
            status = status.as_u16(),
            latency_ms = started.elapsed().as_secs_f64() * 1000.0,
            agent_id = ticket.agent_id.as_deref().unwrap_or(""),
            proxy_id = ticket.proxy_id.as_deref().unwrap_or(""),
            "request"
        )
    });
    Ok(res)
}
