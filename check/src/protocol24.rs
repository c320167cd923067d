//! The protocol 2.4.0 checks (PROTOCOL.md §7): version, capability list, ticket constraints
//! (`stale_creation`, store `mode`/`cid`), `totpUri` sealing (the seed absent from every answer) and
//! TOTP codes on the credential path. A webhook that still speaks 2.2.0 (or the reference's 2.0.0)
//! fails them with a detail saying what it lacks.

use keyholder_protocol::paths::{
    is_canonical_order, CANONICAL_CAPABILITIES, CAP_TV_REFRESH, PATH_CREDENTIAL, PATH_STORE,
    PATH_TOTP_CODE, PROTOCOL_VERSION, PROTOCOL_VERSION_2_2,
};
use keyholder_protocol::wire::Collection;
use keyholder_protocol::Purpose;
use reqwest::Method;
use serde_json::{json, Value};

use super::{expect, random_suffix, Ctx, Run};
use keyholder_client::tickets::Ticket;
use keyholder_client::transport::{Outgoing, RawResponse};

/// What a webhook of another version lacks, for the report.
pub fn version_note(version: &str) -> String {
    match version {
        PROTOCOL_VERSION => format!("speaks protocol {PROTOCOL_VERSION}"),
        PROTOCOL_VERSION_2_2 => format!(
            "speaks protocol {PROTOCOL_VERSION_2_2}, not {PROTOCOL_VERSION}: no ticket constraints \
             (stale_creation), no sealed totpUri links, TOTP seeds instead of codes on the credential path"
        ),
        other => format!(
            "speaks protocol {other}, not {PROTOCOL_VERSION}: the 2.4.0 checks show what it lacks"
        ),
    }
}

/// RFC 4648 base32 without padding (the probe's random TOTP seed).
fn base32(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::new();
    let (mut buffer, mut bits) = (0u32, 0u32);
    for &b in bytes {
        buffer = (buffer << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(ALPHABET[((buffer >> bits) & 31) as usize]));
        }
    }
    if bits > 0 {
        out.push(char::from(ALPHABET[((buffer << (5 - bits)) & 31) as usize]));
    }
    out
}

pub(crate) fn random_seed() -> String {
    let mut bytes = uuid::Uuid::new_v4().as_bytes().to_vec();
    bytes.extend_from_slice(&uuid::Uuid::new_v4().as_bytes()[..4]);
    base32(&bytes)
}

pub(crate) fn store_post(ticket: &Ticket, service: &str, token_data: Value) -> Outgoing {
    let mut out = Outgoing::new(Method::POST, PATH_STORE);
    out.body = serde_json::to_vec(&json!({
        "ticket": ticket.expose(),
        "service": service,
        "tokenData": token_data,
    }))
    .ok();
    out
}

pub(crate) fn get_with(path: &str, ticket: &Ticket, service: &str) -> Outgoing {
    let mut out = Outgoing::new(Method::GET, path);
    out.query = vec![
        ("ticket".into(), ticket.expose().to_owned()),
        ("service".into(), service.to_owned()),
    ];
    out
}

pub(crate) fn body_json(resp: &Result<RawResponse, keyholder_client::Error>) -> Value {
    resp.as_ref()
        .ok()
        .and_then(|r| serde_json::from_slice(&r.body).ok())
        .unwrap_or(Value::Null)
}

pub(crate) fn body_text(resp: &Result<RawResponse, keyholder_client::Error>) -> String {
    resp.as_ref()
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .unwrap_or_default()
}

/// Refuses when `text` holds the seed (any case) or an otpauth link.
fn no_seed(what: &str, text: &str, seed: &str) -> Result<(), String> {
    let lower = text.to_ascii_lowercase();
    if lower.contains(&seed.to_ascii_lowercase()) || lower.contains("otpauth://") {
        return Err(format!("{what} holds the TOTP seed or the otpauth link"));
    }
    Ok(())
}

impl Ctx {
    pub(crate) fn probe_service(&self, what: &str) -> String {
        format!("{}-{what}", self.service)
    }

