//! Request and response bodies of every endpoint (PROTOCOL.md §3), with the exact camelCase JSON names.
//! Decoding tolerates unknown fields; encoding skips `None`. Types that carry secrets redact them in `Debug`.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::response_sig::IdentityDocument;

/// `Some(<redacted>)` / `None` for a secret optional field in `Debug` output.
struct Redacted<'a, T>(&'a Option<T>);

impl<T> fmt::Debug for Redacted<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "Some(<redacted>)"
        } else {
            "None"
        })
    }
}

/// `POST /v1/exchange` request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExchangeRequest {
    /// The one-time bind code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

/// `POST /v1/exchange` response: carries the HMAC secret.
#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExchangeResponse {
    /// Standard base64 of the 32-byte HMAC secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hmac_secret: Option<String>,
    /// The webhook's id.
    pub webhook_id: String,
    /// Protocol version.
    pub version: String,
    /// Capability names.
    pub capabilities: Vec<String>,
    /// The response-signing identity (Keyholder extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_key: Option<IdentityDocument>,
}

impl fmt::Debug for ExchangeResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExchangeResponse")
            .field("hmac_secret", &Redacted(&self.hmac_secret))
            .field("webhook_id", &self.webhook_id)
            .field("version", &self.version)
            .field("capabilities", &self.capabilities)
            .field("signing_key", &self.signing_key)
            .finish()
    }
}

/// `/v1/health` response.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthResponse {
    /// `healthy`.
    pub status: String,
    /// Protocol version.
    pub version: String,
    /// Whether the keyholder is bound.
    pub key_configured: bool,
    /// Capability names.
    pub capabilities: Vec<String>,
    /// Uptime in seconds.
    pub uptime: u64,
    /// Number of stored tokens.
    pub token_count: u64,
    /// Whether the data keys are locked (Keyholder extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed: Option<bool>,
    /// The server's own version, such as `0.1.0` (Keyholder extension; `version` is the protocol's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyholder_version: Option<String>,
}

/// `/v1/storage` operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StorageOperation {
    /// `get`.
    Get,
    /// `set`.
    Set,
    /// `delete`.
    Delete,
    /// `list`.
    List,
    /// `list_batch`.
    ListBatch,
}

/// A storage collection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Collection {
    /// `tokens`.
    Tokens,
    /// `proxy_configs`.
    ProxyConfigs,
    /// `audit`.
    Audit,
    /// `vault_config`.
    VaultConfig,
}

impl Collection {
    /// Every collection.
    pub const ALL: &'static [Collection] = &[
        Collection::Tokens,
        Collection::ProxyConfigs,
        Collection::Audit,
        Collection::VaultConfig,
    ];

    /// The exact wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Collection::Tokens => "tokens",
            Collection::ProxyConfigs => "proxy_configs",
            Collection::Audit => "audit",
            Collection::VaultConfig => "vault_config",
        }
    }

    /// Parse the exact wire name.
    pub fn parse(s: &str) -> Option<Self> {
        Collection::ALL.iter().copied().find(|c| c.as_str() == s)
    }
}

/// `POST /v1/storage` request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StorageRequest {
    /// The operation.
    pub operation: StorageOperation,
    /// Collection name (validated by the server with [`Collection::parse`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collection: Option<String>,
    /// Collection names for `list_batch`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collections: Option<Vec<String>>,
    /// Document key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Document for `set`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    /// List options.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<ListOptions>,
    /// The platform's request id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// Options of `list` and `list_batch`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListOptions {
    /// Equality filters on meta (or data for audit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filters: Option<Map<String, Value>>,
    /// Cursor lower bound (inclusive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Value>,
    /// Audit: timestamp < after; others: key > after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<Value>,
    /// Page size (> 0 truncates and adds pagination).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<i64>,
}

/// Pagination of a truncated list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Pagination {
    /// More items follow.
    pub has_more: bool,
    /// Cursor for the next page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<Value>,
    /// Item count after filters and `since`.
    pub total_count: u64,
}

/// `list` response.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListResponse {
    /// `{"key","meta"}` items (plus `data` for audit).
    pub items: Vec<Value>,
    /// Present when `limit` truncated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pagination: Option<Pagination>,
    /// Echoed request id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// One collection's page in a `list_batch` response.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListPage {
    /// Items.
    pub items: Vec<Value>,
    /// Present when `limit` truncated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pagination: Option<Pagination>,
}

/// `list_batch` response.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListBatchResponse {
    /// Pages by collection name.
    pub results: BTreeMap<String, ListPage>,
    /// Echoed request id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// `get` response: `data` is the stored document or `null` (always serialized).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GetResponse {
    /// The document or `null`.
    #[serde(default)]
    pub data: Value,
    /// Echoed request id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// `{"status": ..}` response (`set`, `delete`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusResponse {
    /// `ok`.
    pub status: String,
    /// Echoed request id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// `/v1/credential` request (query string or JSON body).
