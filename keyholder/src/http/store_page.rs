//! `GET /store?ticket=..&service=..`: the keyholder's own page where the owner pastes a
//! credential, and `GET /store.js`, its script. The browser store flow in the platform's frontend
//! runs the platform's JavaScript, which a compromised platform can change to read the secret
//! before it is sent; this page comes from the keyholder's origin with no third-party resource.
//!
//! The page checks the store ticket at once (signature, expiry, lifetime, purpose, service) without
//! spending its nonce, and shows a bad link as a readable error page with the wire code. With a good
//! ticket it shows a form; its script (served here, allowed by `script-src 'self'`, no inline code)
//! posts the credential to `/v1/store` on the same origin, where the nonce is spent, clears the
//! secret box whatever the outcome, and shows only the service and meta the keyholder answers.
//! Headers: a strict Content-Security-Policy (`default-src 'none'`, the one inline style by hash,
//! `connect-src 'self'`, `form-action 'none'` so a form without its script cannot send the secret
//! anywhere, `frame-ancestors 'none'`), `X-Frame-Options: DENY`, `Referrer-Policy: no-referrer`
//! (the ticket is in the URL), and `Cache-Control: no-store` (set on every answer).

use actix_web::http::StatusCode;
use actix_web::web::Data;
use actix_web::{HttpRequest, HttpResponse};
use base64::Engine as _;
use keyholder_protocol::document::SENSITIVE_FIELDS;
use keyholder_protocol::paths::PATH_STORE_PAGE_SCRIPT;
use keyholder_protocol::Purpose;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use super::error::ApiError;
use super::extract::check_ticket_unspent;
use crate::state::AppState;

const STYLE: &str = include_str!("store_page/store.css");
const SCRIPT: &str = include_str!("store_page/store.js");

/// Query of the store page.
#[derive(Debug, Deserialize)]
struct StorePageQuery {
    ticket: Option<String>,
    service: Option<String>,
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// The page's policy: nothing but this origin's script, the page's own style (by hash) and
/// same-origin fetches; no framing, no form submission, no base URL.
fn page_policy() -> String {
    let style_hash = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(STYLE));
    format!(
        "default-src 'none'; script-src 'self'; style-src 'sha256-{style_hash}'; connect-src 'self'; \
         img-src 'none'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'; \
         require-trusted-types-for 'script'"
    )
}

fn html(status: StatusCode, title: &str, body: &str) -> HttpResponse {
    let page = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <style>{STYLE}</style></head><body>{body}</body></html>"
    );
    HttpResponse::build(status)
        .content_type("text/html; charset=utf-8")
        .insert_header(("Content-Security-Policy", page_policy()))
        .insert_header(("X-Frame-Options", "DENY"))
        .insert_header(("Referrer-Policy", "no-referrer"))
        .insert_header(("Cross-Origin-Opener-Policy", "same-origin"))
        .insert_header(("Cross-Origin-Resource-Policy", "same-origin"))
        .body(page)
}

/// A bad link: the status and wire code of the refusal, its message, and what to do.
fn refusal(err: &ApiError) -> HttpResponse {
    let code = err.code();
    let status = StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::BAD_REQUEST);
    html(
        status,
        "Keyholder: store link not valid",
        &format!(
            "<h1>Store a credential</h1><p class=\"error\" id=\"error\" data-code=\"{}\">\
             This store link cannot be used: {} (<code>{}</code>).</p>\
             <p>Nothing was stored. Ask the platform for a new store link and open it here again.</p>",
            escape(code.as_str()),
            escape(&err.public_message()),
            escape(code.as_str()),
        ),
    )
}

/// `GET /store?ticket=..&service=..`.
pub async fn store_page(state: Data<AppState>, req: HttpRequest) -> HttpResponse {
    match render_form(&state, req.query_string()) {
        Ok(page) => page,
        Err(err) => {
            err.log();
            refusal(&err)
        }
    }
}

fn render_form(state: &AppState, query: &str) -> Result<HttpResponse, ApiError> {
    if query.len() > 16 * 1024 {
        return Err(ApiError::PayloadTooLarge(16 * 1024));
    }
    let query = actix_web::web::Query::<StorePageQuery>::from_query(query)
        .map_err(|_| ApiError::InvalidRequest("Invalid query string".into()))?
        .into_inner();
    let ticket = query
        .ticket
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ApiError::InvalidRequest("the link has no 'ticket'".into()))?;
    let service = query
        .service
        .filter(|s| !s.is_empty())
        .ok_or_else(|| ApiError::InvalidRequest("the link has no 'service'".into()))?;
    crate::vault::collections::validate_key(&service)?;
    state.keys.ensure_unsealed()?;
    check_ticket_unspent(state, &ticket, &service, &[Purpose::Store])?;
    let sensitive = serde_json::to_string(&SENSITIVE_FIELDS).unwrap_or_else(|_| "[]".into());
    let options: String = SENSITIVE_FIELDS
        .iter()
        .map(|f| format!("<option value=\"{f}\">{f}</option>"))
        .collect();
    let webhook_id = state.keys.binding().webhook_id.clone();
    let script = PATH_STORE_PAGE_SCRIPT.trim_start_matches('/');
    let body = format!(
        "<h1>Store a credential</h1>\
         <p class=\"note\">This page is served by your keyholder <code>{webhook}</code>: what you paste here goes \
         straight to it, encrypted there, and no page or script of the platform's sees it.</p>\
         <form id=\"store-form\" data-sensitive=\"{sensitive}\" autocomplete=\"off\" novalidate>\
         <input type=\"hidden\" name=\"ticket\" value=\"{ticket}\">\
         <input type=\"hidden\" name=\"service\" value=\"{service}\">\
         <label>Service</label><code id=\"service\">{service}</code>\
         <label for=\"field\">Stored as</label><select id=\"field\" name=\"field\">{options}</select>\
         <label for=\"secret\">Secret</label>\
         <textarea id=\"secret\" name=\"secret\" rows=\"4\" autocomplete=\"off\" autocapitalize=\"off\" \
         autocorrect=\"off\" spellcheck=\"false\"></textarea>\
         <label for=\"tokenType\">Type (optional, default oauth)</label>\
         <input id=\"tokenType\" name=\"tokenType\" autocomplete=\"off\" spellcheck=\"false\">\
         <label for=\"meta\">Other fields, not secret (optional): one key=value per line</label>\
         <textarea id=\"meta\" name=\"meta\" rows=\"3\" autocomplete=\"off\" spellcheck=\"false\"></textarea>\
         <button type=\"submit\" id=\"submit\">Store</button></form>\
         <noscript><p class=\"error\">This page needs its script (served by this keyholder, nothing third-party).</p></noscript>\
         <p id=\"result\" role=\"status\" data-state=\"idle\"></p><pre id=\"stored-meta\" hidden></pre>\
         <script src=\"{script}\"></script>",
        webhook = escape(&webhook_id),
        sensitive = escape(&sensitive),
        ticket = escape(&ticket),
        service = escape(&service),
    );
    Ok(html(StatusCode::OK, "Keyholder: store a credential", &body))
}

/// `GET /store.js`: the store page's script.
pub async fn store_script() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/javascript; charset=utf-8")
        .insert_header((
            "Content-Security-Policy",
            "default-src 'none'; frame-ancestors 'none'",
        ))
        .insert_header(("Cross-Origin-Resource-Policy", "same-origin"))
        .insert_header(("Referrer-Policy", "no-referrer"))
        .body(SCRIPT)
}
