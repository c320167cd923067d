//! Decrypt-and-sign minting: a stored Google service-account key or GitHub App key signs an RS256
//! JWT that is exchanged for a short-lived access token; the key never leaves, the token is cached
//! in memory until shortly before it expires.
//!
//! What is stored at `/v1/store`: a Google service-account key is the whole JSON key file (with
//! `"type":"service_account"`) in `privateKeyData` (or `accessToken`), with optional
//! `scopes`/`scope` (default cloud-platform) and `subject`; a GitHub App is `tokenType: GitHubApp`
//! with `appId`, `installationId`, optional `apiUrl` (default `https://api.github.com`) and the PEM
//! key in `privateKeyData`. All of it is sealed then into `sealedInputs` (see [`super::sealed`]) and
//! read only from there; the token endpoint must pass the service's egress policy.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use keyholder_protocol::document::parse_iso8601;
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use reqwest::Method;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use url::Url;
use zeroize::Zeroizing;

use super::catalogue::{self, Provider};
use super::credentials::{scrub, OpenedCredential};
use super::egress::EgressService;
use super::sealed::{is_service_account_key, GOOGLE_DEFAULT_TOKEN_URI};
use super::VaultError;
use crate::storage::SharedStorage;
use crate::upstream::{OutboundRequest, Upstream, UpstreamResponse};

/// A cached token is handed out only while it has at least this long to live.
pub const EXPIRY_MARGIN_SECS: i64 = 60;
const MAX_CACHED: usize = 4096;

/// One lock per key (service), so that concurrent misses mint or refresh once. The map only holds
/// small handles; the per-key lock is held across the provider call on purpose and blocks only
/// callers for the same service.
#[derive(Default)]
pub struct KeyedLocks(Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl KeyedLocks {
    /// The lock of `key`.
    pub fn get(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = match self.0.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        Arc::clone(map.entry(key.to_string()).or_default())
    }
}

struct CachedToken {
    fingerprint: [u8; 32],
    token: Zeroizing<String>,
    expires_at: i64,
}

/// A minted access token.
pub struct MintedToken {
    /// The token.
    pub token: Zeroizing<String>,
    /// Unix seconds it expires at.
    pub expires_at: i64,
}

/// Cache of minted tokens by service, keyed also by a fingerprint of the minting inputs (a changed
/// credential never gets a token minted from the old one).
#[derive(Default)]
pub struct Minter {
    cache: Mutex<HashMap<String, CachedToken>>,
    flights: KeyedLocks,
}

/// What a minting credential signs with and where (no Debug: it holds the key).
pub(crate) enum MintKind {
    Google {
        client_email: String,
        private_key: Zeroizing<String>,
        private_key_id: Option<String>,
        token_uri: String,
        scope: String,
        subject: Option<String>,
    },
    GitHubApp {
        app_id: String,
        installation_id: String,
        api_url: String,
        private_key: Zeroizing<String>,
    },
}

impl MintKind {
    fn fingerprint(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        let mut part = |b: &[u8]| {
            h.update((b.len() as u64).to_be_bytes());
            h.update(b);
        };
        match self {
            MintKind::Google {
                client_email,
                private_key,
                private_key_id,
                token_uri,
                scope,
                subject,
            } => {
                part(b"google");
                part(client_email.as_bytes());
                part(private_key.as_bytes());
                part(private_key_id.as_deref().unwrap_or("").as_bytes());
                part(token_uri.as_bytes());
                part(scope.as_bytes());
                part(subject.as_deref().unwrap_or("").as_bytes());
            }
            MintKind::GitHubApp {
                app_id,
                installation_id,
                api_url,
                private_key,
            } => {
                part(b"github-app");
                part(app_id.as_bytes());
                part(installation_id.as_bytes());
                part(api_url.as_bytes());
                part(private_key.as_bytes());
            }
        }
        h.finalize().into()
    }
}

impl MintKind {
    /// The catalogue entry of what this credential mints (its tokens and its token endpoint).
    pub(crate) fn provider(&self) -> &'static Provider {
        match self {
            MintKind::Google { .. } => &catalogue::GOOGLE,
            MintKind::GitHubApp { .. } => &catalogue::GITHUB,
        }
    }

    /// Where the signed assertion goes.
    fn token_endpoint(&self) -> Result<Url, VaultError> {
        match self {
            MintKind::Google { token_uri, .. } => Url::parse(token_uri).map_err(|_| {
                VaultError::Invalid("service-account 'token_uri' is not a URL".into())
            }),
            MintKind::GitHubApp {
                api_url,
                installation_id,
                ..
            } => Url::parse(&format!(
                "{api_url}/app/installations/{installation_id}/access_tokens"
            ))
            .map_err(|_| VaultError::Invalid("GitHub App 'apiUrl' is not a URL".into())),
        }
    }
}

