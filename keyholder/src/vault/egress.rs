//! The owner's egress policy per service (`pinned`, `allowlist`, `any`, and the pinned OAuth token
//! URL) and the proxied call that runs under it: policy first, credential second, send last.

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use keyholder_protocol::wire::UpstreamRequest;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::Method;
use serde::Serialize;
use url::Url;
use zeroize::Zeroizing;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq as _;

use super::catalogue::{self, Provider};
use super::credentials::{CredentialsService, OpenedCredential};
use super::key_handle::KeyHandle;
use super::keyring::KeyRing;
use super::minting::{detect, MintingService};
use super::redact::Redactor;
use super::signing::SigningService;
use super::VaultError;
use crate::storage::{ChangeSet, EgressRow, PinRow, RefusalRow, SharedStorage, Storage, Write};
use keyholder_protocol::document::KeyLookup as _;

/// The egress policies read so far, so a proxied call needs no database read. Server-side writes
/// (pins) invalidate their service; the owner's `keyholder egress` bumps the owner generation,
/// which clears the cache within a quarter second on a running server.
#[derive(Default)]
pub struct EgressPolicyCache {
    epoch: std::sync::atomic::AtomicU64,
    policies: std::sync::Mutex<std::collections::HashMap<String, EgressPolicy>>,
}

impl EgressPolicyCache {
    fn epoch(&self) -> u64 {
        self.epoch.load(std::sync::atomic::Ordering::Acquire)
    }

    fn get(&self, service: &str) -> Option<EgressPolicy> {
        self.policies.lock().ok()?.get(service).cloned()
    }

    fn put(&self, service: &str, policy: EgressPolicy, epoch: u64) {
        if let Ok(mut policies) = self.policies.lock() {
            if self.epoch() == epoch {
                if policies.len() >= 10_000 {
                    policies.clear();
                }
                policies.insert(service.to_string(), policy);
            }
        }
    }

    fn invalidate(&self, service: &str) {
        if let Ok(mut policies) = self.policies.lock() {
            self.epoch.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            policies.remove(service);
        }
    }

    /// Forgets every policy (the owner changed some).
    pub fn clear(&self) {
        if let Ok(mut policies) = self.policies.lock() {
            self.epoch.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            policies.clear();
        }
    }
}
use crate::upstream::{
    self, BodyStream, OutboundRequest, StreamedResponse, Upstream, UpstreamBody, UpstreamError,
};

/// The placeholder replaced by the credential in header templates.
pub const TOKEN_PLACEHOLDER: &str = "${TOKEN}";

/// How a service's credential may travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EgressMode {
    /// Origins the built-in catalogue knows for the credential's shape, plus the owner's entries
    /// (the default).
    Known,
    /// The first call with a credential pins its origin for that credential (owner opt-in), plus
    /// the owner's entries.
    Pinned,
    /// Only the owner's listed origins or host patterns.
    Allowlist,
    /// Anywhere the SSRF guard allows.
    Any,
}

impl EgressMode {
    fn as_str(self) -> &'static str {
        match self {
            EgressMode::Known => "known",
            EgressMode::Pinned => "pinned",
            EgressMode::Allowlist => "allowlist",
            EgressMode::Any => "any",
        }
    }

    /// Parses a mode name (`known`, `pinned`, `allowlist`, `any`).
    pub fn parse(s: &str) -> Result<EgressMode, VaultError> {
        match s {
            "known" => Ok(EgressMode::Known),
            "pinned" => Ok(EgressMode::Pinned),
            "allowlist" => Ok(EgressMode::Allowlist),
            "any" => Ok(EgressMode::Any),
            other => Err(VaultError::Invalid(format!(
                "egress mode '{other}' (known, pinned, allowlist or any)"
            ))),
        }
    }
}

impl std::str::FromStr for EgressMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EgressMode::parse(s).map_err(|e| e.to_string())
    }
}

/// A service's egress policy as stored (a service without a row has the default: known).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EgressPolicy {
    /// The service.
    pub service: String,
    /// The mode.
    pub mode: EgressMode,
    /// Allowed origins (`scheme://host:port`) and host patterns (`host`, `*.suffix`).
    pub allowlist: Vec<String>,
    /// The most recent pin's origin (pinned mode), for display.
    pub pinned_origin: Option<String>,
    /// Every pin, newest first: one per credential the service has held in pinned mode.
    pub pins: Vec<EgressPin>,
    /// The pinned OAuth token URL (refreshes with the platform's client configuration).
    pub token_url: Option<String>,
}

/// One pin: the origin a credential was first sent to (pinned mode).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EgressPin {
    /// The pinned origin.
    pub origin: String,
    /// Unix time it was pinned.
    pub pinned_at: i64,
    /// Keyed fingerprint of the credential it belongs to (`v<key version>:<hex>`).
    #[serde(skip)]
    pub credential: String,
}

/// Most pins kept per service; beyond it no new one is made (refused until `egress reset`), so
/// a platform cannot push a credential's pin out by cycling throwaway credentials.
pub const MAX_PINS_PER_SERVICE: i64 = 32;

/// What the policy says about one origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Send.
    Allow,
    /// Send, and pin this origin (pinned mode, nothing pinned for this credential yet).
    Pin,
    /// Refuse; the text says why and how the owner allows it (no secret, no resolution).
    Deny(String),
}

/// The command that allows `origin` for `service`, for refusal messages.
pub fn allow_command(service: &str, origin: &str) -> String {
    format!("keyholder egress allow {service} {origin}")
}

impl EgressPolicy {
    /// The default policy of a service.
    pub fn default_for(service: &str) -> EgressPolicy {
        EgressPolicy {
            service: service.to_string(),
            mode: EgressMode::Known,
            allowlist: Vec::new(),
            pinned_origin: None,
            pins: Vec::new(),
            token_url: None,
        }
    }

