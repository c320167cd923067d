//! The wire refusals of issue 17 (items 5-7), checked against any webhook: a signed request must be
//! usable once (its body `requestId` equal to the header, its signed bytes never accepted again with
//! another request id or on another endpoint), percent-encoded spellings of a path must not be
//! served as the path, and a ticket's time claims must hold against the webhook's clock (`iat` not in
//! the future, not after `exp`, the lifetime cap measured from now, no overflow at `2^63-1`).
//!
//! The percent-encoded path checks want the webhook itself to refuse such paths (`400`, or a `404`
//! as an unknown route); a reverse proxy in front that rewrites `%63` to `c` makes them fail.
//!
//! One function per check; `matrix.rs` lists them in [`crate::WIRE_MATRIX`].

use keyholder_protocol::paths::{
    HEADER_PLATFORM_REQUEST_ID, PATH_HEALTH, PATH_PROXY, PATH_STORAGE,
};
use keyholder_protocol::request_id::new_request_id;
use keyholder_protocol::Purpose;
use serde_json::json;
use std::sync::atomic::Ordering;

use super::{expect, outcome, random_suffix, set_header, Ctx, LocalUpstream, Run};
use keyholder_client::error::Error;
use keyholder_client::platform::now_unix;
use keyholder_client::transport::{Outgoing, RawPlatform as _, RawResponse};
use keyholder_client::TokenData;

/// A copy of a prepared signed request, to `path`, under request id `request_id` (the signed bytes
/// unchanged).
fn resend(out: &Outgoing, path: &str, request_id: &str) -> Outgoing {
    let mut again = Outgoing::new(out.method.clone(), path);
    again.body = out.body.clone();
    again.headers = out.headers.clone();
    set_header(
        &mut again,
        HEADER_PLATFORM_REQUEST_ID,
        request_id.to_owned(),
    );
    again
}

/// `Ok(())` when a request to a percent-encoded spelling of a path was not served as that path:
/// refused as a bad request, or not found as a route (a `token_not_found` would mean it was routed).
fn expect_unrouted(resp: &Result<RawResponse, Error>) -> Result<(), String> {
    match resp {
        Ok(r) if r.status == 400 => Ok(()),
        Ok(r)
            if r.status == 404 && r.error_body().is_some_and(|b| b.error != "token_not_found") =>
        {
            Ok(())
        }
        _ => Err(format!(
            "expected 400 (or a 404 for an unknown route), got {}: the encoded path was routed",
            outcome(resp)
        )),
    }
}

pub(crate) async fn body_request_id_mismatch(ctx: &Ctx, run: &mut Run) -> Result<(), String> {
    let p = &ctx.platform;
    let (id, other) = (new_request_id(), new_request_id());
    let body = serde_json::to_vec(&json!({ "requestId": id })).unwrap_or_default();
    let out = p.signed_outgoing(PATH_HEALTH, body, now_unix(), &other);
    let resp = ctx
        .send_probe(run, &out, &other, "signed, body requestId A, header B")
        .await;
    expect(&resp, &[401], Some("auth_failed"))
}

pub(crate) async fn signed_bytes_with_new_request_id(
    ctx: &Ctx,
    run: &mut Run,
) -> Result<(), String> {
    let p = &ctx.platform;
    // No body requestId, so only the signed bytes themselves can tell a replay.
    let id = new_request_id();
    let body =
        serde_json::to_vec(&json!({ "keyholderCheck": random_suffix() })).unwrap_or_default();
    let out = p.signed_outgoing(PATH_HEALTH, body, now_unix(), &id);
    let first = ctx.send_probe(run, &out, &id, "signed, request id R").await;
    expect(&first, &[200], None)?;
    let other = new_request_id();
    let again = resend(&out, PATH_HEALTH, &other);
    let second = ctx
        .send_probe(run, &again, &other, "same signed bytes, new request id R2")
        .await;
    expect(&second, &[401], Some("auth_failed"))
}

pub(crate) async fn signed_bytes_on_other_endpoint(ctx: &Ctx, run: &mut Run) -> Result<(), String> {
    let p = &ctx.platform;
    let id = new_request_id();
    let body = serde_json::to_vec(
        &json!({ "operation": "list", "collection": "tokens", "key": ctx.key, "nonce": random_suffix() }),
    )
    .unwrap_or_default();
    let out = p.signed_outgoing(PATH_HEALTH, body, now_unix(), &id);
    let first = ctx
        .send_probe(run, &out, &id, "signed storage-shaped body to /v1/health")
        .await;
    expect(&first, &[200], None)?;
    let other = new_request_id();
    let again = resend(&out, PATH_STORAGE, &other);
    let second = ctx
        .send_probe(
            run,
            &again,
            &other,
            "same signed bytes to /v1/storage, new request id",
        )
        .await;
    expect(&second, &[401], Some("auth_failed"))
}

