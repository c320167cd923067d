//! How the platform side authenticates its calls: the Token Vault HMAC signature
//! (`X-TokenVault-Signature` over `<timestamp>.<raw body>`), or, in an asymmetric binding, an Ed25519
//! request envelope (`X-Keyholder-Envelope` over the method, target and body, with a fresh nonce per
//! attempt). The enum is non-exhaustive so that further schemes can be added without breaking callers.

use std::fmt;

use keyholder_protocol::envelope::{new_envelope_nonce, sign_envelope};
use keyholder_protocol::paths::{HEADER_ENVELOPE, HEADER_SIGNATURE, HEADER_TIMESTAMP};
use keyholder_protocol::signing::signature_header_value;
use keyholder_protocol::{HmacSecret, PlatformSigningKey};

/// The platform's credentials towards a webhook.
#[non_exhaustive]
pub enum PlatformAuth {
    /// The 32-byte HMAC secret obtained from the bind-code exchange (PROTOCOL.md §2.1).
    Hmac(HmacSecret),
    /// The platform's own Ed25519 signing key (asymmetric binding: the webhook holds only its public
    /// key). Calls carry an `X-Keyholder-Envelope`; tickets are `kh2` tickets.
    Ed25519(PlatformSigningKey),
}

impl PlatformAuth {
    /// The HMAC secret, when this is the HMAC scheme (for example to save it after a bind).
    pub fn hmac_secret(&self) -> Option<&HmacSecret> {
        match self {
            PlatformAuth::Hmac(secret) => Some(secret),
            PlatformAuth::Ed25519(_) => None,
        }
    }

    /// The Ed25519 signing key, when this is the asymmetric scheme.
    pub fn signing_key(&self) -> Option<&PlatformSigningKey> {
        match self {
            PlatformAuth::Ed25519(key) => Some(key),
            PlatformAuth::Hmac(_) => None,
        }
    }

    /// The authentication headers of one attempt. Every scheme signs the exact body bytes sent; the
    /// envelope also covers the method and the exact path-and-query, and carries a fresh nonce.
    pub(crate) fn request_headers(
        &self,
        method: &str,
        path_and_query: &str,
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
            PlatformAuth::Ed25519(key) => vec![(
                HEADER_ENVELOPE,
                sign_envelope(
                    key,
                    timestamp,
                    &new_envelope_nonce(),
                    method,
                    path_and_query,
                    body,
                ),
            )],
        }
    }

    /// A copy for a second owner (the secret bytes are copied into a new zeroizing buffer).
    pub(crate) fn duplicate(&self) -> Self {
        match self {
            PlatformAuth::Hmac(secret) => {
                PlatformAuth::Hmac(HmacSecret::from_bytes(*secret.expose()))
            }
            PlatformAuth::Ed25519(key) => PlatformAuth::Ed25519(key.duplicate()),
        }
    }
}

impl From<HmacSecret> for PlatformAuth {
    fn from(secret: HmacSecret) -> Self {
        PlatformAuth::Hmac(secret)
    }
}

impl From<PlatformSigningKey> for PlatformAuth {
    fn from(key: PlatformSigningKey) -> Self {
        PlatformAuth::Ed25519(key)
    }
}

impl fmt::Debug for PlatformAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlatformAuth::Hmac(_) => f.write_str("PlatformAuth::Hmac(<redacted>)"),
            PlatformAuth::Ed25519(key) => {
                write!(
                    f,
                    "PlatformAuth::Ed25519(keyId={}, <redacted>)",
                    key.key_id()
                )
            }
        }
    }
}