    fn owner_allows(&self, origin: &str) -> bool {
        self.allowlist.iter().any(|e| entry_matches(e, origin))
    }

    fn deny(&self, origin: &str, why: &str) -> Decision {
        Decision::Deny(self.refusal(origin, why))
    }

    /// A refusal message: what was refused, why, and the command that allows it.
    fn refusal(&self, origin: &str, why: &str) -> String {
        format!(
            "{origin} {why} for service '{}'; the owner can allow it with `{}`",
            self.service,
            allow_command(&self.service, origin)
        )
    }

    /// Judges a normalized origin (see [`origin_of`]) for a proxied call carrying a credential of
    /// `provider`'s shape; `pin` is the origin pinned for this very credential, if any.
    pub fn decide(
        &self,
        origin: &str,
        provider: Option<&'static Provider>,
        pin: Option<&str>,
    ) -> Decision {
        if self.mode == EgressMode::Any || self.owner_allows(origin) {
            return Decision::Allow;
        }
        match self.mode {
            EgressMode::Any => Decision::Allow,
            EgressMode::Known => match provider {
                Some(p) if p.knows_api(origin) => Decision::Allow,
                Some(p) => self.deny(
                    origin,
                    &format!("is not an origin {} is known to use", p.name),
                ),
                None => self.deny(
                    origin,
                    "is not allowed (the credential matches no provider of the built-in catalogue)",
                ),
            },
            EgressMode::Pinned => match pin {
                Some(pinned) if pinned == origin => Decision::Allow,
                Some(_) => self.deny(origin, "is not the origin pinned for this credential"),
                None => Decision::Pin,
            },
            EgressMode::Allowlist => self.deny(origin, "is not on the owner's allowlist"),
        }
    }

    /// Judges a token endpoint (minting, OAuth refresh with the platform's client): the owner's
    /// entries, and in `known` and `pinned` mode the catalogue's endpoints of the credential's
    /// provider; never pinned on first use.
    pub fn decide_token_endpoint(
        &self,
        origin: &str,
        provider: Option<&'static Provider>,
    ) -> Decision {
        if self.mode == EgressMode::Any || self.owner_allows(origin) {
            return Decision::Allow;
        }
        match (self.mode, provider) {
            (EgressMode::Known | EgressMode::Pinned, Some(p)) if p.knows_token_endpoint(origin) => {
                Decision::Allow
            }
            _ => self.deny(origin, "is not a token endpoint known or allowed"),
        }
    }
}

/// `scheme://host:port` of a URL, with the scheme's default port written out: the one origin form
/// ([`crate::upstream::Origin`]), also the one the audit trail names. Pins stored before it was a
/// type were written by this same function in this same form, so they match as they are.
pub fn origin_of(url: &Url) -> Result<String, VaultError> {
    crate::upstream::Origin::of(url)
        .map(|origin| origin.to_string())
        .map_err(|e| VaultError::Invalid(e.to_string()))
}

fn host_of(origin: &str) -> &str {
    let rest = origin.split_once("://").map(|(_, r)| r).unwrap_or(origin);
    match rest.rfind(':') {
        Some(i) if !rest.ends_with(']') => &rest[..i],
        _ => rest,
    }
}

/// Whether an owner allowlist entry covers a normalized origin (see [`origin_of`]).
pub fn entry_matches(entry: &str, origin: &str) -> bool {
    if entry.contains("://") {
        return entry == origin;
    }
    let host = host_of(origin);
    match entry.strip_prefix("*.") {
        Some(suffix) => host.len() > suffix.len() + 1 && host.ends_with(&format!(".{suffix}")),
        None => host == entry,
    }
}

/// Normalizes an owner-given allowlist entry: an origin (`https://api.example.com[:port]`, no path)
/// or a host pattern (`api.example.com`, `*.example.com`; matches any scheme the guard permits).
pub fn normalize_allow_entry(entry: &str) -> Result<String, VaultError> {
    let entry = entry.trim();
    if entry.contains("://") {
        let url = Url::parse(entry)
            .map_err(|_| VaultError::Invalid(format!("'{entry}' is not an origin")))?;
        if !matches!(url.scheme(), "http" | "https")
            || !matches!(url.path(), "" | "/")
            || url.query().is_some()
            || url.fragment().is_some()
            || !url.username().is_empty()
        {
            return Err(VaultError::Invalid(format!(
                "'{entry}' must be scheme://host[:port] with http or https and nothing after"
            )));
        }
        return origin_of(&url);
    }
    let pattern = entry.to_ascii_lowercase();
    let host = pattern.strip_prefix("*.").unwrap_or(&pattern);
    let valid = !host.is_empty()
        && host.len() <= 253
        && host
            .split('.')
            .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    if !valid {
        return Err(VaultError::Invalid(format!(
            "'{entry}' is neither an origin nor a host pattern like api.example.com or *.example.com"
        )));
    }
    Ok(pattern)
}

/// A service's policy from its stored row and pins (the default when none is stored).
fn policy_from(
    service: &str,
    row: Option<EgressRow>,
    pins: Vec<PinRow>,
) -> Result<EgressPolicy, VaultError> {
    let Some(row) = row else {
        return Ok(EgressPolicy::default_for(service));
    };
    let pins: Vec<EgressPin> = pins
        .into_iter()
        .map(|p| EgressPin {
            origin: p.origin,
            pinned_at: p.pinned_at,
            credential: p.credential,
        })
        .collect();
    Ok(EgressPolicy {
        service: service.to_string(),
        mode: EgressMode::parse(&row.mode)
            .map_err(|_| VaultError::Corrupt(format!("egress mode '{}'", row.mode)))?,
        allowlist: row.allowlist,
        pinned_origin: pins.first().map(|p| p.origin.clone()),
        pins,
        token_url: row.token_url,
    })
}

