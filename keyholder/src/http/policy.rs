//! The owner's custody policies on the endpoints that use a credential (`/v1/credential`,
//! `/v1/totp-code`, `/v1/proxy`, tv-refresh `get`): checked after the ticket or signature is
//! verified and before anything is decrypted. Every decision goes to the audit entry of the
//! request and to the metrics, by policy and rule name only.

use actix_web::{HttpMessage, HttpRequest};
use base64::Engine as _;
use keyholder_protocol::TicketClaims;
use sha2::{Digest as _, Sha256};

use super::error::ApiError;
use crate::audit::PolicyNote;
use crate::policy::approvals::{self, Decision, PendingApproval};
use crate::policy::{Admission, Endpoint, Refusal, UseRequest};
use crate::state::AppState;

/// Admits one use or refuses it (`403 policy_denied`, `429 rate_limited`). A use under a usage
/// cap is counted in the request's group commit: durably before this returns for `/v1/proxy`
/// (before the upstream call), in [`settle`] for the others (before the answer); [`settle`] also
/// gives the count back if the use fails.
pub async fn enforce(
    req: &HttpRequest,
    state: &AppState,
    endpoint: Endpoint,
    service: &str,
    claims: Option<&TicketClaims>,
) -> Result<Admission, ApiError> {
    // No policy anywhere: nothing to look at (not even the client address), and no span.
    if !state.policy.is_active() {
        return Ok(Admission::default());
    }
    crate::telemetry::timed(
        crate::telemetry::SPAN_POLICY,
        enforce_policies(req, state, endpoint, service, claims),
    )
    .await
}

async fn enforce_policies(
    req: &HttpRequest,
    state: &AppState,
    endpoint: Endpoint,
    service: &str,
    claims: Option<&TicketClaims>,
) -> Result<Admission, ApiError> {
    let client = super::network::client_address(req).ip()?;
    let country = match (&state.geoip, client) {
        (Some(db), Some(ip)) if state.policy.needs_geo() => db
            .lookup::<maxminddb::geoip2::Country>(ip)
            .ok()
            .flatten()
            .and_then(|c| c.country.and_then(|c| c.iso_code.map(str::to_string))),
        _ => None,
    };
    let request = UseRequest {
        country: country.as_deref(),
        endpoint,
        service,
        agent: claims.and_then(|c| c.aid.as_deref()),
        proxy: claims.and_then(|c| c.pid.as_deref()),
        client,
    };
    match state.policy.admit(&request) {
        Ok(mut admission) => {
            if admission.policies.is_empty() {
                return Ok(admission);
            }
            let mut approved = "";
            if let Some((asking, secs)) = admission.approval.clone() {
                let now = crate::clock::now_unix();
                let pending = PendingApproval {
                    id: approvals::new_id(),
                    policy: asking.clone(),
                    service: service.to_string(),
                    agent: request.agent.unwrap_or_default().to_string(),
                    client: client.map(|ip| ip.to_string()).unwrap_or_default(),
                    endpoint: req.path().to_string(),
                    created_at: now,
                    expires_at: now.saturating_add(secs as i64),
                };
                tracing::info!(id = %pending.id, policy = %asking, "use held for the owner's approval");
                // The one-time link's token: only its hash is kept.
                let token = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .encode(rand::random::<[u8; 32]>());
                let link_hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
                let link = state
                    .config
                    .public_url
                    .as_deref()
                    .map(|base| {
                        format!(
                            "{}{}?id={}&t={token}",
                            base.trim_end_matches('/'),
                            super::approval_page::PATH_APPROVAL_PAGE,
                            pending.id
                        )
                    })
                    .unwrap_or_default();
                let notice = (
                    pending.id.clone(),
                    pending.service.clone(),
                    pending.agent.clone(),
                    pending.client.clone(),
                );
                let notify = || {
                    let (id, service, agent, client) = &notice;
                    state.notifier.approval(id, service, agent, client, &link);
                };
                let decision = match state
                    .policy
                    .approvals
                    .hold(state.storage.as_ref(), pending, link_hash, notify)
                    .await
                {
                    Ok(decision) => decision,
                    Err(err) => {
                        state
                            .policy
                            .release(state.storage.as_ref(), admission)
                            .await;
                        return Err(err.into());
                    }
                };
                let why = match decision {
                    Decision::Approved => None,
                    Decision::Denied => Some("the owner denied this use".to_string()),
                    Decision::TimedOut => {
                        Some(format!("no approval from the owner within {secs} s"))
                    }
                };
                if let Some(why) = why {
                    state
                        .policy
                        .release(state.storage.as_ref(), admission)
                        .await;
                    state.metrics.policy_decision("approval", "refused");
                    state.notifier.refusal(service, "approval", &asking);
                    req.extensions_mut()
                        .insert(PolicyNote(format!("rule=approval policy={asking}")));
                    return Err(ApiError::PolicyDenied(format!(
                        "refused by policy '{asking}': {why}"
                    )));
                }
                approved = " approved-by=owner";
            }
            // Counted in the request's group commit; `/v1/proxy` waits for it before the upstream
            // call (the credential leaves there), the other endpoints in `settle`, before the
            // answer is built.
            state
                .policy
                .queue_uses(state.storage.as_ref(), &mut admission)?;
            if endpoint == Endpoint::Proxy {
                state.policy.confirm_uses(&mut admission).await?;
            }
            state.metrics.policy_decision("none", "allowed");
            req.extensions_mut().insert(PolicyNote(format!(
                "policy={}{approved}",
                admission.policies.join(",")
            )));
            Ok(admission)
        }
        Err(refusal) => {
            let (rule, policy) = match &refusal {
                Refusal::Denied { rule, policy, .. } | Refusal::Limited { rule, policy, .. } => {
                    (*rule, policy.clone())
                }
            };
            state.metrics.policy_decision(rule, "refused");
            state.notifier.refusal(service, rule, &policy);
            tracing::warn!(rule, policy = %policy, "use refused by the owner's policy");
            req.extensions_mut()
                .insert(PolicyNote(format!("rule={rule} policy={policy}")));
            Err(match refusal {
                Refusal::Denied { message, .. } => ApiError::PolicyDenied(message),
                Refusal::Limited {
                    message,
                    retry_after_secs,
                    ..
                } => ApiError::PolicyLimited {
                    message,
                    retry_after_secs,
                },
            })
        }
    }
}

/// Passes `result` on once the use's counts are durable (a use that could not be counted is not
/// handed out: the commit's error instead); a failed use gives its usage counts back (it did not
/// happen).
pub async fn settle<T>(
    state: &AppState,
    mut admission: Admission,
    result: Result<T, ApiError>,
) -> Result<T, ApiError> {
    if result.is_err() {
        state
            .policy
            .release(state.storage.as_ref(), admission)
            .await;
        return result;
    }
    // Durable before the answer leaves: the request's barrier waits for the commit.
    state
        .policy
        .confirm_uses_before_answer(&mut admission)
        .await?;
    result
}
