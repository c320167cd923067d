//! Tickets (`<base64url payload>.<hex HMAC>`, PROTOCOL.md §2.2): claims, purposes, encode and verify.
//! The asymmetric binding's `kh2` tickets share these claims and checks (see `ticket_kh2`).
//! Nonce replay is the server's business; verification here is pure.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq as _;

use crate::error::ErrorCode;
use crate::secret::HmacSecret;
use crate::signing::hmac_parts;

/// Longest ticket text accepted, in bytes; longer is `Malformed`.
pub const MAX_TICKET_LEN: usize = 8 * 1024;

/// What a ticket may be used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Purpose {
    /// `store`: `/v1/store`.
    Store,
    /// `agent_credential`: `/v1/credential` and `/v1/totp-code` for an agent.
    AgentCredential,
    /// `user_reveal`: `/v1/credential` and `/v1/totp-code` for the owner's dashboard.
    UserReveal,
    /// `proxy`: `/v1/proxy`.
    Proxy,
    /// `totp_code`: `/v1/totp-code`.
    TotpCode,
}

impl Purpose {
    /// Every purpose.
    pub const ALL: &'static [Purpose] = &[
        Purpose::Store,
        Purpose::AgentCredential,
        Purpose::UserReveal,
        Purpose::Proxy,
        Purpose::TotpCode,
    ];

    /// The exact `pur` string.
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Store => "store",
            Purpose::AgentCredential => "agent_credential",
            Purpose::UserReveal => "user_reveal",
            Purpose::Proxy => "proxy",
            Purpose::TotpCode => "totp_code",
        }
    }

    /// Parse the exact `pur` string.
    pub fn parse(s: &str) -> Option<Self> {
        Purpose::ALL.iter().copied().find(|p| p.as_str() == s)
    }
}

/// The claims of a ticket. Serialized in this field order, `None` fields skipped.
#[derive(Clone, Serialize, Deserialize, PartialEq, Debug)]
pub struct TicketClaims {
    /// Owner id.
    #[serde(default)]
    pub sub: String,
    /// Service name.
    #[serde(default)]
    pub svc: String,
    /// Purpose string (see [`Purpose`]).
    #[serde(default)]
    pub pur: String,
    /// Issued at, unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
    /// Expires at, unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<i64>,
    /// Single-use nonce.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
    /// Agent id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aid: Option<String>,
    /// Proxy config id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<String>,
    /// Creation id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cid: Option<String>,
    /// Store mode: `create` or `overwrite` (store tickets only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

impl TicketClaims {
    /// Claims with the required fields set and every optional one empty.
    pub fn new(
        sub: impl Into<String>,
        svc: impl Into<String>,
        purpose: Purpose,
        iat: i64,
        exp: i64,
        nonce: impl Into<String>,
    ) -> Self {
        TicketClaims {
            sub: sub.into(),
            svc: svc.into(),
            pur: purpose.as_str().to_owned(),
            iat: Some(iat),
            exp: Some(exp),
            nonce: Some(nonce.into()),
            aid: None,
            pid: None,
            cid: None,
            mode: None,
        }
    }

    /// The typed purpose, if known.
    pub fn purpose(&self) -> Option<Purpose> {
        Purpose::parse(&self.pur)
    }

    /// Check that the purpose is one of `allowed` and `svc` is exactly `service`.
    pub fn check_scope(&self, allowed: &[Purpose], service: &str) -> Result<Purpose, TicketError> {
        let purpose = self
            .purpose()
            .filter(|p| allowed.contains(p))
            .ok_or(TicketError::WrongPurpose)?;
        if self.svc != service {
            return Err(TicketError::WrongService);
        }
        Ok(purpose)
    }
}

/// Why a ticket was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    /// Not exactly two non-empty `.`-separated parts, or too long.
    #[error("Malformed ticket")]
    Malformed,
    /// The signature is not 64 lowercase hex or does not match.
    #[error("Invalid ticket signature")]
    BadSignature,
    /// The payload is not canonical unpadded base64url of a JSON claims object.
    #[error("Ticket payload could not be decoded")]
    Undecodable,
    /// `exp` is missing or before now.
    #[error("Ticket expired")]
    Expired,
    /// The nonce is missing or empty.
    #[error("Ticket has no nonce")]
    MissingNonce,
    /// The ticket lives longer than the configured cap.
    #[error("Ticket lifetime too long")]
    LifetimeTooLong,
    /// The purpose is not allowed here.
    #[error("Ticket purpose not allowed for this endpoint")]
    WrongPurpose,
    /// The ticket is for another service.
    #[error("Ticket is for another service")]
    WrongService,
}