/// Reads a service's policy (the default when none is stored).
pub async fn load_policy(storage: &dyn Storage, service: &str) -> Result<EgressPolicy, VaultError> {
    let (row, pins) = storage.egress_policy(service).await?;
    policy_from(service, row, pins)
}

/// The write that stores `policy` (pins apart).
fn save_policy(policy: &EgressPolicy) -> Write {
    Write::PutEgressPolicy(
        EgressRow {
            service: policy.service.clone(),
            mode: policy.mode.as_str().to_string(),
            allowlist: policy.allowlist.clone(),
            token_url: policy.token_url.clone(),
        },
        crate::clock::now_unix(),
    )
}

/// `keyholder egress allow`: adds entries (the mode stays; they count in every mode), or with
/// `any` switches to mode `any`. Refusals the new entries cover leave the pending list. Returns
/// the owner change to apply and the policy it makes.
pub async fn allow(
    storage: &dyn Storage,
    service: &str,
    entries: &[String],
    any: bool,
) -> Result<(ChangeSet, EgressPolicy), VaultError> {
    let mut policy = load_policy(storage, service).await?;
    if any {
        policy.mode = EgressMode::Any;
    } else {
        if entries.is_empty() {
            return Err(VaultError::Invalid(
                "name at least one origin or host pattern, or pass --any".into(),
            ));
        }
        for entry in entries {
            policy.allowlist.push(normalize_allow_entry(entry)?);
        }
        policy.allowlist.sort();
        policy.allowlist.dedup();
    }
    let mut change = ChangeSet::owner().write(save_policy(&policy));
    for pending in list_pending(storage).await? {
        if pending.service == service && (any || policy.owner_allows(&pending.origin)) {
            change = change.write(Write::DeleteRefusal(service.to_string(), pending.origin));
        }
    }
    Ok((change, policy))
}

/// `keyholder egress set SERVICE --mode M`: changes the mode, keeping the owner's entries. Leaving
/// or entering `pinned` forgets any pin (a pin is only ever made by a call in pinned mode).
pub async fn set_mode(
    storage: &dyn Storage,
    service: &str,
    mode: EgressMode,
) -> Result<(ChangeSet, EgressPolicy), VaultError> {
    let mut policy = load_policy(storage, service).await?;
    let mut change = ChangeSet::owner();
    if policy.mode != mode {
        change = change.write(Write::DeleteEgressPins(service.to_string()));
        policy.pinned_origin = None;
        policy.pins.clear();
    }
    policy.mode = mode;
    Ok((change.write(save_policy(&policy)), policy))
}

/// One refused (service, origin) the owner may want to allow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PendingEgress {
    /// The service.
    pub service: String,
    /// The refused origin (`scheme://host:port`).
    pub origin: String,
    /// Refusals so far.
    pub count: i64,
    /// Unix time of the last refusal.
    pub last_at: i64,
}

/// Most distinct (service, origin) pairs kept; further new pairs are only logged.
pub const MAX_PENDING: i64 = 1000;

/// `keyholder egress pending`: every recorded refusal, most recent first.
pub async fn list_pending(storage: &dyn Storage) -> Result<Vec<PendingEgress>, VaultError> {
    Ok(storage
        .refusals()
        .await?
        .into_iter()
        .map(|r: RefusalRow| PendingEgress {
            service: r.service,
            origin: r.origin,
            count: r.count,
            last_at: r.last_at,
        })
        .collect())
}

/// `keyholder egress reset`: back to the default (known, no entries, no pin, no token URL pinned).
pub fn reset(service: &str) -> (ChangeSet, EgressPolicy) {
    let change = ChangeSet::owner()
        .write(Write::DeleteEgressPolicy(service.to_string()))
        .write(Write::DeleteEgressPins(service.to_string()));
    (change, EgressPolicy::default_for(service))
}

/// Keyed fingerprint of a credential's secret content (fields and sealed inputs), under the data
/// key of `version`: a pin applies only to the credential it was made with.
fn fingerprint_with(
    keys: &KeyRing,
    version: u32,
    service: &str,
    credential: &OpenedCredential,
) -> Option<String> {
    let key = keys.data_key(version)?;
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key.expose()).ok()?;
    let mut part = |b: &[u8]| {
        mac.update(&(b.len() as u64).to_be_bytes());
        mac.update(b);
    };
    part(b"keyholder/v1/egress-pin");
    part(service.as_bytes());
    for name in credential.token.field_names() {
        part(name.as_bytes());
        part(credential.token.secret(name).unwrap_or("").as_bytes());
    }
    if let Some(sealed) = &credential.sealed {
        let bytes = Zeroizing::new(serde_json::to_vec(sealed).unwrap_or_default());
        part(&bytes);
    }
    let tag = mac.finalize().into_bytes();
    let hex: String = tag.iter().map(|b| format!("{b:02x}")).collect();
    Some(format!("v{version}:{hex}"))
}

/// Whether a stored pin fingerprint is the one of `credential`. One under a key no longer held
/// (retired) counts as matching: the pin stays in force rather than becoming claimable again.
fn pin_matches(keys: &KeyRing, stored: &str, service: &str, credential: &OpenedCredential) -> bool {
    let Some(version) = stored
        .strip_prefix('v')
        .and_then(|rest| rest.split_once(':'))
        .and_then(|(v, _)| v.parse::<u32>().ok())
    else {
        return true;
    };
    match fingerprint_with(keys, version, service, credential) {
        Some(current) => bool::from(current.as_bytes().ct_eq(stored.as_bytes())),
        None => true,
    }
}

/// Which pinned value a failed first call releases.
#[derive(Debug, Clone, Copy)]
pub(crate) enum PinKind {
    TokenUrl,
}

fn hop_or_platform_header(name: &HeaderName) -> bool {
    let n = name.as_str();
    upstream::HOP_BY_HOP.contains(&n)
        || n == "host"
        || n == "content-length"
        || n.starts_with("x-tokenvault-")
}