    pub(crate) async fn delete_token(&self, run: &mut Run, service: &str) {
        let r = self
            .platform
            .storage_delete(Collection::Tokens, service)
            .await;
        run.call(
            &format!("POST /v1/storage {{delete tokens/{service}}} [signed]"),
            &r,
        );
    }

    /// Every answer the platform can read about `service`: get, list, list_batch.
    pub(crate) async fn platform_views(
        &self,
        run: &mut Run,
        service: &str,
    ) -> Result<String, String> {
        let get = self.platform.storage_get(Collection::Tokens, service).await;
        run.call(
            &format!("POST /v1/storage {{get tokens/{service}}} [signed]"),
            &get,
        );
        let list = self
            .platform
            .storage_list(Collection::Tokens, &Default::default())
            .await;
        run.call("POST /v1/storage {list tokens} [signed]", &list);
        let batch = self
            .platform
            .storage_list_batch(&[Collection::Tokens], &Default::default())
            .await;
        run.call("POST /v1/storage {list_batch tokens} [signed]", &batch);
        let get = get.map_err(|e| e.to_string())?;
        let list = list.map_err(|e| e.to_string())?;
        let batch = batch.map_err(|e| e.to_string())?;
        Ok(format!(
            "{} {} {}",
            get.unwrap_or(Value::Null),
            serde_json::to_string(&list.items).unwrap_or_default(),
            batch
                .get("tokens")
                .and_then(|p| serde_json::to_string(&p.items).ok())
                .unwrap_or_default()
        ))
    }
}

pub(crate) async fn version_2_4_0(ctx: &Ctx, run: &mut Run) -> Result<(), String> {
    let r = ctx.platform.health().await;
    run.call("GET /v1/health", &r);
    let version = r.map_err(|e| e.to_string())?.version;
    if version == PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(format!("the webhook {}", version_note(&version)))
    }
}

pub(crate) async fn capabilities_2_4_0(ctx: &Ctx, run: &mut Run) -> Result<(), String> {
    let r = ctx.platform.health().await;
    run.call("GET /v1/health", &r);
    let caps = r.map_err(|e| e.to_string())?.capabilities;
    let missing: Vec<&str> = CANONICAL_CAPABILITIES
        .iter()
        .copied()
        .filter(|c| *c != CAP_TV_REFRESH && !caps.iter().any(|have| have == c))
        .collect();
    if !missing.is_empty() {
        return Err(format!("capabilities {caps:?} lack {missing:?}"));
    }
    if !is_canonical_order(&caps) {
        return Err(format!(
            "capabilities {caps:?} are not in the canonical order {CANONICAL_CAPABILITIES:?}"
        ));
    }
    Ok(())
}

pub(crate) async fn stale_creation(ctx: &Ctx, run: &mut Run) -> Result<(), String> {
    let service = ctx.probe_service("cid");
    let cid = format!("kc-{}", random_suffix());
    let secret = format!("kc_{}", random_suffix());
    let ticket = ctx
        .tickets
        .ticket(Purpose::Store, &service)
        .creation_id(cid.clone())
        .mint();
    let stored = ctx
        .probe(
            run,
            &store_post(&ticket, &service, json!({"accessToken": secret})),
            &format!("store ticket with cid {cid}"),
        )
        .await;
    let verdict = async {
        expect(&stored, &[200], None)?;
        if body_json(&stored)["meta"]["creationId"] != json!(cid) {
            return Err("the stored meta has no creationId from the ticket's cid".into());
        }
        let stale = ctx
            .tickets
            .ticket(Purpose::AgentCredential, &service)
            .creation_id("kc-other")
            .mint();
        let resp = ctx
            .probe(
                run,
                &get_with(PATH_CREDENTIAL, &stale, &service),
                "credential ticket with another cid",
            )
            .await;
        expect(&resp, &[409], Some("stale_creation"))?;
        if body_text(&resp).contains(&secret) {
            return Err("the refusal carries the credential".into());
        }
        let fresh = ctx
            .tickets
            .ticket(Purpose::AgentCredential, &service)
            .creation_id(cid.clone())
            .mint();
        let resp = ctx
            .probe(
                run,
                &get_with(PATH_CREDENTIAL, &fresh, &service),
                "credential ticket with the stored cid",
            )
            .await;
        expect(&resp, &[200], None)?;
        if body_json(&resp)["token"]["accessToken"] != json!(secret) {
            return Err("the credential with the right cid is not the stored one".into());
        }
        Ok(())
    }
    .await;
    ctx.delete_token(run, &service).await;
    verdict
}

