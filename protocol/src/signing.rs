//! HMAC-SHA256 request signatures (`X-TokenVault-Signature` over `<timestamp>.<raw body>`, PROTOCOL.md §2.1).
//! Replay memory is the server's business; this module only computes and checks.

use hmac::{Hmac, Mac as _};
use sha2::Sha256;
use subtle::ConstantTimeEq as _;
use zeroize::Zeroizing;

use crate::error::ErrorCode;
use crate::secret::HmacSecret;

/// A keyed HMAC-SHA256 over the secret.
///
/// The key is zero-padded to the 64-byte block size, which is exactly what HMAC itself does with a short
/// key (RFC 2104 §2); doing it here lets us use the infallible fixed-size constructor.
pub(crate) fn hmac_sha256(secret: &HmacSecret) -> Hmac<Sha256> {
    let mut block = Zeroizing::new([0u8; 64]);
    block[..32].copy_from_slice(secret.expose());
    <Hmac<Sha256> as hmac::digest::KeyInit>::new(block.as_ref().into())
}

/// Raw HMAC-SHA256 of `parts` concatenated.
pub(crate) fn hmac_parts(secret: &HmacSecret, parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = hmac_sha256(secret);
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// The 64 lowercase hex HMAC-SHA256 of `"<timestamp>." ‖ body`.
pub fn sign_request(secret: &HmacSecret, timestamp: i64, body: &[u8]) -> String {
    let ts = timestamp.to_string();
    crate::hex::encode(&hmac_parts(secret, &[ts.as_bytes(), b".", body]))
}

/// The full header value: `sha256=<hex>`.
pub fn signature_header_value(secret: &HmacSecret, timestamp: i64, body: &[u8]) -> String {
    format!("sha256={}", sign_request(secret, timestamp, body))
}

/// Why a signed request was refused (all map to `401 auth_failed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RequestAuthError {
    /// The signature header is missing or does not start with `sha256=`.
    #[error("missing signature")]
    MissingSignature,
    /// The timestamp header is missing.
    #[error("missing timestamp")]
    MissingTimestamp,
    /// The timestamp is not an integer.
    #[error("invalid timestamp")]
    InvalidTimestamp,
    /// The timestamp is outside the allowed clock skew.
    #[error("timestamp outside the allowed window")]
    StaleTimestamp,
    /// The signature does not match.
    #[error("bad signature")]
    BadSignature,
}

impl RequestAuthError {
    /// The wire code: always `auth_failed`.
    pub fn error_code(&self) -> ErrorCode {
        ErrorCode::AuthFailed
    }
}

/// Strict integer: optional leading `-`, then 1-19 ASCII digits, within `i64`.
pub(crate) fn parse_strict_i64(s: &str) -> Option<i64> {
    let digits = s.strip_prefix('-').unwrap_or(s);
    if digits.is_empty() || digits.len() > 19 || !digits.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    s.parse::<i64>().ok()
}

/// Verify a signed platform request over the exact body bytes received. Returns the timestamp.
///
/// Checks, first failure wins: signature header present with `sha256=`; timestamp present; timestamp an
/// integer; `|now - ts| <= max_skew_secs`; constant-time signature compare (malformed hex is a bad signature).
pub fn verify_request(
    secret: &HmacSecret,
    signature_header: Option<&str>,
    timestamp_header: Option<&str>,
    body: &[u8],
    now: i64,
    max_skew_secs: i64,
) -> Result<i64, RequestAuthError> {
    let hex_sig = signature_header
        .and_then(|h| h.strip_prefix("sha256="))
        .ok_or(RequestAuthError::MissingSignature)?;
    let ts_text = timestamp_header.ok_or(RequestAuthError::MissingTimestamp)?;
    let ts = parse_strict_i64(ts_text).ok_or(RequestAuthError::InvalidTimestamp)?;
    let skew = (i128::from(now) - i128::from(ts)).abs();
    if skew > i128::from(max_skew_secs) {
        return Err(RequestAuthError::StaleTimestamp);
    }
    let given = crate::hex::decode_lower::<32>(hex_sig).ok_or(RequestAuthError::BadSignature)?;
    // Sign over the timestamp text exactly as received (it is canonical modulo leading zeros).
    let expected = hmac_parts(secret, &[ts_text.as_bytes(), b".", body]);
    if bool::from(expected.ct_eq(&given)) {
        Ok(ts)
    } else {
        Err(RequestAuthError::BadSignature)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn golden() -> HmacSecret {
        let mut b = [0u8; 32];
        for (i, x) in b.iter_mut().enumerate() {
            *x = i as u8;
        }
        HmacSecret::from_bytes(b)
    }

    const BODY: &[u8] =
        br#"{"operation":"get","collection":"tokens","key":"github","requestId":"req_testfixture01"}"#;
    const SIG: &str = "c196ad249f0d81158ebfec10a47f7f67122de187c094332e9ae9290bc45fcdeb";

    #[test]
    fn golden_vector() {
        let s = golden();
        assert_eq!(sign_request(&s, 1_700_000_000, BODY), SIG);
        let header = format!("sha256={SIG}");
        assert_eq!(
            verify_request(
                &s,
                Some(&header),
                Some("1700000000"),
                BODY,
                1_700_000_100,
                300
            ),
            Ok(1_700_000_000)
        );
    }

    #[test]
    fn check_order() {
        let s = golden();
        let header = format!("sha256={SIG}");
        let v = |sig: Option<&str>, ts: Option<&str>, now: i64| {
            verify_request(&s, sig, ts, BODY, now, 300)
        };
        assert_eq!(v(None, None, 0), Err(RequestAuthError::MissingSignature));
        assert_eq!(
            v(Some(SIG), Some("1"), 0),
            Err(RequestAuthError::MissingSignature)
        );
        assert_eq!(
            v(Some(&header), None, 0),
            Err(RequestAuthError::MissingTimestamp)
        );
        for bad in [
            "",
            "+1700000000",
            " 1700000000",
            "1700000000 ",
            "1.7e9",
            "-",
            "17000000000000000000000",
        ] {
            assert_eq!(
                v(Some(&header), Some(bad), 0),
                Err(RequestAuthError::InvalidTimestamp),
                "{bad:?}"
            );
        }
        assert_eq!(
            v(Some(&header), Some("1700000000"), 1_700_000_301),
            Err(RequestAuthError::StaleTimestamp)
        );
        assert_eq!(
            v(Some(&header), Some("1700000000"), 1_699_999_699),
            Err(RequestAuthError::StaleTimestamp)
        );
        assert_eq!(
            v(Some(&header), Some("1700000000"), 1_700_000_300),
            Ok(1_700_000_000)
        );
        assert_eq!(
            v(Some("sha256=zz"), Some("1700000000"), 1_700_000_000),
            Err(RequestAuthError::BadSignature)
        );
        let upper = format!("sha256={}", SIG.to_uppercase());
        assert_eq!(
            v(Some(&upper), Some("1700000000"), 1_700_000_000),
            Err(RequestAuthError::BadSignature)
        );
        assert_eq!(
            verify_request(
                &s,
                Some(&header),
                Some("-9223372036854775808"),
                BODY,
                i64::MAX,
                i64::MAX
            ),
            Err(RequestAuthError::StaleTimestamp)
        );
    }
}
