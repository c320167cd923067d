//! The SDK's one error type: the webhook's wire errors keep their status, code, message and request id;
//! transport failures, timeouts and identity failures are their own variants. Nothing secret is kept.

use std::time::Duration;

use keyholder_protocol::response_sig::ResponseSigError;
use keyholder_protocol::ErrorCode;

/// Everything that can go wrong talking to a webhook.
///
/// No variant holds a ticket, a secret, a credential or a URL with a query string: `Debug` and `Display`
/// are safe to log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The webhook answered with an error status and (usually) a wire error body.
    #[error(
        "webhook refused the request: HTTP {status} {error}: {message} (request id {request_id})"
    )]
    Api {
        /// The HTTP status.
        status: u16,
        /// The wire error code string (`error` field), or `http_<status>` when the body was not a wire error.
        error: String,
        /// The wire error message (`message` field), or empty.
        message: String,
        /// The request id of the attempt that got this answer.
        request_id: String,
    },
    /// The request could not be sent or the answer not read (DNS, TLS, connection reset, ...).
    #[error("transport error (request id {request_id})")]
    Transport {
        /// The request id of the failed attempt.
        request_id: String,
        /// The underlying error, with its URL removed (a URL can carry a ticket).
        #[source]
        source: reqwest::Error,
    },
    /// No answer within the configured timeout.
    #[error("no answer within {after:?} (request id {request_id})")]
    Timeout {
        /// The request id of the attempt that timed out.
        request_id: String,
        /// The configured request timeout.
        after: Duration,
    },
    /// A 2xx answer whose body is not what the protocol promises.
    #[error("unexpected answer body (HTTP {status}, request id {request_id}): {reason}")]
    Decode {
        /// The HTTP status.
        status: u16,
        /// The request id.
        request_id: String,
        /// What was wrong (never the body's values).
        reason: String,
    },
    /// An identity is pinned and the answer's `X-Keyholder-Signature` does not verify.
    #[error("response signature refused (HTTP {status}, request id {request_id}): {reason}")]
    ResponseSignature {
        /// The HTTP status of the refused answer.
        status: u16,
        /// The request id the signature had to cover.
        request_id: String,
        /// Why the protocol crate refused it.
        #[source]
        reason: ResponseSigError,
    },
    /// An identity is pinned and the answer carries no `X-Keyholder-Signature`.
    #[error("response is not signed though an identity is pinned (HTTP {status}, request id {request_id})")]
    MissingResponseSignature {
        /// The HTTP status.
        status: u16,
        /// The request id.
        request_id: String,
    },
    /// The webhook presented an identity other than the pinned one.
    #[error("webhook identity {found} is not the pinned identity {expected}")]
    IdentityMismatch {
        /// The pinned key id.
        expected: String,
        /// The key id the webhook presented.
        found: String,
    },
    /// The client configuration is unusable (bad URL, plain http without `danger_allow_http`, ...).
    #[error("invalid client configuration: {0}")]
    Config(String),
    /// The webhook broke the protocol in a way that is not a wire error (for example an exchange answer
    /// without a secret).
    #[error("protocol violation: {0}")]
    Protocol(String),
}

impl Error {
    /// The HTTP status, for errors that got an answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Api { status, .. }
            | Error::Decode { status, .. }
            | Error::ResponseSignature { status, .. }
            | Error::MissingResponseSignature { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The typed wire error code, when the webhook sent one we know.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Api { error, .. } => ErrorCode::parse(error),
            _ => None,
        }
    }

    /// The wire error code string, when the webhook sent an error body.
    pub fn wire_error(&self) -> Option<&str> {
        match self {
            Error::Api { error, .. } => Some(error),
            _ => None,
        }
    }

    /// The request id of the attempt this error belongs to.
    pub fn request_id(&self) -> Option<&str> {
        match self {
            Error::Api { request_id, .. }
            | Error::Transport { request_id, .. }
            | Error::Timeout { request_id, .. }
            | Error::Decode { request_id, .. }
            | Error::ResponseSignature { request_id, .. }
            | Error::MissingResponseSignature { request_id, .. } => Some(request_id),
            _ => None,
        }
    }

    /// A `Decode` error that names only the category and position of a JSON error: serde's text can
    /// quote input values, and those may be secrets.
    pub(crate) fn decode(status: u16, request_id: &str, e: &serde_json::Error) -> Self {
        let category = match e.classify() {
            serde_json::error::Category::Io => "I/O",
            serde_json::error::Category::Syntax => "invalid JSON",
            serde_json::error::Category::Data => "JSON of the wrong shape",
            serde_json::error::Category::Eof => "truncated JSON",
        };
        Error::Decode {
            status,
            request_id: request_id.to_owned(),
            reason: format!("{category} at line {} column {}", e.line(), e.column()),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn accessors() {
        let e = Error::Api {
            status: 401,
            error: "ticket_invalid".into(),
            message: "Invalid ticket signature".into(),
            request_id: "kh_1".into(),
        };
        assert_eq!(e.status(), Some(401));
        assert_eq!(e.code(), Some(ErrorCode::TicketInvalid));
        assert_eq!(e.wire_error(), Some("ticket_invalid"));
        assert_eq!(e.request_id(), Some("kh_1"));
        assert!(e.to_string().contains("ticket_invalid"));

        let err = serde_json::from_str::<u64>("\"gho_secret\"").unwrap_err();
        let d = Error::decode(200, "kh_2", &err);
        assert!(!format!("{d:?}").contains("gho_secret"), "{d:?}");
        assert_eq!(d.status(), Some(200));
    }
}
