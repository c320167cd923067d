//! The registration URL the owner opens to bind the keyholder to a platform account (PROTOCOL.md §1, §2.3).

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use crate::secret::HmacSecret;

/// Everything except RFC 3986 unreserved characters (`A-Z a-z 0-9 - . _ ~`) is percent-encoded.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// `<frontend>/vault/webhook-bind?code=..&webhook_url=<std base64 of webhook_url>&hmac_hash=<sha256 hex>`.
pub fn registration_url(
    frontend: &str,
    code: &str,
    webhook_url: &str,
    secret: &HmacSecret,
) -> String {
    registration_url_for_hash(frontend, code, webhook_url, &secret.sha256_hex())
}

/// Same as [`registration_url`], from the secret's SHA-256 hex (for callers that keep only the hash).
pub fn registration_url_for_hash(
    frontend: &str,
    code: &str,
    webhook_url: &str,
    hmac_hash_hex: &str,
) -> String {
    let webhook_b64 = STANDARD.encode(webhook_url.as_bytes());
    format!(
        "{}/vault/webhook-bind?code={}&webhook_url={}&hmac_hash={}",
        frontend.trim_end_matches('/'),
        utf8_percent_encode(code, QUERY_VALUE),
        utf8_percent_encode(&webhook_b64, QUERY_VALUE),
        utf8_percent_encode(hmac_hash_hex, QUERY_VALUE)
    )
}

/// The registration URL of an asymmetric bind code (Keyholder extension): as [`registration_url`], but
/// naming the platform key the code is for instead of an HMAC hash:
/// `<frontend>/vault/webhook-bind?code=..&webhook_url=..&platform_key_id=<16 hex key id>`.
pub fn registration_url_for_platform_key(
    frontend: &str,
    code: &str,
    webhook_url: &str,
    platform_key_id: &str,
) -> String {
    let webhook_b64 = STANDARD.encode(webhook_url.as_bytes());
    format!(
        "{}/vault/webhook-bind?code={}&webhook_url={}&platform_key_id={}",
        frontend.trim_end_matches('/'),
        utf8_percent_encode(code, QUERY_VALUE),
        utf8_percent_encode(&webhook_b64, QUERY_VALUE),
        utf8_percent_encode(platform_key_id, QUERY_VALUE)
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn url_shape() {
        let mut b = [0u8; 32];
        for (i, x) in b.iter_mut().enumerate() {
            *x = i as u8;
        }
        let s = HmacSecret::from_bytes(b);
        let url = registration_url(
            "https://tokenvault.uk/",
            "3f2b1c9e-8d7a-4b6c-9e5f-1a2b3c4d5e6f",
            "https://kh.example.org",
            &s,
        );
        assert_eq!(
            url,
            "https://tokenvault.uk/vault/webhook-bind?code=3f2b1c9e-8d7a-4b6c-9e5f-1a2b3c4d5e6f\
             &webhook_url=aHR0cHM6Ly9raC5leGFtcGxlLm9yZw%3D%3D\
             &hmac_hash=630dcd2966c4336691125448bbb25b4ff412a49c732db2c8abc1b8581bd710dd"
        );
    }
}
