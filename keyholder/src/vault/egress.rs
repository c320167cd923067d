//! The owner's egress policy per service (`pinned`, `allowlist`, `any`, and the pinned OAuth token
//! URL) and the proxied call that runs under it: policy first, credential second, send last.

use std::collections::BTreeMap;

use base64::Engine as _;
use bytes::Bytes;
use keyholder_protocol::wire::UpstreamRequest;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::Method;
use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;
use url::Url;
use zeroize::Zeroizing;

use super::{from_store, into_store, Vault, VaultError};
use tracing::Instrument as _;

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
use crate::upstream::{self, OutboundRequest, Upstream, UpstreamError, UpstreamResponse};

/// The placeholder replaced by the credential in header templates.
pub const TOKEN_PLACEHOLDER: &str = "${TOKEN}";

/// How a service's credential may travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EgressMode {
    /// The first successful call pins the origin; any other origin is refused (the default).
    Pinned,
    /// Only the owner's listed origins or host patterns.
    Allowlist,
    /// Anywhere the SSRF guard allows.
    Any,
}

impl EgressMode {
    fn as_str(self) -> &'static str {
        match self {
            EgressMode::Pinned => "pinned",
            EgressMode::Allowlist => "allowlist",
            EgressMode::Any => "any",
        }
    }

    fn parse(s: &str) -> Result<EgressMode, VaultError> {
        match s {
            "pinned" => Ok(EgressMode::Pinned),
            "allowlist" => Ok(EgressMode::Allowlist),
            "any" => Ok(EgressMode::Any),
            other => Err(VaultError::Corrupt(format!("egress mode '{other}'"))),
        }
    }
}

/// A service's egress policy as stored (a service without a row has the default: pinned, no pin).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EgressPolicy {
    /// The service.
    pub service: String,
    /// The mode.
    pub mode: EgressMode,
    /// Allowed origins (`scheme://host:port`) and host patterns (`host`, `*.suffix`).
    pub allowlist: Vec<String>,
    /// The pinned origin, once the first call succeeded.
    pub pinned_origin: Option<String>,
    /// The pinned OAuth token URL (refreshes with the platform's client configuration).
    pub token_url: Option<String>,
}

/// What the policy says about one origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Send.
    Allow,
    /// Send, and pin this origin (pinned mode, nothing pinned yet).
    Pin,
    /// Refuse; the text says why (no secret in it).
    Deny(String),
}

impl EgressPolicy {
    /// The default policy of a service.
    pub fn default_for(service: &str) -> EgressPolicy {
        EgressPolicy {
            service: service.to_string(),
            mode: EgressMode::Pinned,
            allowlist: Vec::new(),
            pinned_origin: None,
            token_url: None,
        }
    }

    /// Judges a normalized origin (see [`origin_of`]).
    pub fn decide(&self, origin: &str) -> Decision {
        match self.mode {
            EgressMode::Any => Decision::Allow,
            EgressMode::Pinned => match &self.pinned_origin {
                None => Decision::Pin,
                Some(pinned) if pinned == origin => Decision::Allow,
                Some(_) => Decision::Deny(format!(
                    "{origin} is not the origin pinned for this service"
                )),
            },
            EgressMode::Allowlist => {
                if self.allowlist.iter().any(|e| entry_matches(e, origin)) {
                    Decision::Allow
                } else {
                    Decision::Deny(format!("{origin} is not on this service's allowlist"))
                }
            }
        }
    }
}

/// `scheme://host:port` of a URL, with the scheme's default port written out.
pub fn origin_of(url: &Url) -> Result<String, VaultError> {
    let host = url
        .host_str()
        .ok_or_else(|| VaultError::Invalid("the upstream URL has no host".into()))?;
    let port = url
        .port_or_known_default()
        .ok_or_else(|| VaultError::Invalid("the upstream URL has no port".into()))?;
    Ok(format!(
        "{}://{}:{}",
        url.scheme(),
        host.trim_end_matches('.').to_ascii_lowercase(),
        port
    ))
}

fn host_of(origin: &str) -> &str {
    let rest = origin.split_once("://").map(|(_, r)| r).unwrap_or(origin);
    match rest.rfind(':') {
        Some(i) if !rest.ends_with(']') => &rest[..i],
        _ => rest,
    }
}

fn entry_matches(entry: &str, origin: &str) -> bool {
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

/// Reads a service's policy (the default when none is stored).
pub fn load_policy(conn: &Connection, service: &str) -> Result<EgressPolicy, VaultError> {
    let row = conn
        .query_row(
            "SELECT mode, allowlist, pinned_origin, token_url FROM egress_policies WHERE service = ?1",
            [service],
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<String>>(2)?,
                    r.get::<_, Option<String>>(3)?,
                ))
            },
        )
        .optional()?;
    let Some((mode, allowlist, pinned_origin, token_url)) = row else {
        return Ok(EgressPolicy::default_for(service));
    };
    Ok(EgressPolicy {
        service: service.to_string(),
        mode: EgressMode::parse(&mode)?,
        allowlist: serde_json::from_str(&allowlist)
            .map_err(|e| VaultError::Corrupt(format!("egress allowlist: {e}")))?,
        pinned_origin,
        token_url,
    })
}

