//! The wire error body `{"error","message"}` and the error codes with their HTTP status numbers.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A wire error code (PROTOCOL.md §3 plus Keyholder extensions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// `invalid_request` (400): malformed JSON, missing or invalid field.
    InvalidRequest,
    /// `auth_failed` (401): HMAC request signature checks failed.
    AuthFailed,
    /// `ticket_invalid` (401): the ticket is malformed, forged, replayed or out of scope.
    TicketInvalid,
    /// `ticket_expired` (401): the ticket's `exp` has passed.
    TicketExpired,
    /// `setup_required` (403): the keyholder is not bound yet.
    SetupRequired,
    /// `forbidden` (403): the caller may not use this endpoint.
    Forbidden,
    /// `egress_denied` (403, Keyholder extension): an upstream destination is not allowed.
    EgressDenied,
    /// `policy_denied` (403, Keyholder extension): a rule of the owner's custody policy refused
    /// the use; the message names the rule.
    PolicyDenied,
    /// `not_found` (404, Keyholder extension): unknown path.
    NotFound,
    /// `token_not_found` (404): no stored document for the service.
    TokenNotFound,
    /// `method_not_allowed` (405, Keyholder extension).
    MethodNotAllowed,
    /// `already_exists` (409): `mode:create` over an existing token.
    AlreadyExists,
    /// `stale_creation` (409, 2.4.0): the ticket's `cid` is not the stored token's `creationId`.
    StaleCreation,
    /// `code_expired` (410): unknown or expired bind code.
    CodeExpired,
    /// `code_used` (410): the bind code was already used.
    CodeUsed,
    /// `payload_too_large` (413, Keyholder extension).
    PayloadTooLarge,
    /// `rate_limited` (429, 2.4.0): too many requests from this client; sent with `Retry-After`.
    RateLimited,
    /// `not_totp` (400): the token is not of type TOTP.
    NotTotp,
    /// `corrupt_document` (422, Keyholder extension): the stored document (which the platform can
    /// write with `storage set`) is malformed or its fields do not decrypt. Not a 5xx: retrying
    /// cannot help, and the platform retries 5xx answers.
    CorruptDocument,
    /// `internal_error` (500).
    InternalError,
    /// `storage_unavailable` (503, Keyholder extension).
    StorageUnavailable,
    /// `sealed` (503, Keyholder extension): the data keys are not unlocked.
    Sealed,
    /// `upstream_error` (502): the proxied upstream call failed.
    UpstreamError,
    /// `provider_error` (502): the OAuth provider call failed.
    ProviderError,
    /// `upstream_timeout` (504).
    UpstreamTimeout,
    /// `provider_timeout` (504).
    ProviderTimeout,
}

impl ErrorCode {
    /// Every code, in declaration order.
    pub const ALL: &'static [ErrorCode] = &[
        ErrorCode::InvalidRequest,
        ErrorCode::AuthFailed,
        ErrorCode::TicketInvalid,
        ErrorCode::TicketExpired,
        ErrorCode::SetupRequired,
        ErrorCode::Forbidden,
        ErrorCode::EgressDenied,
        ErrorCode::PolicyDenied,
        ErrorCode::NotFound,
        ErrorCode::TokenNotFound,
        ErrorCode::MethodNotAllowed,
        ErrorCode::AlreadyExists,
        ErrorCode::StaleCreation,
        ErrorCode::CodeExpired,
        ErrorCode::CodeUsed,
        ErrorCode::PayloadTooLarge,
        ErrorCode::RateLimited,
        ErrorCode::NotTotp,
        ErrorCode::CorruptDocument,
        ErrorCode::InternalError,
        ErrorCode::StorageUnavailable,
        ErrorCode::Sealed,
        ErrorCode::UpstreamError,
        ErrorCode::ProviderError,
        ErrorCode::UpstreamTimeout,
        ErrorCode::ProviderTimeout,
    ];

    /// The exact wire string.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::AuthFailed => "auth_failed",
            ErrorCode::TicketInvalid => "ticket_invalid",
            ErrorCode::TicketExpired => "ticket_expired",
            ErrorCode::SetupRequired => "setup_required",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::EgressDenied => "egress_denied",
            ErrorCode::PolicyDenied => "policy_denied",
            ErrorCode::NotFound => "not_found",
            ErrorCode::TokenNotFound => "token_not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::AlreadyExists => "already_exists",
            ErrorCode::StaleCreation => "stale_creation",
            ErrorCode::CodeExpired => "code_expired",
            ErrorCode::CodeUsed => "code_used",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::NotTotp => "not_totp",
            ErrorCode::CorruptDocument => "corrupt_document",
            ErrorCode::InternalError => "internal_error",
            ErrorCode::StorageUnavailable => "storage_unavailable",
            ErrorCode::Sealed => "sealed",
            ErrorCode::UpstreamError => "upstream_error",
            ErrorCode::ProviderError => "provider_error",
            ErrorCode::UpstreamTimeout => "upstream_timeout",
            ErrorCode::ProviderTimeout => "provider_timeout",
        }
    }

    /// The HTTP status number that goes with the code.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::InvalidRequest | ErrorCode::NotTotp => 400,
            ErrorCode::AuthFailed | ErrorCode::TicketInvalid | ErrorCode::TicketExpired => 401,
            ErrorCode::SetupRequired
            | ErrorCode::Forbidden
            | ErrorCode::EgressDenied
            | ErrorCode::PolicyDenied => 403,
            ErrorCode::NotFound | ErrorCode::TokenNotFound => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::AlreadyExists | ErrorCode::StaleCreation => 409,
            ErrorCode::CodeExpired | ErrorCode::CodeUsed => 410,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::RateLimited => 429,
            ErrorCode::CorruptDocument => 422,
            ErrorCode::InternalError => 500,
            ErrorCode::UpstreamError | ErrorCode::ProviderError => 502,
            ErrorCode::StorageUnavailable | ErrorCode::Sealed => 503,
            ErrorCode::UpstreamTimeout | ErrorCode::ProviderTimeout => 504,
        }
    }

    /// Parse the exact wire string.
    pub fn parse(s: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.iter().copied().find(|c| c.as_str() == s)
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        ErrorCode::parse(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown error code {s:?}")))
    }
}

