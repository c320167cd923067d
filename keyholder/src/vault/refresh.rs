//! OAuth refresh: `/v1/refresh-notify` refreshes at the provider itself (the owner's client first, the
//! platform's hint only when trusted and with its token URL pinned per service), and the opt-in
//! tv-refresh `get`/`update`. Every rewrite keeps all existing meta.

use keyholder_protocol::document::{format_iso8601, parse_iso8601, seal_token_data, OpenedToken};
use keyholder_protocol::wire::Collection;
use keyholder_protocol::wire::{RefreshHint, RefreshTokens};
use serde_json::{json, Map, Value};
use url::Url;
use zeroize::Zeroizing;

use std::sync::Arc;

use super::catalogue;
use super::collections::{validate_key, StorageService};
use super::credentials::{document_error, open_with_inputs, scrub, OpenedCredential};
use super::egress::{EgressService, PinKind};
use super::key_handle::KeyHandle;
use super::keyring::KeyRing;
use super::minting::{expires_in, KeyedLocks};
use super::oauth::{self, OAuthClient};
use super::sealed::{self, SealedInputs};
use super::VaultError;
use crate::storage::{DocumentSwap, SharedStorage, SwapOutcome};
use crate::upstream::{Upstream, UpstreamError};

/// Result of `/v1/refresh-notify`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefreshStatus {
    /// Refreshed; the new expiry (ISO 8601).
    Refreshed(String),
    /// Noted, but not refreshed here (no usable OAuth client); the text says why.
    Acknowledged(String),
    /// No credential for the service.
    NoToken,
    /// The credential has no refresh token.
    NoRefreshToken,
    /// The provider refused; the text says how (never a secret).
    Failed(String),
}

/// Result of tv-refresh `get` (no Debug: it holds the refresh token).
pub enum RefreshGet {
    /// The refresh token and the credential's meta.
    Ok(Zeroizing<String>, Map<String, Value>),
    /// No credential.
    NoToken,
    /// No refresh token.
    NoRefreshToken,
}

/// Where the client configuration of a refresh came from.
enum ClientSource {
    Owner,
    Platform,
}

/// The current document's exact text and its opened form.
struct Current {
    text: String,
    token: OpenedToken,
    /// The sealed inputs as stored (kept verbatim on a rewrite) and opened.
    sealed_text: Option<String>,
    sealed: Option<SealedInputs>,
}

/// The credential's fields and meta as tokenData, to be sealed again with changes.
fn token_data_of(token: &OpenedToken) -> Map<String, Value> {
    let mut data = token.meta().clone();
    for name in token.field_names() {
        if let Some(value) = token.secret(name) {
            data.insert(name.to_string(), json!(value));
        }
    }
    data
}

fn provider_error_text(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_string))
        .filter(|e| e.len() <= 64 && e.chars().all(|c| c.is_ascii_graphic()))
        .map(|e| format!(", {e}"))
        .unwrap_or_default()
}

/// The refresh service (`/v1/refresh`): OAuth refresh with the owner's client (or the platform's,
/// when trusted), one refresh per service at a time, the stored credential rewritten in place.
pub struct RefreshService {
    storage: SharedStorage,
    keys: Arc<KeyHandle>,
    documents: Arc<StorageService>,
    egress: Arc<EgressService>,
    /// One OAuth refresh per service at a time.
    refresh_locks: KeyedLocks,
}

impl RefreshService {
    /// The service over the OAuth clients in `storage`, the documents and the egress checks.
    pub fn new(
        storage: SharedStorage,
        keys: Arc<KeyHandle>,
        documents: Arc<StorageService>,
        egress: Arc<EgressService>,
    ) -> RefreshService {
        RefreshService {
            storage,
            keys,
            documents,
            egress,
            refresh_locks: KeyedLocks::default(),
        }
    }

    fn keys(&self) -> Arc<KeyRing> {
        self.keys.keys()
    }

    fn documents(&self) -> &super::documents::CachedDocuments {
        self.documents.documents()
    }

    /// The owner's OAuth client for `provider`, if configured.
    async fn oauth_client(&self, provider: &str) -> Result<Option<OAuthClient>, VaultError> {
        oauth::oauth_client(self.storage.as_ref(), &self.keys.master(), provider).await
    }

    async fn current(&self, service: &str) -> Result<Option<Current>, VaultError> {
        validate_key(service)?;
        let text = self.documents().read(Collection::Tokens, service).await?;
        let Some(text) = text else {
            return Ok(None);
        };
        let doc: Value =
            serde_json::from_str(&text).map_err(|e| VaultError::Corrupt(e.to_string()))?;
        let keys = self.keys();
        let sealed_text = sealed::detach(&doc).1;
        let OpenedCredential { token, sealed } = open_with_inputs(&doc, service, &keys)?;
        Ok(Some(Current {
            text,
            token,
            sealed_text,
            sealed,
        }))
    }

