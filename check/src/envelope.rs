//! The checks of an asymmetric binding: Ed25519 envelopes from unknown or removed keys, replayed
//! envelope nonces, swapped bodies, and HMAC signatures and tickets refused.

use keyholder_protocol::paths::HEADER_PLATFORM_REQUEST_ID;
use keyholder_protocol::request_id::new_request_id;
use keyholder_protocol::{HmacSecret, PlatformSigningKey};
use serde_json::json;

use keyholder_client::platform::now_unix;
use keyholder_client::tickets::TicketIssuer;
use keyholder_client::transport::Outgoing;

use super::{expect, set_header, Ctx, Run};

pub(crate) async fn unknown_platform_key(ctx: &Ctx, run: &mut Run) -> Result<(), String> {
    let p = &ctx.platform;
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

pub(crate) async fn replayed_envelope_nonce(ctx: &Ctx, run: &mut Run) -> Result<(), String> {
    let p = &ctx.platform;
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

pub(crate) async fn body_swapped(ctx: &Ctx, run: &mut Run) -> Result<(), String> {
    let p = &ctx.platform;
    let id = new_request_id();
    let mut out = ctx.health_outgoing(p, &id);
    out.body = serde_json::to_vec(&json!({ "requestId": id, "swapped": true })).ok();
    let resp = ctx
        .send_probe(run, &out, &id, "valid envelope, another body")
        .await;
    expect(&resp, &[401], Some("auth_failed"))
}

pub(crate) async fn hmac_signature_refused(ctx: &Ctx, run: &mut Run) -> Result<(), String> {
    let p = &ctx.platform;
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

pub(crate) async fn hmac_ticket_refused(ctx: &Ctx, run: &mut Run) -> Result<(), String> {
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

pub(crate) async fn removed_platform_key(ctx: &Ctx, run: &mut Run) -> Result<(), String> {
    let p = &ctx.platform;
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