impl TicketError {
    /// The wire code: `ticket_expired` for `Expired`, `ticket_invalid` otherwise.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            TicketError::Expired => ErrorCode::TicketExpired,
            _ => ErrorCode::TicketInvalid,
        }
    }
}

/// Encode and sign: compact JSON, unpadded base64url, `.`, lowercase hex HMAC over the payload text.
pub fn encode_ticket(secret: &HmacSecret, claims: &TicketClaims) -> String {
    // Serializing a struct of strings and integers cannot fail; fall back to an empty object regardless.
    let json = serde_json::to_vec(claims).unwrap_or_else(|_| b"{}".to_vec());
    let payload = URL_SAFE_NO_PAD.encode(json);
    let sig = crate::hex::encode(&hmac_parts(secret, &[payload.as_bytes()]));
    format!("{payload}.{sig}")
}

/// Verify a ticket's form, signature, encoding, expiry, nonce presence and lifetime (in that order).
///
/// Scope (purpose, service) is checked separately with [`TicketClaims::check_scope`]; nonce replay by the
/// server. When `iat` is present the lifetime is `exp - iat`; without it, `exp - now`.
pub fn verify_ticket(
    secret: &HmacSecret,
    ticket: &str,
    now: i64,
    max_lifetime_secs: i64,
) -> Result<TicketClaims, TicketError> {
    if ticket.len() > MAX_TICKET_LEN {
        return Err(TicketError::Malformed);
    }
    let mut parts = ticket.split('.');
    let (payload, sig) = match (parts.next(), parts.next(), parts.next()) {
        (Some(p), Some(s), None) if !p.is_empty() && !s.is_empty() => (p, s),
        _ => return Err(TicketError::Malformed),
    };
    let given = crate::hex::decode_lower::<32>(sig).ok_or(TicketError::BadSignature)?;
    let expected = hmac_parts(secret, &[payload.as_bytes()]);
    if !bool::from(expected.ct_eq(&given)) {
        return Err(TicketError::BadSignature);
    }
    check_claims(payload, now, max_lifetime_secs)
}