    /// Seals `current` again with `changes` applied (every other field and meta kept) and writes it
    /// only if the stored document is still the one read (a concurrent store wins; we refuse).
    /// Returns the new expiry in unix seconds, if any.
    async fn rewrite(
        &self,
        service: &str,
        current: Current,
        changes: Map<String, Value>,
    ) -> Result<Option<i64>, VaultError> {
        let mut data = token_data_of(&current.token);
        for (k, v) in changes {
            data.insert(k, v);
        }
        let created_at = current
            .token
            .meta()
            .get("createdAt")
            .and_then(Value::as_str)
            .map(str::to_string);
        let keys = self.keys();
        let sealed = seal_token_data(
            service,
            &data,
            keys.current_data_key()?,
            keys.current_data_version(),
            crate::clock::now_unix(),
            created_at.as_deref(),
            None,
        );
        data.values_mut().for_each(scrub);
        let mut sealed = sealed.map_err(document_error)?;
        if let Some(text) = current.sealed_text {
            let mints = current.sealed.as_ref().is_some_and(SealedInputs::mints);
            sealed::attach_text(&mut sealed, text, mints);
        }
        let expiry = sealed
            .get("meta")
            .and_then(|m| m.get("expiryTime"))
            .and_then(Value::as_i64)
            .map(|ms| ms / 1000);
        let written = self
            .documents()
            .swap(DocumentSwap {
                collection: Collection::Tokens,
                key: service.to_string(),
                expected: current.text,
                doc: sealed.to_string(),
                now: crate::clock::now_unix(),
                data_version: None,
            })
            .await?;
        if written != SwapOutcome::Swapped {
            return Err(VaultError::Invalid(
                "the credential changed while it was being refreshed; retry".into(),
            ));
        }
        Ok(expiry)
    }

    /// `/v1/refresh-notify`: refresh the stored OAuth token at its provider.
    #[tracing::instrument(skip_all, fields(service = %service))]
    pub async fn refresh_notify(
        &self,
        upstream: &Upstream,
        service: &str,
        hint: Option<&RefreshHint>,
        trust_platform: bool,
        request_id: &str,
    ) -> Result<RefreshStatus, VaultError> {
        // One refresh per service at a time: providers that rotate refresh tokens invalidate the
        // old one, so two concurrent refreshes would lose the credential.
        let lock = self.refresh_locks.get(service);
        let _guard = lock.lock().await;
        let Some(current) = self.current(service).await? else {
            return Ok(RefreshStatus::NoToken);
        };
        let Some(refresh_token) = current
            .token
            .secret("refreshToken")
            .filter(|t| !t.is_empty())
            .map(|t| Zeroizing::new(t.to_string()))
        else {
            return Ok(RefreshStatus::NoRefreshToken);
        };
        // The provider comes from the sealed inputs or, by default, is the service itself: never
        // from meta or the platform's hint, which the platform writes.
        let provider = current
            .sealed
            .as_ref()
            .and_then(|s| s.provider.clone())
            .unwrap_or_else(|| service.to_string());
        let (client, source) = match self.oauth_client(&provider).await? {
            Some(client) => (client, ClientSource::Owner),
            // The owner configured a client for this service: the platform's is never used
            // instead, whatever provider name got sealed.
            None if provider != service && self.oauth_client(service).await?.is_some() => {
                return Ok(RefreshStatus::Acknowledged(format!(
                    "no OAuth client is configured here for provider '{provider}' (keyholder oauth set {provider} ...); the platform's client is not used for a service with an owner client"
                )))
            }
            None => match hint {
                Some(RefreshHint {
                    token_url: Some(token_url),
                    client_id: Some(client_id),
                    client_secret,
                    ..
                }) if trust_platform => (
                    OAuthClient {
                        token_url: token_url.clone(),
                        client_id: client_id.clone(),
                        client_secret: client_secret.as_ref().map(|s| Zeroizing::new(s.clone())),
                    },
                    ClientSource::Platform,
                ),
                _ => {
                    return Ok(RefreshStatus::Acknowledged(format!(
                        "no OAuth client is configured here for provider '{provider}' (keyholder oauth set {provider} ...)"
                    )))
                }
            },
        };
        let url = Url::parse(&client.token_url)
            .map_err(|_| VaultError::Invalid("the token URL is not an absolute URL".into()))?;
        upstream.check_url(&url).map_err(|e| {
            tracing::warn!(request_id, reason = %e, "token URL refused by the egress guard");
            VaultError::EgressDenied(e.to_string())
        })?;
        let claimed = match source {
            ClientSource::Owner => false,
            ClientSource::Platform => {
                // A platform-chosen token URL is under the egress policy like any other egress.
                let shape = current
                    .token
                    .secret("accessToken")
                    .and_then(catalogue::provider_for)
                    .or_else(|| catalogue::provider_for(&refresh_token));
                self.egress
                    .check_token_endpoint(upstream, service, &url, shape, request_id)
                    .await?;
                self.egress.claim_token_url(service, url.as_str()).await.inspect_err(|_| {
                    tracing::warn!(request_id, token_url = %url, "refresh to a token URL other than the pinned one refused");
                })?
            }
        };
        let mut form = vec![
            ("grant_type", "refresh_token"),
            ("client_id", client.client_id.as_str()),
        ];
        if let Some(secret) = &client.client_secret {
            form.push(("client_secret", secret.as_str()));
        }
        form.push(("refresh_token", refresh_token.as_str()));
        let result = super::minting::post_token_form(upstream, url.clone(), &form).await;
        let response = match result {
            Ok(response) => response,
            Err(err) => {
                if claimed {
                    self.egress
                        .release_pin(PinKind::TokenUrl, service, url.as_str())
                        .await;
                }
                tracing::warn!(request_id, error = %err, "OAuth refresh call failed");
                return Err(match err {
                    UpstreamError::Refused(r) => VaultError::EgressDenied(r.to_string()),
                    other => VaultError::Provider(other),
                });
            }
        };
        if !response.status.is_success() {
            let message = format!(
                "the provider refused the refresh (HTTP {}{})",
                response.status.as_u16(),
                provider_error_text(&response.body)
            );
            tracing::warn!(request_id, %message, "OAuth refresh refused");
            return Ok(RefreshStatus::Failed(message));
        }
        let Ok(mut answer) = serde_json::from_slice::<Value>(&response.body) else {
            return Ok(RefreshStatus::Failed(
                "the provider answered with something other than JSON".into(),
            ));
        };
        let access = answer
            .get("access_token")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .map(str::to_string);
        let new_refresh = answer
            .get("refresh_token")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .map(str::to_string);
        let lifetime = expires_in(&answer);
        scrub(&mut answer);
        let Some(access) = access else {
            return Ok(RefreshStatus::Failed(format!(
                "the provider sent no access_token{}",
                provider_error_text(&response.body)
            )));
        };
        let expires_at = crate::clock::now_unix() + lifetime;
        let mut changes = Map::new();
        changes.insert("accessToken".into(), json!(access));
        if let Some(r) = new_refresh {
            changes.insert("refreshToken".into(), json!(r));
        }
        changes.insert("expiresAt".into(), json!(format_iso8601(expires_at)));
        changes.insert("expiryTime".into(), json!(expires_at * 1000));
        self.rewrite(service, current, changes).await?;
        tracing::info!(request_id, provider = %provider, "OAuth token refreshed");
        Ok(RefreshStatus::Refreshed(format_iso8601(expires_at)))
    }