/// The wire error body: `{"error": "<code>", "message": "<text>"}`. Unknown fields are ignored on decode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error code string (kept as text so that unknown future codes still decode).
    pub error: String,
    /// Human-readable text; never internal details.
    pub message: String,
}

impl ErrorBody {
    /// A body for `code` with `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorBody {
            error: code.as_str().to_owned(),
            message: message.into(),
        }
    }

    /// The typed code, if it is one we know.
    pub fn code(&self) -> Option<ErrorCode> {
        ErrorCode::parse(&self.error)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips_and_has_a_status() {
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::parse(code.as_str()), Some(*code));
            let json = serde_json::to_string(code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            let back: ErrorCode = serde_json::from_str(&json).unwrap();
            assert_eq!(back, *code);
            assert!((400..600).contains(&code.http_status()));
        }
        assert_eq!(ErrorCode::ALL.len(), 26);
        assert_eq!(ErrorCode::parse("nope"), None);
    }

    #[test]
    fn documented_statuses() {
        let expected = [
            ("invalid_request", 400),
            ("auth_failed", 401),
            ("ticket_invalid", 401),
            ("ticket_expired", 401),
            ("setup_required", 403),
            ("forbidden", 403),
            ("token_not_found", 404),
            ("already_exists", 409),
            ("code_expired", 410),
            ("code_used", 410),
            ("internal_error", 500),
            ("upstream_error", 502),
            ("provider_error", 502),
            ("upstream_timeout", 504),
            ("provider_timeout", 504),
            ("not_totp", 400),
            ("egress_denied", 403),
            ("policy_denied", 403),
            ("not_found", 404),
            ("method_not_allowed", 405),
            ("payload_too_large", 413),
            ("storage_unavailable", 503),
            ("sealed", 503),
            ("stale_creation", 409),
            ("rate_limited", 429),
            ("corrupt_document", 422),
        ];
        for (s, status) in expected {
            assert_eq!(ErrorCode::parse(s).unwrap().http_status(), status, "{s}");
        }
    }

    #[test]
    fn error_body_wire_shape() {
        let body = ErrorBody::new(ErrorCode::TicketExpired, "Ticket expired");
        assert_eq!(
            serde_json::to_string(&body).unwrap(),
            r#"{"error":"ticket_expired","message":"Ticket expired"}"#
        );
        let decoded: ErrorBody =
            serde_json::from_str(r#"{"error":"auth_failed","message":"x","requestId":"r1"}"#)
                .unwrap();
        assert_eq!(decoded.code(), Some(ErrorCode::AuthFailed));
        let unknown: ErrorBody =
            serde_json::from_str(r#"{"error":"future","message":""}"#).unwrap();
        assert_eq!(unknown.code(), None);
    }
}