fn parse_method(method: Option<&str>) -> Result<Method, VaultError> {
    let method = method.unwrap_or("GET").to_ascii_uppercase();
    match method.as_str() {
        "GET" | "HEAD" | "POST" | "PUT" | "PATCH" | "DELETE" | "OPTIONS" => {
            Method::from_bytes(method.as_bytes())
                .map_err(|_| VaultError::Invalid("invalid 'upstream.method'".into()))
        }
        _ => Err(VaultError::Invalid(format!(
            "'upstream.method' {method} is not allowed (GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS)"
        ))),
    }
}

fn has_cr_lf(s: &str) -> bool {
    s.contains(['\r', '\n'])
}

/// A proxied call after validation, before any credential is touched.
struct ProxyPlan {
    method: Method,
    url: Url,
    headers: HeaderMap,
    templates: Vec<(HeaderName, String)>,
    body: Option<Bytes>,
}

fn plan(
    request: UpstreamRequest,
    templates: BTreeMap<String, String>,
    parsed: Option<Url>,
) -> Result<ProxyPlan, VaultError> {
    let url = match parsed {
        // The caller parsed `request.url` already (once per call).
        Some(url) => url,
        None => {
            let url_text = request
                .url
                .filter(|u| !u.is_empty())
                .ok_or_else(|| VaultError::Invalid("missing 'upstream.url'".into()))?;
            Url::parse(&url_text)
                .map_err(|_| VaultError::Invalid("'upstream.url' is not an absolute URL".into()))?
        }
    };
    let method = parse_method(request.method.as_deref())?;
    let body = match request.body.filter(|b| !b.is_empty()) {
        Some(b64) => Some(Bytes::from(
            base64::engine::general_purpose::STANDARD
                .decode(b64.as_bytes())
                .map_err(|_| {
                    VaultError::Invalid("'upstream.body' is not standard base64".into())
                })?,
        )),
        None => None,
    };
    let mut headers = HeaderMap::new();
    for (name, value) in request.headers.unwrap_or_default() {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| VaultError::Invalid(format!("invalid header name '{name}'")))?;
        if name.as_str().starts_with("x-tokenvault-") {
            continue;
        }
        let value = HeaderValue::from_str(&value)
            .map_err(|_| VaultError::Invalid(format!("invalid value of header '{name}'")))?;
        headers.append(name, value);
    }
    upstream::strip_hop_by_hop(&mut headers);
    // Answers must arrive uncompressed, so that an echoed credential can be found and redacted.
    headers.insert(
        reqwest::header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    let mut parsed = Vec::with_capacity(templates.len());
    for (name, template) in templates {
        if has_cr_lf(&name) || has_cr_lf(&template) {
            return Err(VaultError::Invalid(
                "header templates must not contain CR or LF".into(),
            ));
        }
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| VaultError::Invalid(format!("invalid header template name '{name}'")))?;
        if hop_or_platform_header(&name) {
            return Err(VaultError::Invalid(format!(
                "header '{name}' cannot be templated"
            )));
        }
        parsed.push((name, template));
    }
    Ok(ProxyPlan {
        method,
        url,
        headers,
        templates: parsed,
        body,
    })
}

/// The egress service: the services' egress policies through their cache, origin and token URL
/// pins, and refusals recorded for the owner. Every destination passes here before anything is sent.
pub struct EgressService {
    storage: SharedStorage,
    egress_cache: EgressPolicyCache,
}

impl EgressService {
    /// The service over `storage`, with an empty policy cache.
    pub fn new(storage: SharedStorage) -> EgressService {
        EgressService {
            storage,
            egress_cache: EgressPolicyCache::default(),
        }
    }

    fn storage(&self) -> &SharedStorage {
        &self.storage
    }

    /// Forgets every cached policy (the owner may have changed them).
    pub(super) fn clear_cache(&self) {
        self.egress_cache.clear();
    }

    /// The egress policy of `service`, read from the database on every call (the owner's CLI changes
    /// it while the server runs, so it takes effect at once).
    pub async fn egress_policy(&self, service: &str) -> Result<EgressPolicy, VaultError> {
        if let Some(policy) = self.egress_cache.get(service) {
            return Ok(policy);
        }
        let epoch = self.egress_cache.epoch();
        let policy = load_policy(self.storage().as_ref(), service).await?;
        self.egress_cache.put(service, policy.clone(), epoch);
        Ok(policy)
    }

    pub(super) async fn claim_pin(
        &self,
        service: &str,
        origin: &str,
        credential: &str,
    ) -> Result<bool, VaultError> {
        let claimed = self
            .storage()
            .claim_pin(
                service,
                credential,
                origin,
                crate::clock::now_unix(),
                MAX_PINS_PER_SERVICE,
            )
            .await;
        self.egress_cache.invalidate(service);
        Ok(claimed?)
    }

    pub(crate) async fn claim_token_url(
        &self,
        service: &str,
        token_url: &str,
    ) -> Result<bool, VaultError> {
        let claimed = self
            .storage()
            .claim_token_url(service, token_url, crate::clock::now_unix())
            .await;
        self.egress_cache.invalidate(service);
        let (claimed, pinned) = claimed?;
        if pinned.as_deref() == Some(token_url) {
            Ok(claimed)
        } else {
            Err(VaultError::EgressDenied(
                "the token URL differs from the one pinned for this service".into(),
            ))
        }
    }

    /// Undoes the origin pin of `credential` set by a call that the guard then refused before
    /// anything was sent. Once a request may have left, a pin is never released.
    pub(super) async fn release_origin_pin(&self, service: &str, credential: &str, origin: &str) {
        let result = self
            .storage()
            .release_pin(service, credential, origin)
            .await;
        self.egress_cache.invalidate(service);
        if let Err(err) = result {
            tracing::warn!(error = %err, "could not release an egress pin");
        }
    }

