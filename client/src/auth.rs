//! How the platform side authenticates its calls. Today one scheme: the Token Vault HMAC signature
//! (`X-TokenVault-Signature` over `<timestamp>.<raw body>`). The enum is non-exhaustive so that an
//! asymmetric scheme (Ed25519 request envelopes) can be added without breaking callers.

use std::fmt;

use keyholder_protocol::paths::{HEADER_SIGNATURE, HEADER_TIMESTAMP};
use keyholder_protocol::signing::signature_header_value;
use keyholder_protocol::HmacSecret;

/// The platform's credentials towards a webhook.
#[non_exhaustive]
pub enum PlatformAuth {
    /// The 32-byte HMAC secret obtained from the bind-code exchange (PROTOCOL.md §2.1).
    Hmac(HmacSecret),
}

impl PlatformAuth {
    /// The HMAC secret, when this is the HMAC scheme (for example to save it after a bind).
    pub fn hmac_secret(&self) -> Option<&HmacSecret> {
        match self {
            PlatformAuth::Hmac(secret) => Some(secret),
        }
    }

    /// The authentication headers of one attempt. Every scheme signs the exact body bytes sent; the
    /// method and target are passed so that a scheme which also covers them can be added.
    pub(crate) fn request_headers(
        &self,
        _method: &str,
        _path_and_query: &str,
        body: &[u8],
        timestamp: i64,
    ) -> Vec<(&'static str, String)> {
        match self {
            PlatformAuth::Hmac(secret) => vec![
                (
                    HEADER_SIGNATURE,
                    signature_header_value(secret, timestamp, body),
                ),
                (HEADER_TIMESTAMP, timestamp.to_string()),
            ],
        }
    }

    /// A copy for a second owner (the secret bytes are copied into a new zeroizing buffer).
    pub(crate) fn duplicate(&self) -> Self {
        match self {
            PlatformAuth::Hmac(secret) => {
                PlatformAuth::Hmac(HmacSecret::from_bytes(*secret.expose()))
            }
        }
    }
}

impl From<HmacSecret> for PlatformAuth {
    fn from(secret: HmacSecret) -> Self {
        PlatformAuth::Hmac(secret)
    }
}

impl fmt::Debug for PlatformAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlatformAuth::Hmac(_) => f.write_str("PlatformAuth::Hmac(<redacted>)"),
        }
    }
}