pub(crate) async fn store_constraints(ctx: &Ctx, run: &mut Run) -> Result<(), String> {
    let service = ctx.probe_service("mode");
    let data = || json!({"accessToken": "keyholder-check-not-a-secret"});
    let verdict = async {
        for (claim, value) in [("mode", json!("replace")), ("cid", json!(5))] {
            let builder = ctx.tickets.ticket(Purpose::Store, &service);
            let ticket = match claim {
                "mode" => builder.raw_mode(value.clone()),
                _ => builder.raw_creation_id(value.clone()),
            }
            .mint();
            let resp = ctx
                .probe(
                    run,
                    &store_post(&ticket, &service, data()),
                    &format!("store ticket with {claim} {value}"),
                )
                .await;
            expect(&resp, &[400], Some("invalid_request"))?;
        }
        let r = ctx.platform.storage_get(Collection::Tokens, &service).await;
        run.call(
            &format!("POST /v1/storage {{get tokens/{service}}} [signed]"),
            &r,
        );
        if r.map_err(|e| e.to_string())?.is_some() {
            return Err("a refused store left a token behind".into());
        }
        let create = |cid: &str| {
            ctx.tickets
                .ticket(Purpose::Store, &service)
                .mode(keyholder_client::StoreMode::Create)
                .creation_id(cid)
                .mint()
        };
        let resp = ctx
            .probe(
                run,
                &store_post(&create("kc-1"), &service, data()),
                "mode create",
            )
            .await;
        expect(&resp, &[200], None)?;
        let resp = ctx
            .probe(
                run,
                &store_post(&create("kc-2"), &service, data()),
                "mode create over the stored token",
            )
            .await;
        expect(&resp, &[409], Some("already_exists"))?;
        let overwrite = ctx.tickets.store(&service);
        let resp = ctx
            .probe(
                run,
                &store_post(&overwrite, &service, data()),
                "overwrite without cid",
            )
            .await;
        expect(&resp, &[200], None)?;
        if body_json(&resp)["meta"].get("creationId").is_some() {
            return Err("an overwrite without cid kept a creationId".into());
        }
        Ok(())
    }
    .await;
    ctx.delete_token(run, &service).await;
    verdict
}