#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CredentialRequest {
    /// The ticket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ticket: Option<String>,
    /// The service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
}

impl fmt::Debug for CredentialRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CredentialRequest")
            .field("ticket", &Redacted(&self.ticket))
            .field("service", &self.service)
            .finish()
    }
}

/// `POST /v1/store` request.
#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoreRequest {
    /// The `store` ticket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ticket: Option<String>,
    /// The service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The token fields (secrets among them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_data: Option<Map<String, Value>>,
}

impl fmt::Debug for StoreRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreRequest")
            .field("ticket", &Redacted(&self.ticket))
            .field("service", &self.service)
            .field("token_data", &Redacted(&self.token_data))
            .finish()
    }
}

/// `POST /v1/store` response.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoreResponse {
    /// `stored`.
    pub status: String,
    /// The service.
    pub service: String,
    /// The stored meta (never a secret).
    pub meta: Map<String, Value>,
}

/// `POST /v1/proxy` request.
#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyRequest {
    /// The `proxy` ticket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ticket: Option<String>,
    /// The service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The upstream call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<UpstreamRequest>,
    /// Header templates with `${TOKEN}` placeholders.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header_templates: Option<BTreeMap<String, String>>,
    /// The platform's request id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

impl fmt::Debug for ProxyRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxyRequest")
            .field("ticket", &Redacted(&self.ticket))
            .field("service", &self.service)
            .field("upstream", &self.upstream)
            .field("header_templates", &self.header_templates)
            .field("request_id", &self.request_id)
            .finish()
    }
}

/// The upstream part of a proxy request.
#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamRequest {
    /// Upstream URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// HTTP method (default GET).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Extra headers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<BTreeMap<String, String>>,
    /// Standard base64 of the body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
}

impl fmt::Debug for UpstreamRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Header values and the body may carry credentials of their own: print names and sizes only.
        let header_names: Option<Vec<&String>> = self.headers.as_ref().map(|h| h.keys().collect());
        f.debug_struct("UpstreamRequest")
            .field("url", &self.url)
            .field("method", &self.method)
            .field("headers", &header_names)
            .field("body_len", &self.body.as_ref().map(String::len))
            .finish()
    }
}

/// Refresh hint sent with `/v1/refresh-notify`.
#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RefreshHint {
    /// Provider name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// Token endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_url: Option<String>,
    /// OAuth client id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// OAuth client secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<String>,
}

impl fmt::Debug for RefreshHint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefreshHint")
            .field("provider", &self.provider)
            .field("token_url", &self.token_url)
            .field("client_id", &self.client_id)
            .field("client_secret", &Redacted(&self.client_secret))
            .finish()
    }
}

/// `POST /v1/refresh-notify` request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RefreshNotifyRequest {
    /// The platform's request id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Why a refresh is asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Provider details.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_hint: Option<RefreshHint>,
}

/// `POST /v1/refresh-notify` response.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RefreshNotifyResponse {
    /// Echoed request id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// `refreshed`, `acknowledged`, `no_token`, `no_refresh_token` or `refresh_failed`.
    pub status: String,
    /// New expiry, ISO 8601 (with `refreshed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_expires_at: Option<String>,
    /// Failure text (with `refresh_failed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// New tokens in a `/v1/refresh` `update`.
#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RefreshTokens {
    /// New access token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_token: Option<String>,
    /// New refresh token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
    /// New expiry (ms number or ISO string).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiry_time: Option<Value>,
}

impl fmt::Debug for RefreshTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefreshTokens")
            .field("access_token", &Redacted(&self.access_token))
            .field("refresh_token", &Redacted(&self.refresh_token))
            .field("expiry_time", &self.expiry_time)
            .finish()
    }
}

/// `POST /v1/refresh` request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RefreshRequest {
    /// The platform's request id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// `get` or `update`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// The service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// New tokens (`update`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<RefreshTokens>,
}

/// `/v1/refresh` `get` response: carries the refresh token.
#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RefreshGetResponse {
    /// `ok`, `no_token` or `no_refresh_token`.
    pub status: String,
    /// The refresh token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
    /// The token's meta.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<Map<String, Value>>,
    /// Echoed request id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

impl fmt::Debug for RefreshGetResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefreshGetResponse")
            .field("status", &self.status)
            .field("refresh_token", &Redacted(&self.refresh_token))
            .field("meta", &self.meta)
            .field("request_id", &self.request_id)
            .finish()
    }
}

/// `/v1/refresh` `update` response (tokens never echoed).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RefreshUpdateResponse {
    /// `updated`.
    pub status: String,
    /// New expiry, ISO 8601.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_expires_at: Option<String>,
    /// Echoed request id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// `/v1/totp-code` response.
