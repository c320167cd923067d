//! `kh2` tickets (a Keyholder extension): the tickets of the asymmetric binding, signed with the
//! platform's Ed25519 key instead of the shared HMAC secret.
//!
//! Format: `kh2.<payload>.<sig>`, where `payload` is the unpadded base64url of the same compact JSON
//! claims as platform tickets ([`TicketClaims`], PROTOCOL.md §2.2) and `sig` is the unpadded base64url
//! of the 64-byte Ed25519 signature over the ASCII text `kh2.` + `payload`. The ticket names no key:
//! it verifies if any active platform key (at most two) verifies it.
//!
//! Checks, in the order of platform tickets: length and form (exactly three non-empty parts, the first
//! `kh2`) → `Malformed`; signature (canonical unpadded base64url of 64 bytes, strict Ed25519) →
//! `BadSignature`; then, exactly as for platform tickets, payload decoding, expiry, nonce presence,
//! `iat` (not in the future, not after `exp`) and the lifetime cap measured from now. Scope ([`TicketClaims::check_scope`]) and nonce replay are checked by the caller.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

use crate::envelope::{PlatformPublicKey, PlatformSigningKey};
use crate::ticket::{check_claims, TicketClaims, TicketError};

/// The prefix (first part) of every `kh2` ticket.
pub const KH2_PREFIX: &str = "kh2";

/// Whether `ticket` claims to be a `kh2` ticket (starts with `kh2.`); says nothing about its validity.
pub fn is_kh2_ticket(ticket: &str) -> bool {
    ticket.starts_with("kh2.")
}

/// Encode and sign: `kh2.` + unpadded base64url of the compact JSON claims + `.` + unpadded base64url
/// of the Ed25519 signature over `kh2.<payload>`.
pub fn encode_kh2_ticket(key: &PlatformSigningKey, claims: &TicketClaims) -> String {
    // Serializing a struct of strings and integers cannot fail; fall back to an empty object regardless.
    let json = serde_json::to_vec(claims).unwrap_or_else(|_| b"{}".to_vec());
    let signed = format!("{KH2_PREFIX}.{}", URL_SAFE_NO_PAD.encode(json));
    let sig = URL_SAFE_NO_PAD.encode(key.sign(signed.as_bytes()));
    format!("{signed}.{sig}")
}

/// Verify a `kh2` ticket against the active platform keys (see the module doc for the order).
pub fn verify_kh2_ticket(
    keys: &[PlatformPublicKey],
    ticket: &str,
    now: i64,
    max_lifetime_secs: i64,
) -> Result<TicketClaims, TicketError> {
    let [prefix, payload, sig] = crate::ticket::split_ticket(ticket)?;
    if prefix != KH2_PREFIX {
        return Err(TicketError::Malformed);
    }
    if sig.len() != 86 {
        return Err(TicketError::BadSignature);
    }
    let raw = URL_SAFE_NO_PAD
        .decode(sig)
        .map_err(|_| TicketError::BadSignature)?;
    let sig: [u8; 64] = raw
        .as_slice()
        .try_into()
        .map_err(|_| TicketError::BadSignature)?;
    // The signed text is the ticket up to the last dot: `kh2.<payload>`.
    let signed = &ticket[..KH2_PREFIX.len() + 1 + payload.len()];
    if !keys.iter().any(|k| k.verify(signed.as_bytes(), &sig)) {
        return Err(TicketError::BadSignature);
    }
    check_claims(payload, now, max_lifetime_secs)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::Purpose;

    #[test]
    fn round_trip_and_refusals() {
        let key = PlatformSigningKey::from_seed(&[1u8; 32]);
        let second = PlatformSigningKey::from_seed(&[2u8; 32]);
        let claims = TicketClaims::new("u", "github", Purpose::Proxy, 100, 160, "n1");
        let t = encode_kh2_ticket(&key, &claims);
        assert!(is_kh2_ticket(&t));
        let both = [second.public_key(), key.public_key()];
        assert_eq!(verify_kh2_ticket(&both, &t, 100, 3600), Ok(claims.clone()));
        assert_eq!(
            verify_kh2_ticket(&[second.public_key()], &t, 100, 3600),
            Err(TicketError::BadSignature)
        );
        assert_eq!(
            verify_kh2_ticket(&[], &t, 100, 3600),
            Err(TicketError::BadSignature)
        );
        assert_eq!(
            verify_kh2_ticket(&both, &t, 161, 3600),
            Err(TicketError::Expired)
        );
        assert_eq!(
            verify_kh2_ticket(&both, &t, 100, 59),
            Err(TicketError::LifetimeTooLong)
        );
        for bad in [
            "",
            "kh2",
            "kh2.",
            "kh2..",
            "kh2.a.",
            "kh3.a.b",
            "a.b",
            "kh2.a.b.c",
        ] {
            assert_eq!(
                verify_kh2_ticket(&both, bad, 100, 3600),
                Err(TicketError::Malformed),
                "{bad:?}"
            );
        }
        let padded = format!("{t}==");
        assert_eq!(
            verify_kh2_ticket(&both, &padded, 100, 3600),
            Err(TicketError::BadSignature)
        );
        // Another payload under the same signature.
        let other = encode_kh2_ticket(
            &key,
            &TicketClaims::new("u", "gitlab", Purpose::Proxy, 100, 160, "n1"),
        );
        let swapped = format!(
            "{}.{}",
            other.rsplit_once('.').unwrap().0,
            t.rsplit_once('.').unwrap().1
        );
        assert_eq!(
            verify_kh2_ticket(&both, &swapped, 100, 3600),
            Err(TicketError::BadSignature)
        );
    }
}