/// The minting kind of a credential, from its sealed inputs only (meta is display data). A
/// credential that looks like a minting one but has no sealed inputs was stored before they were
/// sealed (or had them stripped): refused until stored again.
pub(crate) fn detect(credential: &OpenedCredential) -> Result<Option<MintKind>, VaultError> {
    if let Some(inputs) = &credential.sealed {
        if let Some(app) = &inputs.github_app {
            return Ok(Some(MintKind::GitHubApp {
                app_id: app.app_id.clone(),
                installation_id: app.installation_id.clone(),
                api_url: app.api_url.clone(),
                private_key: Zeroizing::new(app.private_key.clone()),
            }));
        }
        if let Some(google) = &inputs.google {
            let mut parsed: Value = serde_json::from_str(&google.key_json)
                .map_err(|_| VaultError::Invalid("service-account key is not JSON".into()))?;
            let text_of = |name: &str| parsed.get(name).and_then(Value::as_str).map(str::to_string);
            let invalid =
                |what: &str| VaultError::Invalid(format!("service-account key: '{what}' missing"));
            let kind = (|| {
                Ok(MintKind::Google {
                    client_email: text_of("client_email").ok_or_else(|| invalid("client_email"))?,
                    private_key: Zeroizing::new(
                        text_of("private_key").ok_or_else(|| invalid("private_key"))?,
                    ),
                    private_key_id: text_of("private_key_id"),
                    token_uri: text_of("token_uri")
                        .unwrap_or_else(|| GOOGLE_DEFAULT_TOKEN_URI.into()),
                    scope: google.scope.clone(),
                    subject: google.subject.clone(),
                })
            })();
            scrub(&mut parsed);
            return kind.map(Some);
        }
    }
    let token = &credential.token;
    let github_app = token
        .meta()
        .get("tokenType")
        .and_then(Value::as_str)
        .is_some_and(|t| t.eq_ignore_ascii_case("githubapp"));
    let service_account = ["privateKeyData", "accessToken"]
        .iter()
        .filter_map(|f| token.secret(f))
        .any(is_service_account_key);
    if github_app || service_account {
        return Err(legacy_minting_refusal());
    }
    Ok(None)
}

pub(crate) fn legacy_minting_refusal() -> VaultError {
    VaultError::Invalid(
        "this signing credential was stored before its minting inputs were sealed (or they were \
         removed); store it again"
            .into(),
    )
}

fn sign_jwt(claims: &Value, pem: &str, kid: Option<&str>) -> Result<Zeroizing<String>, VaultError> {
    let key = EncodingKey::from_rsa_pem(pem.as_bytes()).map_err(|_| {
        VaultError::Invalid("the stored private key is not a usable RSA key (PEM)".into())
    })?;
    let mut header = Header::new(Algorithm::RS256);
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&header, claims, &key)
        .map(Zeroizing::new)
        .map_err(|_| VaultError::Invalid("the stored private key cannot sign".into()))
}

/// POSTs a form to a token endpoint (minting, OAuth refresh) through the provider client: the
/// form's secrets (assertion, client secret, refresh token) only in a zeroized body.
pub(crate) async fn post_token_form(
    upstream: &Upstream,
    url: Url,
    form: &[(&str, &str)],
) -> Result<UpstreamResponse, crate::upstream::UpstreamError> {
    let mut serializer = url::form_urlencoded::Serializer::new(String::new());
    for (name, value) in form {
        serializer.append_pair(name, value);
    }
    let body = Zeroizing::new(serializer.finish());
    let mut headers = HeaderMap::new();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/x-www-form-urlencoded"),
    );
    // GitHub answers form-encoded unless asked for JSON; every other provider accepts it too.
    headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
    upstream
        .send_provider(OutboundRequest {
            method: Method::POST,
            url,
            headers,
            body: Some(bytes::Bytes::copy_from_slice(body.as_bytes())),
        })
        .await
}

