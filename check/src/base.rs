//! The base matrix: the platform's workflow (health, storage, store and fetch), the adversarial
//! probes of a hostile platform and the protocol's refusals.

use std::sync::atomic::Ordering;

use keyholder_protocol::envelope::{new_envelope_nonce, sign_envelope};
use keyholder_protocol::paths::{
    HEADER_ENVELOPE, PATH_HEALTH, PATH_PROXY, PATH_STORAGE, PLATFORM_EGRESS_IP,
};
use keyholder_protocol::request_id::new_request_id;
use keyholder_protocol::wire::{Collection, ListOptions};
use keyholder_protocol::{HmacSecret, PlatformSigningKey, Purpose};
use reqwest::Method;
use serde_json::{json, Map, Value};

use keyholder_client::platform::now_unix;
use keyholder_client::transport::{Outgoing, RawPlatform as _};
use keyholder_client::TokenData;

use super::{expect, outcome, random_suffix, set_header, Ctx, LocalUpstream, Run};

pub(crate) async fn health_public(ctx: &Ctx, run: &mut Run) -> Result<(), String> {
    let p = &ctx.platform;
    let r = p.health().await;
    run.call("GET /v1/health", &r);
    let h = r.map_err(|e| e.to_string())?;
    (h.status == "healthy")
        .then_some(())
        .ok_or(format!("status {:?}", h.status))
}