    /// tv-refresh `get`: the refresh token and meta.
    pub async fn refresh_get(&self, service: &str) -> Result<RefreshGet, VaultError> {
        let Some(current) = self.current(service).await? else {
            return Ok(RefreshGet::NoToken);
        };
        match current
            .token
            .secret("refreshToken")
            .filter(|t| !t.is_empty())
        {
            Some(t) => Ok(RefreshGet::Ok(
                Zeroizing::new(t.to_string()),
                current.token.meta().clone(),
            )),
            None => Ok(RefreshGet::NoRefreshToken),
        }
    }

    /// tv-refresh `update`: store the platform's new tokens, keeping all meta; returns the new
    /// expiry (ISO 8601).
    pub async fn refresh_update(
        &self,
        service: &str,
        tokens: RefreshTokens,
    ) -> Result<Option<String>, VaultError> {
        let lock = self.refresh_locks.get(service);
        let _guard = lock.lock().await;
        let current = self
            .current(service)
            .await?
            .ok_or(VaultError::TokenNotFound)?;
        let mut tokens = tokens;
        let access = tokens.access_token.take().filter(|t| !t.is_empty());
        let refresh = tokens.refresh_token.take().filter(|t| !t.is_empty());
        if access.is_none() && refresh.is_none() {
            return Err(VaultError::Invalid(
                "'tokens' needs accessToken or refreshToken".into(),
            ));
        }
        let expiry_secs = match &tokens.expiry_time {
            Some(Value::Number(n)) => {
                n.as_i64()
                    .map(|ms| if ms >= 100_000_000_000 { ms / 1000 } else { ms })
            }
            Some(Value::String(s)) => parse_iso8601(s),
            _ => None,
        };
        let mut changes = Map::new();
        let expiry = match (expiry_secs, &access) {
            (Some(e), _) => Some(e),
            (None, Some(_)) => Some(crate::clock::now_unix() + 3600),
            (None, None) => None,
        };
        if let Some(mut a) = access {
            changes.insert("accessToken".into(), json!(a));
            zeroize::Zeroize::zeroize(&mut a);
        }
        if let Some(mut r) = refresh {
            changes.insert("refreshToken".into(), json!(r));
            zeroize::Zeroize::zeroize(&mut r);
        }
        if let Some(e) = expiry {
            changes.insert("expiresAt".into(), json!(format_iso8601(e)));
            changes.insert("expiryTime".into(), json!(e * 1000));
        }
        let stored = self.rewrite(service, current, changes).await?;
        Ok(stored.map(format_iso8601))
    }
}