    /// Undoes a token URL pin set by a refresh that failed without an answer; a pin changed
    /// meanwhile is left alone.
    pub(crate) async fn release_pin(&self, kind: PinKind, service: &str, value: &str) {
        let result = match kind {
            PinKind::TokenUrl => self.storage().release_token_url(service, value).await,
        };
        self.egress_cache.invalidate(service);
        if let Err(err) = result {
            tracing::warn!(error = %err, "could not release an egress pin");
        }
    }

    /// Records a policy refusal durably (for `keyholder egress pending`) and builds its error.
    pub(crate) async fn refuse_egress(
        &self,
        service: &str,
        origin: &str,
        reason: String,
        request_id: &str,
    ) -> VaultError {
        tracing::warn!(request_id, service, origin, reason = %reason, "egress denied by the policy");
        let recorded = self
            .storage()
            .record_refusal(service, origin, crate::clock::now_unix(), MAX_PENDING)
            .await;
        if let Err(err) = recorded {
            tracing::warn!(request_id, error = %err, "could not record an egress refusal");
        }
        VaultError::EgressDenied(reason)
    }

    /// Checks a token endpoint (minting, or OAuth refresh with the platform's client) against the
    /// SSRF guard and the service's egress policy before anything is sent there.
    pub(crate) async fn check_token_endpoint(
        &self,
        upstream: &Upstream,
        service: &str,
        url: &Url,
        provider: Option<&'static Provider>,
        request_id: &str,
    ) -> Result<(), VaultError> {
        upstream.check_url(url).map_err(|e| {
            tracing::warn!(request_id, service, reason = %e, "token endpoint refused by the egress guard");
            VaultError::EgressDenied(e.to_string())
        })?;
        let origin = origin_of(url)?;
        let policy = self.egress_policy(service).await?;
        match policy.decide_token_endpoint(&origin, provider) {
            Decision::Deny(reason) => Err(self
                .refuse_egress(service, &origin, reason, request_id)
                .await),
            Decision::Allow | Decision::Pin => Ok(()),
        }
    }
}

/// The platform's upstream call as `/v1/proxy` received it.
pub struct UpstreamCall {
    /// The call (`upstream`).
    pub request: UpstreamRequest,
    /// `request.url` parsed, if the caller did so (parsed once per call).
    pub url: Option<Url>,
    /// Header templates with `${TOKEN}`.
    pub templates: BTreeMap<String, String>,
}

/// The proxy service (`/v1/proxy`): the credential, its signing and minting, and the egress checks,
/// in the order a proxied call needs them.
pub struct ProxyService {
    keys: Arc<KeyHandle>,
    egress: Arc<EgressService>,
    credentials: Arc<CredentialsService>,
    signing: Arc<SigningService>,
    minting: Arc<MintingService>,
}

impl ProxyService {
    /// The service over the ones a proxied call uses.
    pub fn new(
        keys: Arc<KeyHandle>,
        egress: Arc<EgressService>,
        credentials: Arc<CredentialsService>,
        signing: Arc<SigningService>,
        minting: Arc<MintingService>,
    ) -> ProxyService {
        ProxyService {
            keys,
            egress,
            credentials,
            signing,
            minting,
        }
    }