pub(crate) async fn health_signed(ctx: &Ctx, run: &mut Run) -> Result<(), String> {
    let p = &ctx.platform;
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

pub(crate) async fn storage_list(ctx: &Ctx, run: &mut Run) -> Result<(), String> {
    let p = &ctx.platform;
    let r = p
        .storage_list(Collection::Tokens, &ListOptions::default())
        .await;
    run.call("POST /v1/storage {list tokens} [signed]", &r);
    r.map(|_| ()).map_err(|e| e.to_string())
}

pub(crate) async fn storage_write(ctx: &Ctx, run: &mut Run) -> Result<(), String> {
    let p = &ctx.platform;
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

pub(crate) async fn storage_read_back(ctx: &Ctx, run: &mut Run) -> Result<(), String> {
    let p = &ctx.platform;
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

pub(crate) async fn storage_list_batch(ctx: &Ctx, run: &mut Run) -> Result<(), String> {
    let p = &ctx.platform;
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

pub(crate) async fn storage_delete(ctx: &Ctx, run: &mut Run) -> Result<(), String> {
    let p = &ctx.platform;
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

pub(crate) async fn agent_store_and_fetch(ctx: &Ctx, run: &mut Run) -> Result<(), String> {
    let p = &ctx.platform;
    let value = format!("kc_{}", random_suffix());
    let data = TokenData::new()
        .secret("accessToken", value.as_str())
        .field("scope", "keyholder-check");
    let ticket = ctx.tickets.store(&ctx.service);
    let r = ctx.agent.store(ticket.expose(), &ctx.service, &data).await;
    run.call(
        &format!(
            "POST /v1/store {{ticket:<masked>, service:{}, tokenData:{{accessToken:<masked>}}}}",
            ctx.service
        ),
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

pub(crate) async fn forged_credential_ticket(ctx: &Ctx, run: &mut Run) -> Result<(), String> {
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

pub(crate) async fn platform_address_refused(ctx: &Ctx, run: &mut Run) -> Result<(), String> {
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

pub(crate) async fn forged_store_ticket(ctx: &Ctx, run: &mut Run) -> Result<(), String> {
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

pub(crate) async fn stale_timestamp(ctx: &Ctx, run: &mut Run) -> Result<(), String> {
    let p = &ctx.platform;
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

/// Dispatches on the binding's scheme.
pub(crate) async fn forged_signature(ctx: &Ctx, run: &mut Run) -> Result<(), String> {
    if ctx.asymmetric {
        forged_signature_asymmetric(ctx, run).await
    } else {
        forged_signature_hmac(ctx, run).await
    }
}

async fn forged_signature_asymmetric(ctx: &Ctx, run: &mut Run) -> Result<(), String> {
    let p = &ctx.platform;
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

async fn forged_signature_hmac(ctx: &Ctx, run: &mut Run) -> Result<(), String> {
    let p = &ctx.platform;
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

/// Dispatches on the binding's scheme.
pub(crate) async fn duplicate_request_id(ctx: &Ctx, run: &mut Run) -> Result<(), String> {
    if ctx.asymmetric {
        duplicate_request_id_asymmetric(ctx, run).await
    } else {
        duplicate_request_id_hmac(ctx, run).await
    }
}

async fn duplicate_request_id_asymmetric(ctx: &Ctx, run: &mut Run) -> Result<(), String> {
    let p = &ctx.platform;
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

async fn duplicate_request_id_hmac(ctx: &Ctx, run: &mut Run) -> Result<(), String> {
    let p = &ctx.platform;
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

pub(crate) async fn wrong_purpose(ctx: &Ctx, run: &mut Run) -> Result<(), String> {
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

pub(crate) async fn wrong_service(ctx: &Ctx, run: &mut Run) -> Result<(), String> {
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

pub(crate) async fn replayed_nonce(ctx: &Ctx, run: &mut Run) -> Result<(), String> {
    let ticket = ctx.tickets.credential(&ctx.service);
    let out = ctx.credential_get(&ticket, &ctx.service);
    let first = ctx.probe(run, &out, "first use").await;
    // Nothing is stored under this service: 404 means the ticket itself was accepted.
    expect(&first, &[200, 404], None)?;
    let second = ctx.probe(run, &out, "same ticket again").await;
    expect(&second, &[401], Some("ticket_invalid"))
}

pub(crate) async fn expired_ticket(ctx: &Ctx, run: &mut Run) -> Result<(), String> {
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

pub(crate) async fn unsigned_proxy(ctx: &Ctx, run: &mut Run) -> Result<(), String> {
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

pub(crate) async fn health_head(ctx: &Ctx, run: &mut Run) -> Result<(), String> {
    let out = Outgoing::new(Method::HEAD, PATH_HEALTH);
    let resp = ctx.probe(run, &out, "").await;
    expect(&resp, &[200], None)
}

pub(crate) async fn storage_list_limit(ctx: &Ctx, run: &mut Run) -> Result<(), String> {
    let p = &ctx.platform;
    let prefix = format!("{}-page-", ctx.key);
    let keys = [format!("{prefix}a"), format!("{prefix}b")];
    for key in &keys {
        let mut doc = Map::new();
        doc.insert("meta".into(), json!({"writtenBy": "keyholder-check"}));
        let r = p.storage_set(Collection::VaultConfig, key, &doc).await;
        run.call(
            &format!("POST /v1/storage {{set vault_config/{key}}} [signed]"),
            &r,
        );
        r.map_err(|e| e.to_string())?;
    }
    let verdict = list_pages(ctx, run, &prefix, &keys).await;
    for key in &keys {
        let r = p.storage_delete(Collection::VaultConfig, key).await;
        run.call(
            &format!("POST /v1/storage {{delete vault_config/{key}}} [signed]"),
            &r,
        );
    }
    verdict
}

/// Lists from `since = prefix` one item at a time: the first page is `keys[0]` with a cursor that
/// leads to `keys[1]`.
async fn list_pages(
    ctx: &Ctx,
    run: &mut Run,
    prefix: &str,
    keys: &[String; 2],
) -> Result<(), String> {
    let mut options = ListOptions {
        since: Some(json!(prefix)),
        limit: Some(1),
        ..ListOptions::default()
    };
    let r = ctx
        .platform
        .storage_list(Collection::VaultConfig, &options)
        .await;
    run.call(
        &format!("POST /v1/storage {{list vault_config since={prefix} limit=1}} [signed]"),
        &r,
    );
    let page = r.map_err(|e| e.to_string())?;
    let listed: Vec<&Value> = page.items.iter().map(|i| &i["key"]).collect();
    if page.items.len() != 1 || page.items[0]["key"] != json!(keys[0]) {
        return Err(format!(
            "limit=1 answered {} item(s) {listed:?}, expected exactly [{:?}]",
            page.items.len(),
            keys[0]
        ));
    }
    let Some(pagination) = page.pagination else {
        return Err(format!(
            "limit=1 with 2 matching documents answered no pagination (items {listed:?})"
        ));
    };
    let Some(cursor) = pagination.next_cursor.filter(|_| pagination.has_more) else {
        return Err(format!(
            "pagination {{hasMore:{}}} without a nextCursor while {:?} follows",
            pagination.has_more, keys[1]
        ));
    };
    // The cursor names the last key listed (then the next page is `after` it) or the next one.
    if cursor == json!(keys[0]) {
        options.since = None;
        options.after = Some(cursor.clone());
    } else {
        options.since = Some(cursor.clone());
    }
    let r = ctx
        .platform
        .storage_list(Collection::VaultConfig, &options)
        .await;
    run.call(
        &format!("POST /v1/storage {{list vault_config since={cursor} limit=1}} [signed]"),
        &r,
    );
    let page = r.map_err(|e| e.to_string())?;
    match page.items.first() {
        Some(item) if item["key"] == json!(keys[1]) && page.items.len() == 1 => Ok(()),
        _ => Err(format!(
            "the nextCursor page holds {:?}, expected [{:?}]",
            page.items, keys[1]
        )),
    }
}

pub(crate) async fn proxy_ticket_on_credential(ctx: &Ctx, run: &mut Run) -> Result<(), String> {
    let ticket = ctx.tickets.proxy(&ctx.service);
    let resp = ctx
        .probe(
            run,
            &ctx.credential_get(&ticket, &ctx.service),
            "proxy ticket on /v1/credential",
        )
        .await;
    expect(&resp, &[401], Some("ticket_invalid"))
}

pub(crate) async fn non_utf8_body(ctx: &Ctx, run: &mut Run) -> Result<(), String> {
    let p = &ctx.platform;
    let id = new_request_id();
    let mut body = format!(
        r#"{{"operation":"get","collection":"vault_config","key":"{}-"#,
        ctx.key
    )
    .into_bytes();
    body.extend_from_slice(b"\xff\xfe\"");
    body.extend_from_slice(format!(r#","requestId":"{id}"}}"#).as_bytes());
    let out = p.signed_outgoing(PATH_STORAGE, body, now_unix(), &id);
    let resp = ctx
        .send_probe(run, &out, &id, "signed, body holds the bytes FF FE")
        .await;
    match &resp {
        Ok(r) if (400..500).contains(&r.status) && r.error_body().is_some() => Ok(()),
        _ => Err(format!("expected a 4xx JSON error, got {}", outcome(&resp))),
    }
}

pub(crate) async fn storage_set_non_object(ctx: &Ctx, run: &mut Run) -> Result<(), String> {
    let p = &ctx.platform;
    let key = format!("{}-not-an-object", ctx.key);
    let mut verdict = Ok(());
    for data in [json!("a string"), json!([1, 2]), json!(42)] {
        let id = new_request_id();
        let body = serde_json::to_vec(&json!({
            "operation": "set", "collection": "vault_config", "key": key, "data": data, "requestId": id,
        }))
        .unwrap_or_default();
        let out = p.signed_outgoing(PATH_STORAGE, body, now_unix(), &id);
        let resp = ctx
            .send_probe(run, &out, &id, &format!("set with data {data}"))
            .await;
        if let Err(e) = expect(&resp, &[400], None) {
            verdict = Err(format!("data {data}: {e}"));
            break;
        }
    }
    let r = p.storage_delete(Collection::VaultConfig, &key).await;
    run.call(
        &format!("POST /v1/storage {{delete vault_config/{key}}} [signed]"),
        &r,
    );
    verdict
}
