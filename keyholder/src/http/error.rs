//! The one API error type: every refusal and failure maps here to a status and a wire code, in
//! one exhaustive match. Internal details go to the log, never to the caller.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use keyholder_protocol::envelope::EnvelopeError;
use keyholder_protocol::signing::RequestAuthError;
use keyholder_protocol::{ConstraintError, ErrorBody, ErrorCode, TicketError};

use crate::storage::StorageError;
use crate::upstream::UpstreamError;
use crate::vault::VaultError;

/// An error answered to an HTTP caller.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed; the text says what is wrong (no secret in it).
    #[error("{0}")]
    InvalidRequest(String),
    /// The body exceeds the endpoint's limit.
    #[error("request body too large (limit {0} bytes)")]
    PayloadTooLarge(usize),
    /// Platform signature checks failed.
    #[error("{0}")]
    Auth(#[from] RequestAuthError),
    /// Ed25519 envelope checks failed (asymmetric binding).
    #[error("{0}")]
    Envelope(#[from] EnvelopeError),
    /// The envelope's nonce was used before.
    #[error("envelope nonce already used")]
    EnvelopeReplayed,
    /// The request authenticates with the other scheme than the binding's (HMAC headers in an
    /// asymmetric binding, or an envelope in an HMAC binding).
    #[error("request signed with the wrong scheme for this binding")]
    WrongScheme,
    /// The ticket is of the other scheme than the binding's (a platform ticket in an asymmetric
    /// binding, or a `kh2` ticket in an HMAC binding).
    #[error("ticket of the wrong scheme for this binding")]
    TicketWrongScheme,
    /// The platform request id was seen before.
    #[error("duplicate request id")]
    DuplicateRequestId,
    /// The body's `requestId` differs from the request id header.
    #[error("body requestId differs from the request id header")]
    RequestIdMismatch,
    /// The same signed bytes were accepted before (with another request id, or on another endpoint).
    #[error("signed request already used")]
    SignatureReplayed,
    /// The platform request id header is missing or malformed.
    #[error("missing or malformed request id")]
    BadRequestId,
    /// Ticket checks failed.
    #[error("{0}")]
    Ticket(#[from] TicketError),
    /// The ticket's nonce was used before.
    #[error("ticket already used")]
    TicketReplayed,
    /// Not bound to a platform yet.
    #[error("keyholder is not bound to a platform yet")]
    SetupRequired,
    /// Refused by a network rule (platform address on an agent endpoint).
    #[error("{0}")]
    Forbidden(&'static str),
    /// No route.
    #[error("no such endpoint")]
    NotFound,
    /// Route exists, method does not.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// A ticket's `cid`/`mode` constraint refused the request (2.4.0).
    #[error("{0}")]
    Constraint(#[from] ConstraintError),
    /// Too many requests from this client address; try again after this many seconds.
    #[error("too many requests")]
    RateLimited {
        /// Seconds until the next request is accepted (the `Retry-After` header).
        retry_after_secs: u64,
    },
    /// A rule of the owner's custody policy refused the use (the text names policy and rule).
    #[error("{0}")]
    PolicyDenied(String),
    /// A rate or usage cap of the owner's custody policy refused the use for now.
    #[error("{message}")]
    PolicyLimited {
        /// Names the policy and the cap.
        message: String,
        /// Seconds until a retry can succeed (the `Retry-After` header).
        retry_after_secs: u64,
    },
    /// A domain error.
    #[error(transparent)]
    Vault(#[from] VaultError),
}

impl From<StorageError> for ApiError {
    fn from(err: StorageError) -> Self {
        ApiError::Vault(VaultError::Store(err))
    }
}

impl ApiError {
    /// Whether the binding held in memory may be what refused this request: not bound, a
    /// signature of the other scheme, or one that does not verify with the platform's secret or
    /// keys. On a shared database another replica may have bound or rebound a moment ago.
    pub fn may_be_stale_binding(&self) -> bool {
        matches!(
            self,
            ApiError::SetupRequired
                | ApiError::WrongScheme
                | ApiError::TicketWrongScheme
                | ApiError::Auth(RequestAuthError::BadSignature)
                | ApiError::Envelope(EnvelopeError::BadSignature | EnvelopeError::UnknownKey)
                | ApiError::Ticket(TicketError::BadSignature)
        )
    }

    /// Wire code of this error (one exhaustive match).
    pub fn code(&self) -> ErrorCode {
        match self {
            ApiError::InvalidRequest(_) => ErrorCode::InvalidRequest,
            ApiError::PayloadTooLarge(_) => ErrorCode::PayloadTooLarge,
            ApiError::Auth(_)
            | ApiError::Envelope(_)
            | ApiError::EnvelopeReplayed
            | ApiError::WrongScheme
            | ApiError::DuplicateRequestId
            | ApiError::RequestIdMismatch
            | ApiError::SignatureReplayed
            | ApiError::BadRequestId => ErrorCode::AuthFailed,
            ApiError::Ticket(err) => err.error_code(),
            ApiError::TicketReplayed | ApiError::TicketWrongScheme => ErrorCode::TicketInvalid,
            ApiError::SetupRequired => ErrorCode::SetupRequired,
            ApiError::Forbidden(_) => ErrorCode::Forbidden,
            ApiError::NotFound => ErrorCode::NotFound,
            ApiError::MethodNotAllowed => ErrorCode::MethodNotAllowed,
            ApiError::Constraint(err) => err.error_code(),
            ApiError::RateLimited { .. } | ApiError::PolicyLimited { .. } => ErrorCode::RateLimited,
            ApiError::PolicyDenied(_) => ErrorCode::PolicyDenied,
            ApiError::Vault(err) => match err {
                VaultError::Store(_) => ErrorCode::StorageUnavailable,
                VaultError::Crypto
                | VaultError::WrongMasterKey
                | VaultError::MasterKeyMissing(_)
                | VaultError::KeyFile(..)
                | VaultError::Pkcs11(_)
                | VaultError::Corrupt(_)
                | VaultError::Undecryptable
                | VaultError::KeyRingChanged => ErrorCode::InternalError,
                VaultError::TokenNotFound => ErrorCode::TokenNotFound,
                VaultError::AlreadyExists => ErrorCode::AlreadyExists,
                VaultError::StaleCreation => ErrorCode::StaleCreation,
                VaultError::Invalid(_) => ErrorCode::InvalidRequest,
                VaultError::NotTotp => ErrorCode::NotTotp,
                VaultError::CorruptDocument => ErrorCode::CorruptDocument,
                VaultError::CodeExpired => ErrorCode::CodeExpired,
                VaultError::CodeUsed => ErrorCode::CodeUsed,
                VaultError::AlreadyBound => ErrorCode::Forbidden,
                VaultError::Sealed => ErrorCode::Sealed,
                VaultError::EgressDenied(_) => ErrorCode::EgressDenied,
                VaultError::Upstream(e) => match e {
                    UpstreamError::Refused(_) => ErrorCode::EgressDenied,
                    UpstreamError::Timeout => ErrorCode::UpstreamTimeout,
                    UpstreamError::Failed(_) | UpstreamError::TooLarge(_) => {
                        ErrorCode::UpstreamError
                    }
                },
                VaultError::Provider(e) => match e {
                    UpstreamError::Refused(_) => ErrorCode::EgressDenied,
                    UpstreamError::Timeout => ErrorCode::ProviderTimeout,
                    UpstreamError::Failed(_) | UpstreamError::TooLarge(_) => {
                        ErrorCode::ProviderError
                    }
                },
                VaultError::ProviderRejected(_) => ErrorCode::ProviderError,
            },
        }
    }

    /// Text safe to show the caller: fixed for internal failures, specific for refusals.
    pub fn public_message(&self) -> String {
        match self {
            ApiError::Auth(RequestAuthError::StaleTimestamp) => {
                "Request timestamp outside the allowed window".into()
            }
            ApiError::Auth(RequestAuthError::BadSignature) => "Invalid signature".into(),
            ApiError::Auth(RequestAuthError::MissingSignature) => {
                "Missing or malformed X-TokenVault-Signature".into()
            }
            ApiError::Auth(RequestAuthError::MissingTimestamp) => {
                "Missing X-TokenVault-Timestamp".into()
            }
            ApiError::Auth(RequestAuthError::InvalidTimestamp) => {
                "Invalid X-TokenVault-Timestamp".into()
            }
            ApiError::Envelope(EnvelopeError::Missing) => "Missing X-Keyholder-Envelope".into(),
            ApiError::Envelope(EnvelopeError::Malformed) => "Malformed X-Keyholder-Envelope".into(),
            ApiError::Envelope(EnvelopeError::UnknownKey) => "Unknown platform key".into(),
            ApiError::Envelope(EnvelopeError::Stale) => {
                "Request timestamp outside the allowed window".into()
            }
            ApiError::Envelope(EnvelopeError::BadSignature) => "Invalid signature".into(),
            ApiError::EnvelopeReplayed => "Duplicate envelope nonce".into(),
            ApiError::WrongScheme => {
                "This keyholder's binding does not accept this signature scheme".into()
            }
            ApiError::TicketWrongScheme => {
                "This keyholder's binding does not accept this ticket scheme".into()
            }
            ApiError::DuplicateRequestId => "Duplicate request ID".into(),
            ApiError::RequestIdMismatch => {
                "Body requestId does not match X-TokenVault-Request-Id".into()
            }
            ApiError::SignatureReplayed => {
                "Replayed request: these signed bytes were already accepted".into()
            }
            ApiError::BadRequestId => {
                "Missing or malformed X-TokenVault-Request-Id (1-128 chars of A-Z a-z 0-9 . _ : -)"
                    .into()
            }
            ApiError::Ticket(TicketError::Malformed) => "Malformed ticket".into(),
            ApiError::Ticket(TicketError::BadSignature) => "Invalid ticket signature".into(),
            ApiError::Ticket(TicketError::Undecodable) => "Ticket payload cannot be decoded".into(),
            ApiError::Ticket(TicketError::Expired) => "Ticket expired".into(),
            ApiError::Ticket(TicketError::MissingNonce) => "Ticket has no nonce".into(),
            ApiError::Ticket(TicketError::LifetimeTooLong) => {
                "Ticket lifetime exceeds the allowed maximum".into()
            }
            ApiError::Ticket(TicketError::IssuedInFuture) => "Ticket issued in the future".into(),
            ApiError::Ticket(TicketError::IssuedAfterExpiry) => {
                "Ticket issued after its expiry".into()
            }
            ApiError::Ticket(TicketError::WrongPurpose) => {
                "Ticket purpose not valid for this endpoint".into()
            }
            ApiError::Ticket(TicketError::WrongService) => "Ticket service does not match".into(),
            ApiError::TicketReplayed => "Ticket already used".into(),
            ApiError::RateLimited { retry_after_secs } => {
                format!("Too many requests from this address; retry after {retry_after_secs} s")
            }
            ApiError::Vault(VaultError::CorruptDocument) => {
                "The stored document for this service is malformed or does not decrypt; store the credential again".into()
            }
            ApiError::Vault(VaultError::Store(_)) => {
                "Storage is temporarily unavailable; retry later".into()
            }
            ApiError::Vault(
                VaultError::Crypto
                | VaultError::WrongMasterKey
                | VaultError::MasterKeyMissing(_)
                | VaultError::KeyFile(..)
                | VaultError::Pkcs11(_)
                | VaultError::Corrupt(_)
                | VaultError::Undecryptable
                | VaultError::KeyRingChanged,
            ) => "Internal error".into(),
            ApiError::Vault(VaultError::EgressDenied(reason))
            | ApiError::Vault(VaultError::Upstream(UpstreamError::Refused(
                crate::upstream::EgressRefused(reason),
            )))
            | ApiError::Vault(VaultError::Provider(UpstreamError::Refused(
                crate::upstream::EgressRefused(reason),
            ))) => format!("Egress denied: {reason}"),
            ApiError::Vault(VaultError::Upstream(UpstreamError::Timeout)) => {
                "The upstream did not answer in time".into()
            }
            ApiError::Vault(VaultError::Upstream(UpstreamError::TooLarge(limit))) => {
                format!("The upstream response exceeds {limit} bytes")
            }
            ApiError::Vault(VaultError::Upstream(UpstreamError::Failed(_))) => {
                "The upstream request failed".into()
            }
            ApiError::Vault(VaultError::Provider(UpstreamError::Timeout)) => {
                "The token provider did not answer in time".into()
            }
            ApiError::Vault(VaultError::Provider(_)) => "The token provider request failed".into(),
            ApiError::Vault(VaultError::ProviderRejected(text)) => {
                format!("The token provider refused: {text}")
            }
            other => other.to_string(),
        }
    }

    /// The wire body for this error.
    pub fn body(&self, request_id: Option<&str>) -> serde_json::Value {
        let body = ErrorBody::new(self.code(), self.public_message());
        let mut value = serde_json::json!({ "error": body.error, "message": body.message });
        if let (Some(id), Some(map)) = (request_id, value.as_object_mut()) {
            map.insert(
                "requestId".into(),
                serde_json::Value::String(id.to_string()),
            );
        }
        value
    }

    /// Logs internal failures in full (they are answered with a fixed text).
    pub fn log(&self) {
        if self.code().http_status() >= 500 {
            tracing::error!(error = %self, code = self.code().as_str(), "request failed");
        } else {
            tracing::debug!(code = self.code().as_str(), "request refused");
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.code().http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    fn error_response(&self) -> HttpResponse {
        self.log();
        let mut response = HttpResponse::build(self.status_code());
        if let ApiError::RateLimited { retry_after_secs }
        | ApiError::PolicyLimited {
            retry_after_secs, ..
        } = self
        {
            response.insert_header((
                keyholder_protocol::paths::HEADER_RETRY_AFTER,
                retry_after_secs.to_string(),
            ));
        }
        // The body is written once, by the answer layer, which knows the request id
        // (`http::layers::answer`).
        response.content_type("application/json").finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_maps_to_its_documented_status() {
        let cases: Vec<(ApiError, u16, &str)> = vec![
            (ApiError::InvalidRequest("x".into()), 400, "invalid_request"),
            (ApiError::PayloadTooLarge(1), 413, "payload_too_large"),
            (
                ApiError::Auth(RequestAuthError::BadSignature),
                401,
                "auth_failed",
            ),
            (ApiError::DuplicateRequestId, 401, "auth_failed"),
            (ApiError::RequestIdMismatch, 401, "auth_failed"),
            (ApiError::SignatureReplayed, 401, "auth_failed"),
            (
                ApiError::Envelope(EnvelopeError::UnknownKey),
                401,
                "auth_failed",
            ),
            (ApiError::EnvelopeReplayed, 401, "auth_failed"),
            (ApiError::WrongScheme, 401, "auth_failed"),
            (ApiError::TicketWrongScheme, 401, "ticket_invalid"),
            (
                ApiError::Ticket(TicketError::Expired),
                401,
                "ticket_expired",
            ),
            (
                ApiError::Ticket(TicketError::WrongService),
                401,
                "ticket_invalid",
            ),
            (ApiError::TicketReplayed, 401, "ticket_invalid"),
            (ApiError::SetupRequired, 403, "setup_required"),
            (ApiError::Forbidden("x"), 403, "forbidden"),
            (ApiError::NotFound, 404, "not_found"),
            (
                ApiError::Vault(VaultError::TokenNotFound),
                404,
                "token_not_found",
            ),
            (
                ApiError::Vault(VaultError::AlreadyExists),
                409,
                "already_exists",
            ),
            (
                ApiError::Vault(VaultError::CodeExpired),
                410,
                "code_expired",
            ),
            (ApiError::Vault(VaultError::CodeUsed), 410, "code_used"),
            (ApiError::Vault(VaultError::NotTotp), 400, "not_totp"),
            (
                ApiError::Vault(VaultError::StaleCreation),
                409,
                "stale_creation",
            ),
            (
                ApiError::Constraint(ConstraintError::StaleCreation),
                409,
                "stale_creation",
            ),
            (
                ApiError::Constraint(ConstraintError::InvalidMode),
                400,
                "invalid_request",
            ),
            (
                ApiError::Constraint(ConstraintError::InvalidCreationId),
                400,
                "invalid_request",
            ),
            (
                ApiError::RateLimited {
                    retry_after_secs: 3,
                },
                429,
                "rate_limited",
            ),
            (
                ApiError::PolicyLimited {
                    message: "x".into(),
                    retry_after_secs: 3,
                },
                429,
                "rate_limited",
            ),
            (ApiError::PolicyDenied("x".into()), 403, "policy_denied"),
            (
                ApiError::Vault(VaultError::CorruptDocument),
                422,
                "corrupt_document",
            ),
            (ApiError::Vault(VaultError::Sealed), 503, "sealed"),
            (
                ApiError::Vault(VaultError::KeyRingChanged),
                500,
                "internal_error",
            ),
            (
                ApiError::Vault(VaultError::Undecryptable),
                500,
                "internal_error",
            ),
            (
                ApiError::Vault(VaultError::Store(StorageError::Unavailable(
                    "storage writer is not running".into(),
                ))),
                503,
                "storage_unavailable",
            ),
            (
                ApiError::Vault(VaultError::EgressDenied("x".into())),
                403,
                "egress_denied",
            ),
            (
                ApiError::Vault(VaultError::Upstream(UpstreamError::Refused(
                    crate::upstream::EgressRefused("x".into()),
                ))),
                403,
                "egress_denied",
            ),
            (
                ApiError::Vault(VaultError::Upstream(UpstreamError::Timeout)),
                504,
                "upstream_timeout",
            ),
            (
                ApiError::Vault(VaultError::Upstream(UpstreamError::Failed("x".into()))),
                502,
                "upstream_error",
            ),
            (
                ApiError::Vault(VaultError::Upstream(UpstreamError::TooLarge(1))),
                502,
                "upstream_error",
            ),
            (
                ApiError::Vault(VaultError::Provider(UpstreamError::Timeout)),
                504,
                "provider_timeout",
            ),
            (
                ApiError::Vault(VaultError::Provider(UpstreamError::Failed("x".into()))),
                502,
                "provider_error",
            ),
            (
                ApiError::Vault(VaultError::ProviderRejected("x".into())),
                502,
                "provider_error",
            ),
        ];
        for (err, status, code) in cases {
            assert_eq!(err.code().http_status(), status, "{err:?}");
            assert_eq!(err.code().as_str(), code);
            assert_eq!(err.status_code().as_u16(), status);
        }
    }

    #[test]
    fn rate_limited_carries_retry_after() {
        let response = ApiError::RateLimited {
            retry_after_secs: 7,
        }
        .error_response();
        assert_eq!(response.status().as_u16(), 429);
        assert_eq!(
            response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()),
            Some("7")
        );
    }

    #[test]
    fn internal_details_never_reach_the_caller() {
        let err = ApiError::Vault(VaultError::Corrupt("secret path /data/x".into()));
        assert_eq!(err.public_message(), "Internal error");
        let err = ApiError::Vault(VaultError::Store(StorageError::Unavailable(
            "disk I/O error at page 7".into(),
        )));
        assert!(!err.public_message().contains("page 7"));
        let err = ApiError::Vault(VaultError::Upstream(UpstreamError::Failed(
            "tcp connect error 10.0.0.7:443".into(),
        )));
        assert!(!err.public_message().contains("10.0.0.7"));
    }
}