fn ensure_row(conn: &Connection, service: &str) -> Result<(), VaultError> {
    conn.execute(
        "INSERT INTO egress_policies(service, updated_at) VALUES (?1, ?2) ON CONFLICT(service) DO NOTHING",
        params![service, crate::clock::now_unix()],
    )?;
    Ok(())
}

fn save_policy(conn: &Connection, policy: &EgressPolicy) -> Result<(), VaultError> {
    ensure_row(conn, &policy.service)?;
    let allowlist =
        serde_json::to_string(&policy.allowlist).map_err(|e| VaultError::Corrupt(e.to_string()))?;
    conn.execute(
        "UPDATE egress_policies SET mode = ?2, allowlist = ?3, pinned_origin = ?4, token_url = ?5, updated_at = ?6
         WHERE service = ?1",
        params![
            policy.service,
            policy.mode.as_str(),
            allowlist,
            policy.pinned_origin,
            policy.token_url,
            crate::clock::now_unix()
        ],
    )?;
    Ok(())
}

/// `keyholder egress allow`: adds entries and switches to `allowlist` (keeping a pinned origin on
/// the list, so allowing one more origin does not cut off the current one), or switches to `any`.
pub fn allow(
    conn: &Connection,
    service: &str,
    entries: &[String],
    any: bool,
) -> Result<EgressPolicy, VaultError> {
    let mut policy = load_policy(conn, service)?;
    if any {
        policy.mode = EgressMode::Any;
    } else {
        if entries.is_empty() {
            return Err(VaultError::Invalid(
                "name at least one origin or host pattern, or pass --any".into(),
            ));
        }
        if policy.mode == EgressMode::Pinned {
            if let Some(pinned) = policy.pinned_origin.clone() {
                policy.allowlist.push(pinned);
            }
        }
        for entry in entries {
            policy.allowlist.push(normalize_allow_entry(entry)?);
        }
        policy.allowlist.sort();
        policy.allowlist.dedup();
        policy.mode = EgressMode::Allowlist;
    }
    save_policy(conn, &policy)?;
    Ok(policy)
}

/// `keyholder egress reset`: back to the default (pinned, nothing pinned, no token URL pinned).
pub fn reset(conn: &Connection, service: &str) -> Result<EgressPolicy, VaultError> {
    conn.execute("DELETE FROM egress_policies WHERE service = ?1", [service])?;
    Ok(EgressPolicy::default_for(service))
}

/// Pins `origin` if nothing is pinned; true when `origin` is now the pin (whoever set it).
fn claim_pin(conn: &Connection, service: &str, origin: &str) -> Result<bool, VaultError> {
    ensure_row(conn, service)?;
    conn.execute(
        "UPDATE egress_policies SET pinned_origin = ?2, updated_at = ?3
         WHERE service = ?1 AND mode = 'pinned' AND pinned_origin IS NULL",
        params![service, origin, crate::clock::now_unix()],
    )?;
    let policy = load_policy(conn, service)?;
    Ok(policy.decide(origin) == Decision::Allow)
}

/// Pins the token URL used with the platform's OAuth client; refuses a different one.
fn claim_token_url(conn: &Connection, service: &str, token_url: &str) -> Result<bool, VaultError> {
    ensure_row(conn, service)?;
    let claimed = conn.execute(
        "UPDATE egress_policies SET token_url = ?2, updated_at = ?3 WHERE service = ?1 AND token_url IS NULL",
        params![service, token_url, crate::clock::now_unix()],
    )? > 0;
    let pinned: Option<String> = conn.query_row(
        "SELECT token_url FROM egress_policies WHERE service = ?1",
        [service],
        |r| r.get(0),
    )?;
    if pinned.as_deref() == Some(token_url) {
        Ok(claimed)
    } else {
        Err(VaultError::EgressDenied(
            "the token URL differs from the one pinned for this service".into(),
        ))
    }
}