pub(crate) async fn percent_encoded_credential_path(
    ctx: &Ctx,
    run: &mut Run,
) -> Result<(), String> {
    let p = &ctx.platform;
    let value = format!("kc_{}", random_suffix());
    let data = TokenData::new().secret("accessToken", value.as_str());
    let ticket = ctx.tickets.store(&ctx.service);
    let stored = ctx.agent.store(ticket.expose(), &ctx.service, &data).await;
    run.call(
        &format!(
            "POST /v1/store {{service:{}, tokenData:{{accessToken:<masked>}}}}",
            ctx.service
        ),
        &stored,
    );
    stored.map_err(|e| e.to_string())?;
    let mut verdict = Ok(());
    for form in ["/v1/%63redential", "/%761/credential", "/v1/credentia%6C"] {
        let ticket = ctx.tickets.credential(&ctx.service);
        let mut out = ctx.credential_get(&ticket, &ctx.service);
        out.path = form.to_owned();
        let resp = ctx
            .probe(run, &out, "valid ticket, percent-encoded path")
            .await;
        let leaked = resp
            .as_ref()
            .is_ok_and(|r| String::from_utf8_lossy(&r.body).contains(&value));
        if leaked {
            verdict = Err(format!("{form} returned the stored credential"));
        } else if verdict.is_ok() {
            verdict = expect_unrouted(&resp).map_err(|e| format!("{form}: {e}"));
        }
    }
    let deleted = p
        .storage_delete(keyholder_protocol::wire::Collection::Tokens, &ctx.service)
        .await;
    run.call(
        &format!(
            "POST /v1/storage {{delete tokens/{}}} [signed]",
            ctx.service
        ),
        &deleted,
    );
    verdict
}

pub(crate) async fn percent_encoded_proxy_path(ctx: &Ctx, run: &mut Run) -> Result<(), String> {
    let p = &ctx.platform;
    let upstream = LocalUpstream::start()
        .await
        .map_err(|e| format!("local upstream: {e}"))?;
    let data = TokenData::new().secret("accessToken", "keyholder-check-not-a-secret");
    let ticket = ctx.tickets.store(&ctx.service);
    let stored = ctx.agent.store(ticket.expose(), &ctx.service, &data).await;
    run.call(
        &format!("POST /v1/store {{service:{}}}", ctx.service),
        &stored,
    );
    stored.map_err(|e| e.to_string())?;
    let id = new_request_id();
    let ticket = ctx.tickets.proxy(&ctx.service);
    let body = serde_json::to_vec(&json!({
        "ticket": ticket.expose(),
        "service": ctx.service,
        "upstream": {"url": upstream.url, "method": "GET"},
        "headerTemplates": {"Authorization": "Bearer ${TOKEN}"},
        "requestId": id,
    }))
    .unwrap_or_default();
    let encoded = PATH_PROXY.replace("/proxy", "/%70roxy");
    let out = p.signed_outgoing(&encoded, body, now_unix(), &id);
    let resp = ctx
        .send_probe(run, &out, &id, "signed proxy call, percent-encoded path")
        .await;
    let deleted = p
        .storage_delete(keyholder_protocol::wire::Collection::Tokens, &ctx.service)
        .await;
    run.call(
        &format!(
            "POST /v1/storage {{delete tokens/{}}} [signed]",
            ctx.service
        ),
        &deleted,
    );
    expect_unrouted(&resp)?;
    match upstream.hits.load(Ordering::SeqCst) {
        0 => Ok(()),
        n => Err(format!(
            "the upstream was called {n} time(s) through {encoded}"
        )),
    }
}

pub(crate) async fn ticket_iat_in_future(ctx: &Ctx, run: &mut Run) -> Result<(), String> {
    ticket_times(
        ctx,
        run,
        now_unix() + 3_600,
        now_unix() + 3_660,
        "iat=now+3600, exp=now+3660",
    )
    .await
}

pub(crate) async fn ticket_iat_after_exp(ctx: &Ctx, run: &mut Run) -> Result<(), String> {
    ticket_times(
        ctx,
        run,
        now_unix() + 60,
        now_unix() + 30,
        "iat=now+60, exp=now+30",
    )
    .await
}

pub(crate) async fn ticket_exp_beyond_cap_old_iat(ctx: &Ctx, run: &mut Run) -> Result<(), String> {
    // The lifetime is measured from now: an old iat cannot make a 30-day ticket look short
    // (nor can an iat near exp, which the future-iat check covers).
    let now = now_unix();
    ticket_times(
        ctx,
        run,
        now - 60,
        now + 30 * 86_400,
        "iat=now-60, exp=now+30d",
    )
    .await
}

pub(crate) async fn ticket_exp_i64_max(ctx: &Ctx, run: &mut Run) -> Result<(), String> {
    // exp - iat = 60 fits any cap; exp + skew overflows a webhook that adds to claims.
    ticket_times(ctx, run, i64::MAX - 60, i64::MAX, "iat=2^63-61, exp=2^63-1").await
}

/// A credential ticket with these time claims must be refused as `401 ticket_invalid`.
async fn ticket_times(
    ctx: &Ctx,
    run: &mut Run,
    iat: i64,
    exp: i64,
    note: &str,
) -> Result<(), String> {
    let ticket = ctx
        .tickets
        .ticket(Purpose::AgentCredential, &ctx.service)
        .validity(iat, exp)
        .mint();
    let out = ctx.credential_get(&ticket, &ctx.service);
    let resp = ctx.probe(run, &out, note).await;
    expect(&resp, &[401], Some("ticket_invalid"))
}