    /// `/v1/proxy`: validates the call, applies the SSRF guard and the service's egress policy
    /// (judged against the credential's own shape), only then mints or takes the token, fills the
    /// header templates, and sends. The answer comes back with the injected credential redacted.
    #[tracing::instrument(skip_all, fields(service = %service))]
    pub async fn proxy_call(
        &self,
        upstream: &Upstream,
        service: &str,
        call: UpstreamCall,
        request_id: &str,
        replay: &super::replay::ReplayGuard,
    ) -> Result<ProxiedAnswer, VaultError> {
        let plan = plan(call.request, call.templates, call.url)?;
        let host = plan.url.host_str().unwrap_or("").to_string();
        let guard_deny = |reason: String| {
            tracing::warn!(request_id, service, host = %host, reason = %reason, "egress denied");
            VaultError::EgressDenied(reason)
        };
        // The guard first: schemes without a host (file:) are refused here, not as malformed.
        upstream
            .check_url(&plan.url)
            .map_err(|e| guard_deny(e.to_string()))?;
        let origin = origin_of(&plan.url)?;
        let policy = crate::telemetry::timed(
            crate::telemetry::SPAN_EGRESS_POLICY,
            self.egress.egress_policy(service),
        )
        .await?;
        let credential = self.credentials.open_credential_full(service).await?;
        let mint = detect(&credential)?;
        // Keys that sign rather than travel (issue 24); a bearer credential skips this.
        let material = mint.is_none() && super::signing::has_material(&credential.token);
        let signing = match material {
            true => self.signing.signing_plan(service, &credential).await?,
            false => None,
        };
        let has_token = credential
            .token
            .secret("accessToken")
            .filter(|t| !t.is_empty())
            .is_some();
        if mint.is_none() && signing.is_none() && !has_token {
            // Nothing to inject: no egress question to ask.
            return Err(VaultError::TokenNotFound);
        }
        let provider = match (&mint, &signing) {
            (Some(kind), _) => Some(kind.provider()),
            (None, Some(s)) if s.aws.is_some() => Some(&catalogue::AWS),
            _ => credential
                .token
                .secret("accessToken")
                .and_then(catalogue::provider_for),
        };
        let aws_scope = match &signing {
            Some(signing) => {
                self.signing
                    .aws_scope(service, signing, &plan.url, &origin, request_id)
                    .await?
            }
            None => None,
        };
        let keys = self.keys.keys();
        let pin = match policy.mode {
            EgressMode::Pinned => policy
                .pins
                .iter()
                .find(|p| pin_matches(&keys, &p.credential, service, &credential))
                .map(|p| p.origin.as_str()),
            _ => None,
        };
        let decision = policy.decide(&origin, provider, pin);
        if let Decision::Deny(reason) = decision {
            return Err(self
                .egress
                .refuse_egress(service, &origin, reason, request_id)
                .await);
        }
        let fingerprint = match decision {
            Decision::Pin => Some(
                fingerprint_with(&keys, keys.current_data_version(), service, &credential)
                    .ok_or_else(|| VaultError::Corrupt("no current data key".into()))?,
            ),
            _ => None,
        };
        drop(keys);
        // Nothing has left the keyholder yet. From here on it acts (a token endpoint, a pin, the
        // upstream call): the request's replay marks, committing since the request was verified
        // (overlapping the checks and the decryption above), must be durable first, so that a
        // crash cannot let the same signed call through a second time. Usage counts under a cap
        // were made durable in the policy check.
        crate::telemetry::timed(
            crate::telemetry::SPAN_COMMIT,
            super::replay::durable_now(replay),
        )
        .await?;
        let token = match signing.as_ref().and_then(|s| s.jwt.as_ref()) {
            // RFC 7523: the assertion is exchanged at the owner's token URL for ${TOKEN}.
            Some((template, key)) if template.token_url.is_some() => {
                drop(credential);
                let url = Url::parse(template.token_url.as_deref().unwrap_or(""))
                    .map_err(|_| VaultError::Invalid("the JWT token URL is not a URL".into()))?;
                self.egress
                    .check_token_endpoint(upstream, service, &url, None, request_id)
                    .await?;
                Some(
                    self.signing
                        .state
                        .exchanged
                        .token(upstream, service, template, key, url)
                        .await?,
                )
            }
            _ if mint.is_some() || has_token => Some(
                self.minting
                    .token_of(upstream, service, credential, mint, request_id)
                    .await?,
            ),
            _ => {
                drop(credential);
                None
            }
        };
        let wants_jwt = material
            && plan
                .templates
                .iter()
                .any(|(_, t)| t.contains(super::signing::jwt::JWT_PLACEHOLDER));
        let jwt = match signing.as_ref().and_then(|s| s.jwt.as_ref()) {
            Some((template, key)) if wants_jwt => {
                Some(super::signing::jwt::assertion(template, key)?)
            }
            None if wants_jwt => {
                return Err(VaultError::Invalid(format!(
                    "{} needs the owner's JWT template (keyholder sign-config set {service} --iss I --sub S --aud A)",
                    super::signing::jwt::JWT_PLACEHOLDER
                )))
            }
            _ => None,
        };
        let redact = match (&token, &jwt, signing.as_ref().and_then(|s| s.aws.as_ref())) {
            (Some(token), _, _) => token.as_str(),
            (None, Some(jwt), _) => jwt.as_str(),
            (None, None, Some(aws)) => aws.session_token.as_deref().map_or("", |t| t.as_str()),
            (None, None, None) => "",
        };
        let redactor = Redactor::new(redact);
        let mut headers = plan.headers;
        for (name, template) in &plan.templates {
            let value = match (&token, &jwt) {
                // A bearer credential: one substitution, as always.
                (Some(token), None) => Zeroizing::new(template.replace(TOKEN_PLACEHOLDER, token)),
                (token, jwt) => {
                    let mut value = match token {
                        Some(token) => Zeroizing::new(template.replace(TOKEN_PLACEHOLDER, token)),
                        None if template.contains(TOKEN_PLACEHOLDER) => {
                            return Err(VaultError::TokenNotFound)
                        }
                        None => Zeroizing::new(template.clone()),
                    };
                    if let Some(jwt) = jwt {
                        value = Zeroizing::new(
                            value.replace(super::signing::jwt::JWT_PLACEHOLDER, jwt),
                        );
                    }
                    value
                }
            };
            if has_cr_lf(&value) {
                return Err(VaultError::Invalid(format!(
                    "header '{name}' would contain CR or LF after substitution"
                )));
            }
            let value = upstream::sensitive_value(&value).ok_or_else(|| {
                VaultError::Invalid(format!("header '{name}' is not a valid header value"))
            })?;
            headers.insert(name.clone(), value);
        }
        drop(token);
        drop(jwt);
        let claimed = if let Some(fingerprint) = &fingerprint {
            if !self.egress.claim_pin(service, &origin, fingerprint).await? {
                // Another call pinned another origin first, or the service holds the most pins.
                let reason = policy.refusal(
                    &origin,
                    "could not be pinned (another origin was pinned first, or the pin limit was reached)",
                );
                return Err(self
                    .egress
                    .refuse_egress(service, &origin, reason, request_id)
                    .await);
            }
            tracing::info!(request_id, origin = %origin, "egress origin pinned");
            true
        } else {
            false
        };
        let call = crate::telemetry::Child::start(crate::telemetry::SPAN_UPSTREAM);
        call.inject(&mut headers);
        let call_attributes = match call.is_recording() {
            true => vec![
                ("http.request.method", plan.method.to_string()),
                ("server.address", host.clone()),
            ],
            false => Vec::new(),
        };
        let mut outbound = OutboundRequest {
            method: plan.method,
            url: plan.url,
            headers,
            body: plan.body,
        };
        let signed = match &signing {
            None => None,
            Some(signing) => Some(
                self.signing
                    .sign_outbound(
                        upstream,
                        service,
                        signing,
                        aws_scope.as_ref(),
                        &mut outbound,
                        request_id,
                    )
                    .await?,
            ),
        };
        let tls = signing.as_ref().and_then(|s| s.tls.as_ref());
        let result = match tls {
            None => upstream.send_streaming(outbound).await,
            Some(identity) => upstream.send_streaming_as(outbound, identity).await,
        };
        call.end_client(call_attributes);
        match result {
            Ok(response) => {
                let mut answer = redact_answer(redactor, response);
                answer.signed = signed;
                let redactions = answer.redactions;
                if redactions > 0 {
                    tracing::warn!(
                        request_id,
                        service,
                        origin = %origin,
                        redactions,
                        "the upstream echoed the injected credential; redacted from the answer"
                    );
                }
                Ok(answer)
            }
            Err(err) => match err {
                // The guard refused at resolution: nothing was sent, so a fresh pin goes again.
                UpstreamError::Refused(refused) => {
                    if let (true, Some(fingerprint)) = (claimed, &fingerprint) {
                        self.egress
                            .release_origin_pin(service, fingerprint, &origin)
                            .await;
                    }
                    Err(guard_deny(refused.to_string()))
                }
                other => {
                    tracing::warn!(request_id, error = %other, "upstream call failed");
                    Err(VaultError::Upstream(other))
                }
            },
        }
    }
}