pub(crate) async fn totp_uri_sealed(ctx: &Ctx, run: &mut Run) -> Result<(), String> {
    let service = ctx.probe_service("totp-uri");
    let broken = ctx.probe_service("totp-bad");
    let seed = random_seed();
    let link = format!(
        "otpauth://totp/keyholder-check:probe?secret={seed}&issuer=keyholder-check&digits=8&period=60"
    );
    let verdict = async {
        let ticket = ctx.tickets.store(&service);
        let stored = ctx
            .probe(
                run,
                &store_post(&ticket, &service, json!({"totpUri": link})),
                "tokenData.totpUri (otpauth://totp/ link)",
            )
            .await;
        expect(&stored, &[200], None)?;
        no_seed("the store answer", &body_text(&stored), &seed)?;
        let meta = &body_json(&stored)["meta"];
        if meta["totpDigits"] != json!(8) || meta["hasTotpSecret"] != json!(true) {
            return Err("the store answer's meta lacks the link's descriptors".into());
        }
        no_seed(
            "what the platform reads",
            &ctx.platform_views(run, &service).await?,
            &seed,
        )?;
        let ticket = ctx.tickets.credential(&service);
        let resp = ctx
            .probe(run, &get_with(PATH_CREDENTIAL, &ticket, &service), "")
            .await;
        expect(&resp, &[200], None)?;
        no_seed("the credential answer", &body_text(&resp), &seed)?;
        let ticket = ctx.tickets.totp(&service);
        let resp = ctx
            .probe(run, &get_with(PATH_TOTP_CODE, &ticket, &service), "")
            .await;
        expect(&resp, &[200], None)?;
        no_seed("the totp-code answer", &body_text(&resp), &seed)?;
        // A malformed link (digits 5) is refused and nothing is stored.
        let ticket = ctx.tickets.store(&broken);
        let bad = link.replace("digits=8", "digits=5");
        let resp = ctx
            .probe(
                run,
                &store_post(&ticket, &broken, json!({"totpUri": bad})),
                "totpUri with digits=5",
            )
            .await;
        expect(&resp, &[400], Some("invalid_request"))?;
        // The refusal may name the scheme; it must not echo the seed.
        if body_text(&resp)
            .to_ascii_lowercase()
            .contains(&seed.to_ascii_lowercase())
        {
            return Err("the refusal echoes the TOTP seed".into());
        }
        let r = ctx.platform.storage_get(Collection::Tokens, &broken).await;
        run.call(
            &format!("POST /v1/storage {{get tokens/{broken}}} [signed]"),
            &r,
        );
        if r.map_err(|e| e.to_string())?.is_some() {
            return Err("a malformed link was stored".into());
        }
        Ok(())
    }
    .await;
    ctx.delete_token(run, &service).await;
    ctx.delete_token(run, &broken).await;
    verdict
}

pub(crate) async fn totp_code_on_credential(ctx: &Ctx, run: &mut Run) -> Result<(), String> {
    let service = ctx.probe_service("totp");
    let seed = random_seed();
    let verdict = async {
        let ticket = ctx.tickets.store(&service);
        let stored = ctx
            .probe(
                run,
                &store_post(
                    &ticket,
                    &service,
                    json!({"totpSecret": seed, "tokenType": "TOTP"}),
                ),
                "tokenData.totpSecret, tokenType TOTP",
            )
            .await;
        expect(&stored, &[200], None)?;
        let ticket = ctx.tickets.credential(&service);
        let resp = ctx
            .probe(run, &get_with(PATH_CREDENTIAL, &ticket, &service), "")
            .await;
        expect(&resp, &[200], None)?;
        no_seed("the credential answer", &body_text(&resp), &seed)?;
        let token = &body_json(&resp)["token"];
        let code = token["accessToken"].as_str().unwrap_or_default();
        let is_code = (6..=8).contains(&code.len()) && code.bytes().all(|b| b.is_ascii_digit());
        if !is_code || token["totpGenerated"] != json!(true) || token["tokenType"] != json!("TOTP") {
            return Err("the credential answer is not a generated TOTP code (accessToken, tokenType TOTP, totpGenerated)".into());
        }
        for field in ["remainingSeconds", "period", "digits"] {
            if !token[field].is_u64() {
                return Err(format!("the credential answer has no {field}"));
            }
        }
        Ok(())
    }
    .await;
    ctx.delete_token(run, &service).await;
    verdict
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn base32_matches_rfc_4648() {
        assert_eq!(base32(b"foobar"), "MZXW6YTBOI");
        assert_eq!(
            base32(b"12345678901234567890"),
            "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ"
        );
        let seed = random_seed();
        assert_eq!(seed.len(), 32);
        assert!(keyholder_protocol::otpauth::parse_otpauth(&format!(
            "otpauth://totp/x?secret={seed}"
        ))
        .is_ok());
    }

    #[test]
    fn version_notes() {
        assert!(version_note("2.2.0").contains("not 2.4.0"));
        assert!(version_note("2.0.0").contains("2.0.0"));
        assert_eq!(version_note("2.4.0"), "speaks protocol 2.4.0");
    }
}