/// Which pinned value a failed first call releases.
#[derive(Debug, Clone, Copy)]
pub(crate) enum PinKind {
    Origin,
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
) -> Result<ProxyPlan, VaultError> {
    let url_text = request
        .url
        .filter(|u| !u.is_empty())
        .ok_or_else(|| VaultError::Invalid("missing 'upstream.url'".into()))?;
    let url = Url::parse(&url_text)
        .map_err(|_| VaultError::Invalid("'upstream.url' is not an absolute URL".into()))?;
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

impl Vault {
    /// The egress policy of `service`, read from the database on every call (the owner's CLI changes
    /// it while the server runs, so it takes effect at once).
    pub async fn egress_policy(&self, service: &str) -> Result<EgressPolicy, VaultError> {
        if let Some(policy) = self.egress_cache.get(service) {
            return Ok(policy);
        }
        let epoch = self.egress_cache.epoch();
        let owned = service.to_string();
        let policy = self
            .store()
            .read(move |conn| load_policy(conn, &owned).map_err(into_store))
            .await
            .map_err(from_store)?;
        self.egress_cache.put(service, policy.clone(), epoch);
        Ok(policy)
    }

    async fn claim_pin(&self, service: &str, origin: &str) -> Result<bool, VaultError> {
        let (owned, origin) = (service.to_string(), origin.to_string());
        let claimed = self
            .store()
            .write(move |conn| claim_pin(conn, &owned, &origin).map_err(into_store))
            .await
            .map_err(from_store);
        self.egress_cache.invalidate(service);
        claimed
    }

    pub(crate) async fn claim_token_url(
        &self,
        service: &str,
        token_url: &str,
    ) -> Result<bool, VaultError> {
        let (owned, url) = (service.to_string(), token_url.to_string());
        let claimed = self
            .store()
            .write(move |conn| claim_token_url(conn, &owned, &url).map_err(into_store))
            .await
            .map_err(from_store);
        self.egress_cache.invalidate(service);
        claimed
    }

    /// Undoes a pin set by a call that then failed without an answer ("the first *successful*
    /// call pins"); a pin changed meanwhile is left alone.
    pub(crate) async fn release_pin(&self, kind: PinKind, service: &str, value: &str) {
        let (owned, value) = (service.to_string(), value.to_string());
        let sql = match kind {
            PinKind::Origin => {
                "UPDATE egress_policies SET pinned_origin = NULL WHERE service = ?1 AND pinned_origin = ?2"
            }
            PinKind::TokenUrl => {
                "UPDATE egress_policies SET token_url = NULL WHERE service = ?1 AND token_url = ?2"
            }
        };
        let result = self
            .store()
            .write(move |conn| Ok(conn.execute(sql, params![owned, value])?))
            .await;
        self.egress_cache.invalidate(service);
        if let Err(err) = result {
            tracing::warn!(error = %err, "could not release an egress pin");
        }
    }

    /// `/v1/proxy`: validates the call, applies the SSRF guard and the service's egress policy, only
    /// then opens (or mints) the credential, fills the header templates, and sends.
    #[tracing::instrument(skip_all, fields(service = %service))]
    pub async fn proxy_call(
        &self,
        upstream: &Upstream,
        service: &str,
        request: UpstreamRequest,
        templates: BTreeMap<String, String>,
        request_id: &str,
    ) -> Result<UpstreamResponse, VaultError> {
        let plan = plan(request, templates)?;
        let host = plan.url.host_str().unwrap_or("").to_string();
        let deny = |reason: String| {
            tracing::warn!(request_id, service, host = %host, reason = %reason, "egress denied");
            VaultError::EgressDenied(reason)
        };
        // The guard first: schemes without a host (file:) are refused here, not as malformed.
        upstream
            .check_url(&plan.url)
            .map_err(|e| deny(e.to_string()))?;
        let origin = origin_of(&plan.url)?;
        let policy = self
            .egress_policy(service)
            .instrument(tracing::debug_span!(target: crate::telemetry::TARGET, "egress.policy"))
            .await?;
        let decision = policy.decide(&origin);
        if let Decision::Deny(reason) = &decision {
            return Err(deny(reason.clone()));
        }
        let token = self.access_token(upstream, service).await?;
        let mut headers = plan.headers;
        for (name, template) in &plan.templates {
            let value = Zeroizing::new(template.replace(TOKEN_PLACEHOLDER, &token));
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
        let claimed = if decision == Decision::Pin {
            if !self.claim_pin(service, &origin).await? {
                return Err(deny(format!(
                    "{origin} is not the origin pinned for this service"
                )));
            }
            tracing::info!(request_id, origin = %origin, "egress origin pinned");
            true
        } else {
            false
        };
        let call = tracing::debug_span!(
            target: crate::telemetry::TARGET,
            "upstream.call",
            otel.kind = "client",
            http.request.method = %plan.method,
            server.address = %host,
        );
        call.in_scope(|| crate::telemetry::inject_current(&mut headers));
        let result = upstream
            .send(OutboundRequest {
                method: plan.method,
                url: plan.url,
                headers,
                body: plan.body,
            })
            .instrument(call)
            .await;
        match result {
            Ok(response) => Ok(response),
            Err(err) => {
                if claimed {
                    self.release_pin(PinKind::Origin, service, &origin).await;
                }
                match err {
                    UpstreamError::Refused(refused) => Err(deny(refused.to_string())),
                    other => {
                        tracing::warn!(request_id, error = %other, "upstream call failed");
                        Err(VaultError::Upstream(other))
                    }
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

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
        let mut p = EgressPolicy::default_for("s");
        assert_eq!(p.decide("https://a:443"), Decision::Pin);
        p.pinned_origin = Some("https://a:443".into());
        assert_eq!(p.decide("https://a:443"), Decision::Allow);
        assert!(matches!(p.decide("https://b:443"), Decision::Deny(_)));
        p.mode = EgressMode::Any;
        assert_eq!(p.decide("https://b:443"), Decision::Allow);
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
        assert!(matches!(plan(req, t), Err(VaultError::Invalid(_))));
    }
}