fn provider_json(response: &UpstreamResponse, what: &str) -> Result<Value, VaultError> {
    if !response.status.is_success() {
        return Err(VaultError::ProviderRejected(format!(
            "{what} answered HTTP {}",
            response.status.as_u16()
        )));
    }
    serde_json::from_slice(&response.body)
        .map_err(|_| VaultError::ProviderRejected(format!("{what} answered with non-JSON")))
}

async fn mint(upstream: &Upstream, kind: &MintKind) -> Result<MintedToken, VaultError> {
    let now = crate::clock::now_unix();
    match kind {
        MintKind::Google {
            client_email,
            private_key,
            private_key_id,
            token_uri,
            scope,
            subject,
        } => {
            let mut claims = json!({
                "iss": client_email, "scope": scope, "aud": token_uri, "iat": now, "exp": now + 3600,
            });
            if let (Some(sub), Some(map)) = (subject, claims.as_object_mut()) {
                map.insert("sub".into(), json!(sub));
            }
            let jwt = sign_jwt(&claims, private_key, private_key_id.as_deref())?;
            let url = kind.token_endpoint()?;
            let form = [
                ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
                ("assertion", jwt.as_str()),
            ];
            let response = post_token_form(upstream, url, &form)
                .await
                .map_err(VaultError::Provider)?;
            let mut answer = provider_json(&response, "the Google token endpoint")?;
            let token = answer
                .get("access_token")
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
                .map(|t| Zeroizing::new(t.to_string()));
            let expires_in = expires_in(&answer);
            scrub(&mut answer);
            let token = token.ok_or_else(|| {
                VaultError::ProviderRejected(
                    "the Google token endpoint sent no access_token".into(),
                )
            })?;
            Ok(MintedToken {
                token,
                expires_at: now + expires_in,
            })
        }
        MintKind::GitHubApp {
            app_id,
            private_key,
            ..
        } => {
            // GitHub allows at most 10 minutes; backdate iat for clock drift as GitHub advises.
            let claims = json!({"iat": now - 60, "exp": now + 540, "iss": app_id});
            let jwt = sign_jwt(&claims, private_key, None)?;
            let url = kind.token_endpoint()?;
            let mut headers = HeaderMap::new();
            let bearer = Zeroizing::new(format!("Bearer {}", jwt.as_str()));
            let auth = crate::upstream::sensitive_value(&bearer)
                .ok_or_else(|| VaultError::Invalid("JWT is not a header value".into()))?;
            headers.insert(AUTHORIZATION, auth);
            headers.insert(
                ACCEPT,
                HeaderValue::from_static("application/vnd.github+json"),
            );
            headers.insert(
                "x-github-api-version",
                HeaderValue::from_static("2022-11-28"),
            );
            let response = upstream
                .send_provider(OutboundRequest {
                    method: Method::POST,
                    url,
                    headers,
                    body: None,
                })
                .await
                .map_err(VaultError::Provider)?;
            let mut answer = provider_json(&response, "the GitHub installation-token endpoint")?;
            let token = answer
                .get("token")
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
                .map(|t| Zeroizing::new(t.to_string()));
            let expires_at = answer
                .get("expires_at")
                .and_then(Value::as_str)
                .and_then(parse_iso8601)
                .unwrap_or(now + 3600);
            scrub(&mut answer);
            let token = token.ok_or_else(|| {
                VaultError::ProviderRejected("GitHub sent no installation token".into())
            })?;
            Ok(MintedToken { token, expires_at })
        }
    }
}

/// `expires_in` of a token answer (number or numeric string; default 3600).
pub fn expires_in(answer: &Value) -> i64 {
    match answer.get("expires_in") {
        Some(Value::Number(n)) => n.as_i64(),
        Some(Value::String(s)) => s.trim().parse().ok(),
        _ => None,
    }
    .filter(|n| *n > 0 && *n < 10 * 365 * 86_400)
    .unwrap_or(3600)
}