/// A proxied answer, with the injected credential redacted from its head (and from its body as
/// the body is read).
pub struct ProxiedAnswer {
    /// The upstream status.
    pub status: reqwest::StatusCode,
    /// The upstream headers, redacted.
    pub headers: HeaderMap,
    /// The body, redacted whole or as it streams.
    pub body: ProxiedBody,
    /// Values redacted from the headers and (when whole) the body.
    pub redactions: u64,
    /// How the request was signed, for the audit entry (issue 24; never a key or signature).
    pub signed: Option<String>,
}

/// The body of a proxied answer.
pub enum ProxiedBody {
    /// Read whole and redacted.
    Whole(Bytes),
    /// Redacted chunk by chunk as it arrives.
    Stream(Box<RedactedStream>),
}

/// Room for a few `[REDACTED]` markers (longer than nothing, shorter than most secrets) beyond a
/// chunk's own length, so that a chunk's output is allocated once.
const REDACTED_SLACK: usize = 64;

/// A streamed upstream body passed through the credential [`Redactor`]: a value split across
/// chunks is still found (the redactor holds back up to the longest form minus one byte).
pub struct RedactedStream {
    inner: BodyStream,
    redactor: Redactor,
    done: bool,
    /// The rest of the upstream's last chunk, passed on a slice at a time.
    pending: Bytes,
}

/// Largest piece of an upstream chunk redacted and passed on at once: the client's read buffer
/// grows to a few hundred KiB on a fast upstream, and the server copies each piece into its write
/// buffer, so a stream holds a few of these rather than a few of those. (Measured: 256 KiB pieces
/// cost more CPU a MiB, not less.)
const STREAM_SLICE: usize = 64 * 1024;

impl RedactedStream {
    /// The next redacted chunk, `None` at the end of the body.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, UpstreamError> {
        loop {
            let mut out = Vec::new();
            if self.pending.is_empty() {
                if self.done {
                    return Ok(None);
                }
                match self.inner.next_chunk().await? {
                    Some(chunk) => self.pending = chunk,
                    None => {
                        self.done = true;
                        self.redactor.finish(&mut out);
                    }
                }
            }
            if !self.pending.is_empty() {
                let piece = self.pending.split_to(self.pending.len().min(STREAM_SLICE));
                // Most pieces hold no echo: they go on as they are, not copied.
                if let Some(clean) = self.redactor.pass_clean(&piece) {
                    if clean > 0 {
                        return Ok(Some(piece.slice(..clean)));
                    }
                    continue;
                }
                out.reserve_exact(piece.len() + REDACTED_SLACK);
                self.redactor.push(&piece, &mut out);
            }
            if !out.is_empty() {
                return Ok(Some(Bytes::from(out)));
            }
        }
    }

    /// Values redacted from the body so far.
    pub fn redactions(&self) -> u64 {
        self.redactor.count()
    }
}

/// Redacts the credential from every header value, dropping a header whose name holds it. Most
/// answers hold no echo: their map is passed on as it is, rebuilt only from the first hit on.
fn redact_headers(redactor: &mut Redactor, headers: HeaderMap) -> HeaderMap {
    let mut scratch = Vec::new();
    let mut clean: Option<HeaderMap> = None;
    for (i, (name, value)) in headers.iter().enumerate() {
        scratch.clear();
        let name_hit = redactor.redact_all(name.as_str().as_bytes(), &mut scratch) > 0;
        let value_hit = !name_hit && {
            scratch.clear();
            redactor.redact_all(value.as_bytes(), &mut scratch) > 0
        };
        if (name_hit || value_hit) && clean.is_none() {
            let mut map = HeaderMap::with_capacity(headers.len());
            for (n, v) in headers.iter().take(i) {
                map.append(n.clone(), v.clone());
            }
            clean = Some(map);
        }
        let Some(map) = clean.as_mut() else {
            continue;
        };
        if name_hit {
            continue;
        }
        if value_hit {
            if let Ok(v) = HeaderValue::from_bytes(&scratch) {
                map.append(name.clone(), v);
            }
        } else {
            map.append(name.clone(), value.clone());
        }
    }
    clean.unwrap_or(headers)
}

