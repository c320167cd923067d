//! Tickets (`<base64url payload>.<hex HMAC>`, PROTOCOL.md §2.2): claims, purposes, encode and verify.
//! The asymmetric binding's `kh2` tickets share these claims and checks (see `ticket_kh2`).
//! Nonce replay is the server's business; verification here is pure.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq as _;

use crate::error::ErrorCode;
use crate::paths::MAX_CLOCK_SKEW_SECS;
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
    /// Creation id (2.4.0 ticket constraint). Kept as the JSON value received, so that a `cid` that is
    /// not a string is refused by the constraint checks with its own code rather than as undecodable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cid: Option<serde_json::Value>,
    /// Store mode: `create` or `overwrite` (store tickets only; kept as received, like `cid`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<serde_json::Value>,
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

    /// The `cid` claim when it is a non-empty string.
    pub fn creation_id(&self) -> Option<&str> {
        self.cid
            .as_ref()
            .and_then(serde_json::Value::as_str)
            .filter(|c| !c.is_empty())
    }

    /// The constraint a credential, proxy or TOTP-code ticket puts on the stored token (PROTOCOL.md
    /// §7.3): without `cid`, none; with one, it must be a non-empty string equal to the token's
    /// `creationId` (`stored`), else [`ConstraintError::StaleCreation`]. A token without a
    /// `creationId` fails a ticket that carries one. A JSON `null` claim counts as absent (here and in
    /// [`TicketClaims::store_constraints`]), as serde and JavaScript optional fields treat it.
    pub fn check_creation(&self, stored: Option<&str>) -> Result<(), ConstraintError> {
        if matches!(self.cid, None | Some(serde_json::Value::Null)) {
            return Ok(());
        }
        match (self.creation_id(), stored) {
            (Some(wanted), Some(stored))
                if bool::from(wanted.as_bytes().ct_eq(stored.as_bytes())) =>
            {
                Ok(())
            }
            _ => Err(ConstraintError::StaleCreation),
        }
    }

    /// The constraints of a store ticket (PROTOCOL.md §7.3): `mode` absent, `create` or `overwrite`,
    /// and `cid` absent or a non-empty string; anything else is refused.
    pub fn store_constraints(&self) -> Result<StoreConstraints, ConstraintError> {
        let create_only = match &self.mode {
            None | Some(serde_json::Value::Null) => false,
            Some(serde_json::Value::String(m)) if m == "overwrite" => false,
            Some(serde_json::Value::String(m)) if m == "create" => true,
            Some(_) => return Err(ConstraintError::InvalidMode),
        };
        let creation_id = match &self.cid {
            None | Some(serde_json::Value::Null) => None,
            Some(_) => Some(
                self.creation_id()
                    .ok_or(ConstraintError::InvalidCreationId)?
                    .to_owned(),
            ),
        };
        Ok(StoreConstraints {
            create_only,
            creation_id,
        })
    }
}

/// What a store ticket asks for (from [`TicketClaims::store_constraints`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConstraints {
    /// `mode: create`: refuse when a token is stored already (`409 already_exists`).
    pub create_only: bool,
    /// The `creationId` the stored token gets; `None` leaves the token without one.
    pub creation_id: Option<String>,
}

/// Why a ticket's constraints (`cid`, `mode`) refuse the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConstraintError {
    /// A store ticket's `mode` is neither `create` nor `overwrite`.
    #[error("Ticket mode must be 'create' or 'overwrite'")]
    InvalidMode,
    /// A store ticket's `cid` is not a non-empty string.
    #[error("Ticket cid must be a non-empty string")]
    InvalidCreationId,
    /// The ticket's `cid` does not name the stored token.
    #[error("Token was replaced since this ticket was issued")]
    StaleCreation,
}

