//! `GET /bind`: a small status page. It shows the connect link only to whoever already holds a
//! live bind code (issued by the owner's CLI); nobody can obtain a code here.

use actix_web::web::{Data, Query};
use actix_web::HttpResponse;
use serde::Deserialize;

use super::error::ApiError;
use crate::state::AppState;

/// Query of the bind page.
#[derive(Debug, Deserialize)]
pub struct BindQuery {
    code: Option<String>,
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// Renders the page.
pub async fn bind_page(
    state: Data<AppState>,
    query: Query<BindQuery>,
) -> Result<HttpResponse, ApiError> {
    let binding = state.keys.binding();
    let key_id = state.keys.keys().identity().key_id();
    let link = match query.code.as_deref().filter(|c| c.len() <= 64) {
        Some(code) => state.binding.bind_link(code).await?,
        None => None,
    };
    let status = if binding.bound {
        "Bound to the platform"
    } else {
        "Not bound yet"
    };
    let action = match (&link, query.code.is_some()) {
        (Some(url), _) => format!(
            "<p>Open this link while logged in to the platform to connect this keyholder. It works once, for five minutes.</p>\
             <p><a class=\"button\" id=\"connect\" href=\"{}\">Connect this keyholder</a></p>",
            escape(url)
        ),
        (None, true) => "<p class=\"warn\">This bind code is unknown, used or expired. Run <code>keyholder bind</code> for a new one.</p>".to_string(),
        (None, false) => "<p>To connect, run <code>keyholder bind</code> on the machine that runs this keyholder and open the link it prints.</p>".to_string(),
    };
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Keyholder</title>\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <style>body{{font-family:system-ui,sans-serif;max-width:40rem;margin:3rem auto;padding:0 1rem;color:#1b1f24}}\
         .status{{padding:.75rem 1rem;border-radius:.5rem;background:#eef3f8}}.warn{{color:#9a3412}}\
         .button{{display:inline-block;padding:.6rem 1.2rem;background:#1f6feb;color:#fff;border-radius:.4rem;text-decoration:none}}\
         code{{background:#f3f4f6;padding:.1rem .3rem;border-radius:.25rem}}dt{{font-weight:600}}</style></head>\
         <body><h1>Keyholder</h1><p class=\"status\" id=\"status\">{status}</p>\
         <dl><dt>Webhook id</dt><dd><code>{}</code></dd><dt>Identity key</dt><dd><code>{}</code></dd></dl>{action}</body></html>",
        escape(&binding.webhook_id),
        escape(&key_id),
    );
    Ok(HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header((
            "Content-Security-Policy",
            "default-src 'none'; style-src 'unsafe-inline'",
        ))
        .insert_header(("Referrer-Policy", "no-referrer"))
        .insert_header(("X-Frame-Options", "DENY"))
        .body(html))
}