/// Redacts the credential from every header value (dropping a header whose name holds it) and
/// from the body: a whole body at once, a streamed one as it is read.
fn redact_answer(mut redactor: Redactor, response: StreamedResponse) -> ProxiedAnswer {
    let StreamedResponse {
        status,
        headers,
        body,
    } = response;
    let clean = redact_headers(&mut redactor, headers);
    let (body, redactions) = match body {
        UpstreamBody::Whole(body) if redactor.is_clean(&body) => {
            (ProxiedBody::Whole(body), redactor.count())
        }
        UpstreamBody::Whole(body) => {
            let mut out = Vec::with_capacity(body.len());
            redactor.redact_all(&body, &mut out);
            (ProxiedBody::Whole(Bytes::from(out)), redactor.count())
        }
        UpstreamBody::Stream(inner) => {
            let count = redactor.count();
            (
                ProxiedBody::Stream(Box::new(RedactedStream {
                    inner,
                    redactor,
                    done: false,
                    pending: Bytes::new(),
                })),
                count,
            )
        }
    };
    ProxiedAnswer {
        status,
        headers: clean,
        body,
        redactions,
        signed: None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::storage::{Documents as _, EgressStore as _};
    use keyholder_protocol::wire::Collection;

    #[test]
    fn origins_and_patterns() {
        let o = |s: &str| origin_of(&Url::parse(s).unwrap()).unwrap();
        assert_eq!(
            o("https://API.GitHub.com/x?y"),
            "https://api.github.com:443"
        );
        assert_eq!(o("http://127.0.0.1:8080/"), "http://127.0.0.1:8080");
        assert_eq!(o("https://[::1]:9/"), "https://[::1]:9");
        assert!(entry_matches("*.github.com", "https://api.github.com:443"));
        assert!(!entry_matches("*.github.com", "https://github.com:443"));
        assert!(!entry_matches("*.github.com", "https://evilgithub.com:443"));
        assert!(entry_matches("github.com", "https://github.com:443"));
        assert!(entry_matches(
            "https://github.com:443",
            "https://github.com:443"
        ));
        assert!(!entry_matches(
            "https://github.com:443",
            "http://github.com:80"
        ));
        assert_eq!(
            normalize_allow_entry("https://Example.com").unwrap(),
            "https://example.com:443"
        );
        assert!(normalize_allow_entry("https://example.com/path").is_err());
        assert!(normalize_allow_entry("exa mple.com").is_err());
        assert_eq!(
            normalize_allow_entry("*.Example.com").unwrap(),
            "*.example.com"
        );
    }

    #[test]
    fn decisions() {
        let github = catalogue::provider_for("ghp_x");
        let mut p = EgressPolicy::default_for("s");
        assert_eq!(p.mode, EgressMode::Known);
        assert_eq!(
            p.decide("https://api.github.com:443", github, None),
            Decision::Allow
        );
        let Decision::Deny(message) = p.decide("https://a:443", github, None) else {
            panic!("known mode allowed an unknown origin");
        };
        assert!(
            message.contains("keyholder egress allow s https://a:443"),
            "{message}"
        );
        assert!(matches!(
            p.decide("https://api.github.com:443", None, None),
            Decision::Deny(_)
        ));
        p.allowlist.push("https://a:443".into());
        assert_eq!(p.decide("https://a:443", None, None), Decision::Allow);
        p.mode = EgressMode::Pinned;
        assert_eq!(p.decide("https://b:443", github, None), Decision::Pin);
        let pin = Some("https://b:443");
        assert_eq!(p.decide("https://b:443", github, pin), Decision::Allow);
        assert!(matches!(
            p.decide("https://c:443", github, pin),
            Decision::Deny(_)
        ));
        p.mode = EgressMode::Allowlist;
        assert!(matches!(
            p.decide("https://api.github.com:443", github, None),
            Decision::Deny(_)
        ));
        assert_eq!(p.decide("https://a:443", github, None), Decision::Allow);
        p.mode = EgressMode::Any;
        assert_eq!(p.decide("https://b:443", None, None), Decision::Allow);
        // Token endpoints: catalogue endpoints in known mode, never a pin.
        p.mode = EgressMode::Known;
        assert_eq!(
            p.decide_token_endpoint("https://github.com:443", github),
            Decision::Allow
        );
        assert!(matches!(
            p.decide_token_endpoint("https://ghe.example:443", github),
            Decision::Deny(_)
        ));
        p.mode = EgressMode::Pinned;
        assert!(matches!(
            p.decide_token_endpoint("https://b:443", None),
            Decision::Deny(_)
        ));
    }

    #[tokio::test]
    async fn pins_need_pinned_mode_and_a_credential_and_are_bounded() {
        use crate::storage::ChangeSets as _;
        let dir = tempfile::tempdir().unwrap();
        let storage = crate::storage::sqlite::SqliteStorage::open(dir.path()).unwrap();
        let claim = |origin: &'static str, credential: String| {
            let storage = &storage;
            async move {
                storage
                    .claim_pin("s", &credential, origin, 0, MAX_PINS_PER_SERVICE)
                    .await
                    .unwrap()
            }
        };
        // Not in pinned mode, or no credential: nothing is pinned.
        assert!(!claim("https://a:443", "v1:x".into()).await);
        let (change, _) = set_mode(&storage, "s", EgressMode::Pinned).await.unwrap();
        storage.apply(change).await.unwrap();
        assert!(!claim("https://a:443", "v1:x".into()).await);
        storage
            .put_document(Collection::Tokens, "s", "{}", 0)
            .await
            .unwrap();
        assert!(claim("https://a:443", "v1:x".into()).await);
        // The same credential keeps its pin; another origin is not it.
        assert!(!claim("https://b:443", "v1:x".into()).await);
        for i in 1..MAX_PINS_PER_SERVICE {
            assert!(claim("https://c:443", format!("v1:{i}")).await);
        }
        assert!(!claim("https://c:443", "v1:full".into()).await);
        let policy = load_policy(&storage, "s").await.unwrap();
        assert_eq!(policy.pins.len() as i64, MAX_PINS_PER_SERVICE);
        // Changing the mode or resetting forgets them.
        storage.apply(reset("s").0).await.unwrap();
        assert!(load_policy(&storage, "s").await.unwrap().pins.is_empty());
    }

    #[test]
    fn templates_refuse_cr_lf() {
        let req = UpstreamRequest {
            url: Some("https://api.example.com/".into()),
            method: None,
            headers: None,
            body: None,
        };
        let mut t = BTreeMap::new();
        t.insert(
            "Authorization".to_string(),
            "Bearer ${TOKEN}\r\nX: y".to_string(),
        );
        assert!(matches!(plan(req, t, None), Err(VaultError::Invalid(_))));
    }
}