impl ConstraintError {
    /// The wire code: `stale_creation` (409) or `invalid_request` (400).
    pub fn error_code(&self) -> ErrorCode {
        match self {
            ConstraintError::StaleCreation => ErrorCode::StaleCreation,
            ConstraintError::InvalidMode | ConstraintError::InvalidCreationId => {
                ErrorCode::InvalidRequest
            }
        }
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
    /// The ticket lives longer than the configured cap (`exp - now`).
    #[error("Ticket lifetime too long")]
    LifetimeTooLong,
    /// `iat` is later than now plus the clock-skew allowance.
    #[error("Ticket issued in the future")]
    IssuedInFuture,
    /// `iat` is later than `exp`.
    #[error("Ticket issued after it expires")]
    IssuedAfterExpiry,
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
/// server. The lifetime left is measured from now (`exp - now`), whatever `iat` says; a present `iat`
/// must not be later than now plus [`MAX_CLOCK_SKEW_SECS`], nor later than `exp`.
pub fn verify_ticket(
    secret: &HmacSecret,
    ticket: &str,
    now: i64,
    max_lifetime_secs: i64,
) -> Result<TicketClaims, TicketError> {
    let [payload, sig] = split_ticket(ticket)?;
    let given = crate::hex::decode_lower::<32>(sig).ok_or(TicketError::BadSignature)?;
    let expected = hmac_parts(secret, &[payload.as_bytes()]);
    if !bool::from(expected.ct_eq(&given)) {
        return Err(TicketError::BadSignature);
    }
    check_claims(payload, now, max_lifetime_secs)
}

/// A ticket's `N` dot-separated parts (at most [`MAX_TICKET_LEN`] bytes, none empty): the prelude
/// of both ticket formats.
pub(crate) fn split_ticket<const N: usize>(ticket: &str) -> Result<[&str; N], TicketError> {
    crate::compact::split_exact::<N>(ticket, '.', MAX_TICKET_LEN)
        .filter(|parts| parts.iter().all(|p| !p.is_empty()))
        .ok_or(TicketError::Malformed)
}

/// The checks after the signature, shared by both ticket formats: payload decoding, expiry, nonce
/// presence, `iat` (not in the future beyond the skew allowance, not after `exp`) and the lifetime
/// cap from now (in that order). Every comparison with the clock is done in `i128`, so no claim
/// value (`i64::MIN`, `2^63-1`) can overflow it.
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
    if let Some(iat) = claims.iat {
        if i128::from(iat) > i128::from(now) + i128::from(MAX_CLOCK_SKEW_SECS) {
            return Err(TicketError::IssuedInFuture);
        }
        if iat > exp {
            return Err(TicketError::IssuedAfterExpiry);
        }
    }
    // From now, not from `iat`: a ticket "issued" in the past cannot stretch its remaining life.
    let lifetime = i128::from(exp) - i128::from(now);
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
        // iat in the future beyond the skew allowance (300 s), iat after exp, and a lifetime
        // stretched by an old iat: the cap is measured from now.
        assert!(v(&sign(&b64(
            r#"{"iat":1700000300,"exp":1700000600,"nonce":"n"}"#
        )))
        .is_ok());
        assert_eq!(
            v(&sign(&b64(
                r#"{"iat":1700000301,"exp":1700000600,"nonce":"n"}"#
            ))),
            Err(TicketError::IssuedInFuture)
        );
        assert_eq!(
            v(&sign(&b64(
                r#"{"iat":1700000100,"exp":1700000050,"nonce":"n"}"#
            ))),
            Err(TicketError::IssuedAfterExpiry)
        );
        assert_eq!(
            v(&sign(&b64(
                r#"{"iat":1702592000,"exp":1702595600,"nonce":"n"}"#
            ))),
            Err(TicketError::IssuedInFuture)
        );
        assert_eq!(
            v(&sign(&b64(
                r#"{"iat":1600000000,"exp":1700003601,"nonce":"n"}"#
            ))),
            Err(TicketError::LifetimeTooLong)
        );
        // Extreme values never overflow and are refused.
        for (iat, exp) in [
            (i64::MIN, i64::MAX),
            (i64::MAX, i64::MAX),
            (1_700_000_000, i64::MAX),
            (i64::MIN, i64::MIN),
        ] {
            let json = format!(r#"{{"iat":{iat},"exp":{exp},"nonce":"n"}}"#);
            assert!(v(&sign(&b64(&json))).is_err(), "{json}");
        }
        assert!(
            verify_ticket(
                &s,
                &sign(&b64(&format!(
                    r#"{{"iat":1700000000,"exp":{},"nonce":"n"}}"#,
                    i64::MAX
                ))),
                1_700_000_000,
                i64::MAX
            )
            .is_ok(),
            "an unbounded cap admits the largest exp without overflow"
        );
        assert_eq!(
            v(&sign(&b64(
                r#"{"iat":1700000000,"exp":18446744073709551615,"nonce":"n"}"#
            ))),
            Err(TicketError::Undecodable)
        );
        assert!(v(&sign(&b64(r#"{"exp":1700003600,"nonce":"n"}"#))).is_ok());
        let wrong = HmacSecret::from_bytes([7u8; 32]);
        assert_eq!(
            verify_ticket(&wrong, GOLDEN, 1_700_000_000, i64::MAX),
            Err(TicketError::BadSignature)
        );
        assert_eq!(TicketError::Expired.error_code(), ErrorCode::TicketExpired);
        assert_eq!(
            ConstraintError::StaleCreation.error_code().http_status(),
            409
        );
        assert_eq!(
            TicketError::MissingNonce.error_code(),
            ErrorCode::TicketInvalid
        );
    }

    #[test]
    fn creation_and_store_constraints() {
        use serde_json::json;
        let mut c = golden_claims();
        assert_eq!(c.check_creation(None), Ok(()));
        assert_eq!(c.check_creation(Some("c1")), Ok(()));
        c.cid = Some(json!("c1"));
        assert_eq!(c.check_creation(Some("c1")), Ok(()));
        assert_eq!(
            c.check_creation(Some("c2")),
            Err(ConstraintError::StaleCreation)
        );
        assert_eq!(c.check_creation(None), Err(ConstraintError::StaleCreation));
        for bad in [json!(""), json!(1), json!(["c1"])] {
            c.cid = Some(bad.clone());
            assert_eq!(
                c.check_creation(Some("c1")),
                Err(ConstraintError::StaleCreation),
                "{bad}"
            );
            assert_eq!(
                c.check_creation(Some("")),
                Err(ConstraintError::StaleCreation),
                "{bad}"
            );
            assert_eq!(
                c.store_constraints(),
                Err(ConstraintError::InvalidCreationId),
                "{bad}"
            );
        }
        c.cid = None;
        assert_eq!(
            c.store_constraints(),
            Ok(StoreConstraints {
                create_only: false,
                creation_id: None
            })
        );
        c.mode = Some(json!("create"));
        c.cid = Some(json!("c9"));
        assert_eq!(
            c.store_constraints(),
            Ok(StoreConstraints {
                create_only: true,
                creation_id: Some("c9".into())
            })
        );
        c.mode = Some(json!("overwrite"));
        assert_eq!(c.store_constraints().map(|s| s.create_only), Ok(false));
        for bad in [json!("Create"), json!(""), json!(1), json!(true)] {
            c.mode = Some(bad.clone());
            assert_eq!(
                c.store_constraints(),
                Err(ConstraintError::InvalidMode),
                "{bad}"
            );
        }
        // A cid that is not a string still decodes (its refusal is the constraint's, not the payload's).
        let s = golden_secret();
        let payload = URL_SAFE_NO_PAD.encode(
            r#"{"sub":"u","svc":"s","pur":"store","iat":1700000000,"exp":1700000060,"nonce":"n","cid":7,"mode":"x"}"#,
        );
        let t = format!(
            "{payload}.{}",
            crate::hex::encode(&hmac_parts(&s, &[payload.as_bytes()]))
        );
        let claims = verify_ticket(&s, &t, 1_700_000_000, 3600).unwrap();
        assert_eq!(claims.cid, Some(json!(7)));
        assert_eq!(
            claims.store_constraints(),
            Err(ConstraintError::InvalidMode)
        );
    }
}
