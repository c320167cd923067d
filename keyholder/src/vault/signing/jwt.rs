//! JWT assertions from an owner-declared template (`keyholder sign-config set SERVICE --iss --sub
//! --aud ...`), signed with the credential's `privateKeyData`: injected as `${JWT}` (key-pair auth
//! such as Snowflake's, App Store Connect's ES256 tokens), or exchanged at the owner's token URL
//! (RFC 7523 JWT bearer grant) for an access token that is cached and injected as `${TOKEN}`.

use std::collections::HashMap;
use std::sync::Mutex;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rand::RngCore as _;
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, CONTENT_TYPE};
use reqwest::Method;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use url::Url;
use zeroize::Zeroizing;

use super::config::{JwtAlg, JwtTemplate};
use crate::upstream::{OutboundRequest, Upstream};
use crate::vault::credentials::scrub;
use crate::vault::minting::{expires_in, KeyedLocks, EXPIRY_MARGIN_SECS};
use crate::vault::VaultError;

/// The placeholder replaced by a fresh assertion in header templates.
pub const JWT_PLACEHOLDER: &str = "${JWT}";
/// Largest `privateKeyData` used for signing.
pub const MAX_PRIVATE_KEY: usize = 16 * 1024;
const MAX_CACHED: usize = 1024;

/// Signs a fresh assertion of `template` with `pem` (`iat` now, `exp` after the lifetime, a
/// random `jti`).
pub fn assertion(template: &JwtTemplate, pem: &str) -> Result<Zeroizing<String>, VaultError> {
    if pem.len() > MAX_PRIVATE_KEY {
        return Err(VaultError::Invalid(
            "'privateKeyData' is larger than a private key".into(),
        ));
    }
    let unusable = || {
        VaultError::Invalid(format!(
            "the stored private key is not a usable {} key (PEM)",
            template.alg.as_str()
        ))
    };
    let (algorithm, key) = match template.alg {
        JwtAlg::RS256 => (Algorithm::RS256, EncodingKey::from_rsa_pem(pem.as_bytes())),
        JwtAlg::ES256 => (Algorithm::ES256, EncodingKey::from_ec_pem(pem.as_bytes())),
        JwtAlg::EdDSA => (Algorithm::EdDSA, EncodingKey::from_ed_pem(pem.as_bytes())),
    };
    let key = key.map_err(|_| unusable())?;
    let now = crate::clock::now_unix();
    let mut jti = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut jti);
    let claims = json!({
        "iss": template.iss,
        "sub": template.sub,
        "aud": template.aud,
        "iat": now,
        "exp": now + template.lifetime as i64,
        "jti": hex::encode(jti),
    });
    let mut header = Header::new(algorithm);
    header.kid = template.kid.clone();
    jsonwebtoken::encode(&header, &claims, &key)
        .map(Zeroizing::new)
        .map_err(|_| unusable())
}

struct CachedToken {
    fingerprint: [u8; 32],
    token: Zeroizing<String>,
    expires_at: i64,
}

/// Access tokens obtained with assertions, by service (memory only).
#[derive(Default)]
pub struct ExchangedTokens {
    tokens: Mutex<HashMap<String, CachedToken>>,
    flights: KeyedLocks,
}

fn fingerprint(template: &JwtTemplate, pem: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    let text = serde_json::to_string(template).unwrap_or_default();
    for part in [text.as_bytes(), pem.as_bytes()] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.finalize().into()
}

impl ExchangedTokens {
    fn cached(&self, service: &str, fingerprint: &[u8; 32], now: i64) -> Option<Zeroizing<String>> {
        let tokens = self.tokens.lock().ok()?;
        let t = tokens.get(service)?;
        (t.fingerprint == *fingerprint && now < t.expires_at - EXPIRY_MARGIN_SECS)
            .then(|| t.token.clone())
    }

    /// The access token for `service`: cached, or obtained now by sending a fresh assertion to
    /// `token_url` (already checked against the egress policy by the caller).
    pub async fn token(
        &self,
        upstream: &Upstream,
        service: &str,
        template: &JwtTemplate,
        pem: &str,
        token_url: Url,
    ) -> Result<Zeroizing<String>, VaultError> {
        let fingerprint = fingerprint(template, pem);
        if let Some(hit) = self.cached(service, &fingerprint, crate::clock::now_unix()) {
            return Ok(hit);
        }
        let flight = self.flights.get(&format!("jwt:{service}"));
        let _guard = flight.lock().await;
        if let Some(hit) = self.cached(service, &fingerprint, crate::clock::now_unix()) {
            return Ok(hit);
        }
        let jwt = assertion(template, pem)?;
        let mut form = url::form_urlencoded::Serializer::new(String::new());
        form.append_pair("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer")
            .append_pair("assertion", &jwt);
        if let Some(scope) = &template.scope {
            form.append_pair("scope", scope);
        }
        let body = Zeroizing::new(form.finish());
        drop(jwt);
        let mut headers = HeaderMap::new();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        let response = upstream
            .send_provider(OutboundRequest {
                method: Method::POST,
                url: token_url,
                headers,
                body: Some(bytes::Bytes::copy_from_slice(body.as_bytes())),
            })
            .await
            .map_err(VaultError::Provider)?;
        if !response.status.is_success() {
            return Err(VaultError::ProviderRejected(format!(
                "the JWT token endpoint answered HTTP {}",
                response.status.as_u16()
            )));
        }
        let mut answer: Value = serde_json::from_slice(&response.body).map_err(|_| {
            VaultError::ProviderRejected("the JWT token endpoint answered with non-JSON".into())
        })?;
        let token = answer
            .get("access_token")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .map(|t| Zeroizing::new(t.to_string()));
        let lifetime = expires_in(&answer);
        scrub(&mut answer);
        let token = token.ok_or_else(|| {
            VaultError::ProviderRejected("the JWT token endpoint sent no access_token".into())
        })?;
        let expires_at = crate::clock::now_unix() + lifetime;
        tracing::info!(
            service,
            expires_at,
            "exchanged a JWT assertion for an access token"
        );
        if let Ok(mut tokens) = self.tokens.lock() {
            if tokens.len() >= MAX_CACHED {
                tokens.clear();
            }
            tokens.insert(
                service.to_string(),
                CachedToken {
                    fingerprint,
                    token: token.clone(),
                    expires_at,
                },
            );
        }
        Ok(token)
    }
}