#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TotpCodeResponse {
    /// The current code.
    pub code: String,
    /// Seconds left in the period.
    pub remaining_seconds: u64,
    /// Period in seconds.
    pub period: u64,
    /// Number of digits.
    pub digits: u32,
}

impl fmt::Debug for TotpCodeResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TotpCodeResponse")
            .field("code", &"<redacted>")
            .field("remaining_seconds", &self.remaining_seconds)
            .field("period", &self.period)
            .field("digits", &self.digits)
            .finish()
    }
}

/// Counts of a `totpUri` sweep.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TotpMigrationCounts {
    /// Token documents examined.
    pub scanned: u64,
    /// Documents rewritten with the seed sealed and the link removed.
    pub migrated: u64,
    /// Documents whose link could not be sealed.
    pub failed: u64,
}

/// `POST /v1/admin/migrate` response (2.4.0): counts only.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdminMigrateResponse {
    /// `ok`.
    pub status: String,
    /// The `totpUri` sweep.
    pub totp: TotpMigrationCounts,
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn exact_names_and_skips() {
        let r = ExchangeResponse {
            hmac_secret: Some("c2VjcmV0".into()),
            webhook_id: "wh".into(),
            version: "2.2.0".into(),
            capabilities: vec!["storage".into()],
            signing_key: None,
        };
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            json!({"hmacSecret":"c2VjcmV0","webhookId":"wh","version":"2.2.0","capabilities":["storage"]})
        );
        assert!(!format!("{r:?}").contains("c2VjcmV0"));

        let h = HealthResponse {
            status: "healthy".into(),
            version: "2.2.0".into(),
            key_configured: true,
            capabilities: vec![],
            uptime: 3,
            token_count: 1,
            sealed: None,
            keyholder_version: None,
        };
        assert_eq!(
            serde_json::to_value(&h).unwrap(),
            json!({"status":"healthy","version":"2.2.0","keyConfigured":true,"capabilities":[],"uptime":3,"tokenCount":1})
        );

        let g = GetResponse {
            data: Value::Null,
            request_id: None,
        };
        assert_eq!(serde_json::to_string(&g).unwrap(), r#"{"data":null}"#);

        let p = Pagination {
            has_more: true,
            next_cursor: Some(json!("k")),
            total_count: 5,
        };
        assert_eq!(
            serde_json::to_value(&p).unwrap(),
            json!({"hasMore":true,"nextCursor":"k","totalCount":5})
        );
    }

    #[test]
    fn decode_tolerates_unknown_fields() {
        let req: StorageRequest = serde_json::from_str(
            r#"{"operation":"list_batch","collections":["tokens","audit"],"options":{"limit":2,"since":"a"},"requestId":"r","extra":1}"#,
        )
        .unwrap();
        assert_eq!(req.operation, StorageOperation::ListBatch);
        assert_eq!(req.options.unwrap().limit, Some(2));
        assert!(serde_json::from_str::<StorageRequest>(r#"{"operation":"drop"}"#).is_err());

        let store: StoreRequest = serde_json::from_str(
            r#"{"ticket":"t.s","service":"github","tokenData":{"accessToken":"gho_secret"},"x":true}"#,
        )
        .unwrap();
        let dbg = format!("{store:?}");
        assert!(!dbg.contains("gho_secret") && !dbg.contains("t.s"));

        let hint: RefreshNotifyRequest = serde_json::from_str(
            r#"{"requestId":"r","service":"g","reason":"expired","refreshHint":{"provider":"github","tokenUrl":"u","clientId":"c","clientSecret":"cs_secret"}}"#,
        )
        .unwrap();
        assert!(!format!("{hint:?}").contains("cs_secret"));

        let refresh: RefreshRequest = serde_json::from_str(
            r#"{"action":"update","service":"g","tokens":{"accessToken":"at_secret","expiryTime":1}}"#,
        )
        .unwrap();
        assert!(!format!("{refresh:?}").contains("at_secret"));

        let proxy: ProxyRequest = serde_json::from_str(
            r#"{"ticket":"tk_secret","service":"g","upstream":{"url":"https://api","headers":{"X-Key":"hv_secret"},"body":"e30="},"headerTemplates":{"Authorization":"Bearer ${TOKEN}"}}"#,
        )
        .unwrap();
        let dbg = format!("{proxy:?}");
        assert!(!dbg.contains("tk_secret") && !dbg.contains("hv_secret"));
    }

    #[test]
    fn collections() {
        for c in Collection::ALL {
            assert_eq!(Collection::parse(c.as_str()), Some(*c));
            assert_eq!(serde_json::to_value(c).unwrap(), json!(c.as_str()));
        }
        assert_eq!(Collection::parse("users"), None);
    }
}