/// The checks after the signature, shared by both ticket formats: payload decoding, expiry, nonce
/// presence and lifetime cap (in that order).
pub(crate) fn check_claims(
    payload: &str,
    now: i64,
    max_lifetime_secs: i64,
) -> Result<TicketClaims, TicketError> {
    let json = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| TicketError::Undecodable)?;
    // Strict: exactly one JSON object, no surrounding whitespace or trailing data.
    if json.first() != Some(&b'{') || json.last() != Some(&b'}') {
        return Err(TicketError::Undecodable);
    }
    let claims: TicketClaims =
        serde_json::from_slice(&json).map_err(|_| TicketError::Undecodable)?;
    let exp = match claims.exp {
        Some(exp) if exp >= now => exp,
        _ => return Err(TicketError::Expired),
    };
    if claims.nonce.as_deref().is_none_or(str::is_empty) {
        return Err(TicketError::MissingNonce);
    }
    let lifetime = i128::from(exp) - i128::from(claims.iat.unwrap_or(now));
    if lifetime > i128::from(max_lifetime_secs) {
        return Err(TicketError::LifetimeTooLong);
    }
    Ok(claims)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    const GOLDEN: &str = "eyJzdWIiOiJ1c2VyX3Rlc3QiLCJzdmMiOiJnaXRodWIiLCJwdXIiOiJhZ2VudF9jcmVkZW50aWFsIiwiaWF0IjoxNzAwMDAwMDAwLCJleHAiOjk5OTk5OTk5OTksIm5vbmNlIjoiZGVhZGJlZWZkZWFkYmVlZmRlYWRiZWVmZGVhZGJlZWYiLCJhaWQiOiJhZ2VudF90ZXN0In0.b5b3f0d261e89c53c9db035d68244b1d4862a3e9c84edd111f502f9b148da74a";

    fn golden_secret() -> HmacSecret {
        let mut b = [0u8; 32];
        for (i, x) in b.iter_mut().enumerate() {
            *x = i as u8;
        }
        HmacSecret::from_bytes(b)
    }

    fn golden_claims() -> TicketClaims {
        let mut c = TicketClaims::new(
            "user_test",
            "github",
            Purpose::AgentCredential,
            1_700_000_000,
            9_999_999_999,
            "deadbeefdeadbeefdeadbeefdeadbeef",
        );
        c.aid = Some("agent_test".into());
        c
    }

    #[test]
    fn golden_ticket_verifies_and_reencodes() {
        let s = golden_secret();
        let claims = verify_ticket(&s, GOLDEN, 1_700_000_000, i64::MAX).unwrap();
        assert_eq!(claims, golden_claims());
        assert_eq!(encode_ticket(&s, &golden_claims()), GOLDEN);
        assert_eq!(
            claims.check_scope(&[Purpose::AgentCredential, Purpose::UserReveal], "github"),
            Ok(Purpose::AgentCredential)
        );
        assert_eq!(
            claims.check_scope(&[Purpose::Store], "github"),
            Err(TicketError::WrongPurpose)
        );
        assert_eq!(
            claims.check_scope(&[Purpose::AgentCredential], "GitHub"),
            Err(TicketError::WrongService)
        );
        // The golden ticket lives for years: the default 1 h cap refuses it.
        assert_eq!(
            verify_ticket(&s, GOLDEN, 1_700_000_000, 3600),
            Err(TicketError::LifetimeTooLong)
        );
    }

    #[test]
    fn refusals() {
        let s = golden_secret();
        let v = |t: &str| verify_ticket(&s, t, 1_700_000_000, 3600);
        for bad in ["", ".", "a.", ".b", "a.b.c", "abc"] {
            assert_eq!(v(bad), Err(TicketError::Malformed), "{bad:?}");
        }
        assert_eq!(
            v(&"a".repeat(MAX_TICKET_LEN + 1)),
            Err(TicketError::Malformed)
        );
        assert_eq!(v(&GOLDEN.to_uppercase()), Err(TicketError::BadSignature));
        let sign = |payload: &str| {
            format!(
                "{payload}.{}",
                crate::hex::encode(&hmac_parts(&s, &[payload.as_bytes()]))
            )
        };
        let b64 = |json: &str| URL_SAFE_NO_PAD.encode(json);
        let base =
            r#"{"sub":"u","svc":"s","pur":"store","iat":1700000000,"exp":1700000060,"nonce":"n"}"#;
        assert!(v(&sign(&b64(base))).is_ok());
        assert_eq!(
            v(&sign(&format!("{}=", b64(base)))),
            Err(TicketError::Undecodable)
        );
        assert_eq!(
            v(&sign(&b64(&format!("{base}x")))),
            Err(TicketError::Undecodable)
        );
        assert_eq!(
            v(&sign(&b64(&format!("{base} ")))),
            Err(TicketError::Undecodable)
        );
        assert_eq!(v(&sign(&b64("[1]"))), Err(TicketError::Undecodable));
        assert_eq!(
            v(&sign(&b64(r#"{"exp":"1"}"#))),
            Err(TicketError::Undecodable)
        );
        // non-canonical trailing bits: "e30" is "{}", "e31" decodes to the same byte with spare bits set
        assert_eq!(v(&sign("e31")), Err(TicketError::Undecodable));
        assert_eq!(v(&sign("e30")), Err(TicketError::Expired));
        assert_eq!(
            v(&sign(&b64(
                r#"{"iat":1700000000,"exp":1699999999,"nonce":"n"}"#
            ))),
            Err(TicketError::Expired)
        );
        assert_eq!(
            v(&sign(&b64(r#"{"iat":1700000000,"exp":1700000000}"#))),
            Err(TicketError::MissingNonce)
        );
        assert_eq!(
            v(&sign(&b64(
                r#"{"iat":1700000000,"exp":1700000000,"nonce":""}"#
            ))),
            Err(TicketError::MissingNonce)
        );
        assert_eq!(
            v(&sign(&b64(
                r#"{"iat":1700000000,"exp":1700003601,"nonce":"n"}"#
            ))),
            Err(TicketError::LifetimeTooLong)
        );
        assert!(v(&sign(&b64(
            r#"{"iat":1700000000,"exp":1700003600,"nonce":"n"}"#
        )))
        .is_ok());
        assert_eq!(
            v(&sign(&b64(r#"{"exp":1700003601,"nonce":"n"}"#))),
            Err(TicketError::LifetimeTooLong)
        );
        assert!(v(&sign(&b64(r#"{"exp":1700003600,"nonce":"n"}"#))).is_ok());
        let wrong = HmacSecret::from_bytes([7u8; 32]);
        assert_eq!(
            verify_ticket(&wrong, GOLDEN, 1_700_000_000, i64::MAX),
            Err(TicketError::BadSignature)
        );
        assert_eq!(TicketError::Expired.error_code(), ErrorCode::TicketExpired);
        assert_eq!(
            TicketError::MissingNonce.error_code(),
            ErrorCode::TicketInvalid
        );
    }
}
