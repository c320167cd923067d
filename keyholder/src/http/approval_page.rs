//! `GET /approval?id=..&t=..`: the keyholder's own page behind a notified one-time link, showing
//! a use held for the owner's approval, and `POST /approval`, where its form approves or denies.
//! A GET never decides. The POST carries the link's secret token in its body (never in a cookie),
//! which a cross-site page cannot know, so it is its own CSRF proof; cross-site fetch metadata is
//! refused too. The token's hash is compared in constant time and dies with the decision.
//! Headers: `default-src 'none'`, `form-action 'self'`, `frame-ancestors 'none'`,
//! `X-Frame-Options: DENY`, `Referrer-Policy: no-referrer` (the token is in the URL).

use actix_web::http::StatusCode;
use actix_web::web::{Data, Form, Query};
use actix_web::{HttpRequest, HttpResponse};
use serde::Deserialize;

use crate::policy::approvals::{self, PendingApproval};
use crate::state::AppState;

pub use keyholder_protocol::paths::PATH_APPROVAL_PAGE;

/// The link's query.
#[derive(Debug, Deserialize)]
pub struct ApprovalLink {
    id: Option<String>,
    t: Option<String>,
}

/// The page's form.
#[derive(Debug, Deserialize)]
pub struct ApprovalForm {
    id: String,
    t: String,
    decision: String,
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

fn page(status: StatusCode, title: &str, body: &str) -> HttpResponse {
    HttpResponse::build(status)
        .content_type("text/html; charset=utf-8")
        .insert_header((
            "Content-Security-Policy",
            "default-src 'none'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ))
        .insert_header(("X-Frame-Options", "DENY"))
        .insert_header(("Referrer-Policy", "no-referrer"))
        .insert_header(("Cache-Control", "no-store"))
        .body(format!(
            "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title></head><body><h1>{}</h1>{body}</body></html>",
            escape(title),
            escape(title)
        ))
}

fn gone() -> HttpResponse {
    page(
        StatusCode::NOT_FOUND,
        "Link not valid",
        "<p>This approval link is unknown, already used or expired.</p>",
    )
}

async fn find(state: &AppState, id: String, token: String) -> Option<PendingApproval> {
    if id.len() > 64 || token.len() > 128 {
        return None;
    }
    let now = crate::clock::now_unix();
    approvals::pending_for_link(state.storage.as_ref(), &id, &token, now)
        .await
        .ok()
        .flatten()
}

/// `GET /approval`: what waits, and the two buttons.
pub async fn approval_page(state: Data<AppState>, query: Query<ApprovalLink>) -> HttpResponse {
    let ApprovalLink { id, t } = query.into_inner();
    let (Some(id), Some(token)) = (id, t) else {
        return gone();
    };
    let Some(p) = find(&state, id, token.clone()).await else {
        return gone();
    };
    let left = (p.expires_at - crate::clock::now_unix()).max(0);
    let dash = |s: &str| {
        if s.is_empty() {
            "-".to_string()
        } else {
            escape(s)
        }
    };
    let body = format!(
        "<dl><dt>Service</dt><dd id=\"service\">{}</dd><dt>Agent</dt><dd id=\"agent\">{}</dd>\
         <dt>Client address</dt><dd id=\"client\">{}</dd><dt>Endpoint</dt><dd>{}</dd>\
         <dt>Policy</dt><dd>{}</dd><dt>Denied unless decided within</dt><dd>{left} s</dd></dl>\
         <form method=\"post\" action=\"{PATH_APPROVAL_PAGE}\">\
         <input type=\"hidden\" name=\"id\" value=\"{}\"><input type=\"hidden\" name=\"t\" value=\"{}\">\
         <button id=\"approve\" type=\"submit\" name=\"decision\" value=\"approve\">Approve</button> \
         <button id=\"deny\" type=\"submit\" name=\"decision\" value=\"deny\">Deny</button></form>",
        escape(&p.service),
        dash(&p.agent),
        dash(&p.client),
        escape(&p.endpoint),
        escape(&p.policy),
        escape(&p.id),
        escape(&token),
    );
    page(StatusCode::OK, "Approve this use?", &body)
}

/// `POST /approval`: the owner's decision from the page.
pub async fn approval_decide(
    req: HttpRequest,
    state: Data<AppState>,
    form: Form<ApprovalForm>,
) -> HttpResponse {
    let site = req
        .headers()
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok());
    if matches!(site, Some("cross-site" | "same-site")) {
        return page(
            StatusCode::FORBIDDEN,
            "Refused",
            "<p>Decisions are only taken from this keyholder's own page.</p>",
        );
    }
    let ApprovalForm { id, t, decision } = form.into_inner();
    let approve = match decision.as_str() {
        "approve" => true,
        "deny" => false,
        _ => return gone(),
    };
    if find(&state, id.clone(), t).await.is_none() {
        return gone();
    }
    let now = crate::clock::now_unix();
    let decided_id = id.clone();
    let decided = state
        .storage
        .decide_approval(&decided_id, approve, now)
        .await;
    match decided {
        Ok(true) => {
            if let Err(err) = state
                .policy
                .approvals
                .wake_decided(state.storage.as_ref())
                .await
            {
                tracing::warn!(error = %err, "could not wake the held request");
            }
            tracing::info!(id = %id, approve, "owner decided a held use on the approval page");
            let text = if approve { "Approved" } else { "Denied" };
            page(
                StatusCode::OK,
                text,
                &format!("<p id=\"outcome\">{text}: {}.</p>", escape(&id)),
            )
        }
        Ok(false) => gone(),
        Err(err) => {
            tracing::error!(error = %err, "approval decision not stored");
            page(
                StatusCode::SERVICE_UNAVAILABLE,
                "Try again",
                "<p>The decision could not be stored.</p>",
            )
        }
    }
}