impl Minter {
    fn cached(&self, service: &str, fingerprint: &[u8; 32], now: i64) -> Option<MintedToken> {
        let cache = self.cache.lock().ok()?;
        let entry = cache.get(service)?;
        (entry.fingerprint == *fingerprint && now < entry.expires_at - EXPIRY_MARGIN_SECS).then(
            || MintedToken {
                token: entry.token.clone(),
                expires_at: entry.expires_at,
            },
        )
    }

    fn remember(&self, service: &str, fingerprint: [u8; 32], minted: &MintedToken) {
        let Ok(mut cache) = self.cache.lock() else {
            return;
        };
        if cache.len() >= MAX_CACHED {
            let now = crate::clock::now_unix();
            cache.retain(|_, t| t.expires_at - EXPIRY_MARGIN_SECS > now);
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
        }
        cache.insert(
            service.to_string(),
            CachedToken {
                fingerprint,
                token: minted.token.clone(),
                expires_at: minted.expires_at,
            },
        );
    }

    async fn get_or_mint(
        &self,
        upstream: &Upstream,
        service: &str,
        kind: &MintKind,
    ) -> Result<MintedToken, VaultError> {
        let fingerprint = kind.fingerprint();
        if let Some(hit) = self.cached(service, &fingerprint, crate::clock::now_unix()) {
            return Ok(hit);
        }
        let flight = self.flights.get(service);
        let _guard = flight.lock().await;
        if let Some(hit) = self.cached(service, &fingerprint, crate::clock::now_unix()) {
            return Ok(hit);
        }
        let minted = mint(upstream, kind).await?;
        tracing::info!(
            service,
            expires_at = minted.expires_at,
            "minted a short-lived token"
        );
        self.remember(service, fingerprint, &minted);
        Ok(minted)
    }
}

/// The minting service: short-lived tokens minted from sealed signing keys (in memory only), each
/// token endpoint checked by the egress service first.
pub struct MintingService {
    storage: SharedStorage,
    minter: Minter,
    egress: Arc<EgressService>,
}

impl MintingService {
    /// The service over `storage`, checking token endpoints with `egress`.
    pub fn new(storage: SharedStorage, egress: Arc<EgressService>) -> MintingService {
        MintingService {
            storage,
            minter: Minter::default(),
            egress,
        }
    }

    fn storage(&self) -> &SharedStorage {
        &self.storage
    }

    /// Whether `service` holds a GitHub App stored before minting inputs were sealed: its key is
    /// an ordinary field, which must not come out as a plain credential whatever meta now says.
    pub(crate) async fn is_legacy_minting(&self, service: &str) -> Result<bool, VaultError> {
        Ok(self.storage().is_legacy_minting(service).await?)
    }

    /// The token to inject for `service`: minted from its sealed signing key (the token endpoint
    /// first passes the egress policy), or its stored `accessToken`; `token_not_found` when there
    /// is neither.
    pub(crate) async fn token_of(
        &self,
        upstream: &Upstream,
        service: &str,
        credential: OpenedCredential,
        mint: Option<MintKind>,
        request_id: &str,
    ) -> Result<Zeroizing<String>, VaultError> {
        if let Some(kind) = mint {
            drop(credential);
            return Ok(self
                .minted(upstream, service, &kind, request_id)
                .await?
                .token);
        }
        credential
            .token
            .secret("accessToken")
            .filter(|t| !t.is_empty())
            .map(|t| Zeroizing::new(t.to_string()))
            .ok_or(VaultError::TokenNotFound)
    }

    pub(crate) async fn minted(
        &self,
        upstream: &Upstream,
        service: &str,
        kind: &MintKind,
        request_id: &str,
    ) -> Result<MintedToken, VaultError> {
        let url = kind.token_endpoint()?;
        self.egress
            .check_token_endpoint(upstream, service, &url, Some(kind.provider()), request_id)
            .await?;
        self.minter.get_or_mint(upstream, service, kind).await
    }
}
