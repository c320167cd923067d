//! Ed25519 request envelopes (`X-Keyholder-Envelope`, a Keyholder extension): how a platform bound
//! asymmetrically signs its calls, and the platform's Ed25519 keys (signing seed and public key).
//!
//! Header: `keyId=<16 lowercase hex>,ts=<unix seconds>,nonce=<32 lowercase hex>,sig=<standard base64 of
//! 64 bytes>`, fields in this order, nothing else (no spaces, no trailing comma, at most
//! [`MAX_ENVELOPE_LEN`] bytes). Signed message: the UTF-8 of five lines joined by `\n`, no trailing
//! newline: `keyholder-request-v1`, the `ts` value, the `nonce` value, `<METHOD> <path-and-query>` (the
//! request target exactly as sent), and the lowercase hex SHA-256 of the body bytes exactly as sent.
//! `keyId` = first 16 lowercase hex of SHA-256 of the 32-byte public key (as for response signatures).
//!
//! Checks, first failure wins: header present ([`EnvelopeError::Missing`]), strict format
//! ([`EnvelopeError::Malformed`]), `keyId` among the active platform keys ([`EnvelopeError::UnknownKey`]),
//! `|now - ts| <= max skew` ([`EnvelopeError::Stale`]), strict Ed25519 verification
//! ([`EnvelopeError::BadSignature`]). Nonce replay is the server's business: it remembers the returned
//! [`Envelope::nonce`] (durably) at least until `ts + max skew`, and refuses a nonce it has seen.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use rand::rngs::OsRng;
use rand::RngCore as _;
use sha2::{Digest as _, Sha256};
use zeroize::Zeroizing;

use crate::error::ErrorCode;
use crate::response_sig::{key_id, IdentityDocument, ALGORITHM_ED25519};

/// First line of every signed request message.
pub const ENVELOPE_LABEL: &str = "keyholder-request-v1";
/// Longest accepted envelope header, in bytes (a valid one is about 190).
pub const MAX_ENVELOPE_LEN: usize = 256;
/// Most platform keys a keyholder accepts at once (two, so that the platform can rotate).
pub const MAX_PLATFORM_KEYS: usize = 2;

/// The platform's Ed25519 signing key (asymmetric binding). Not printable, cloneable or serializable.
pub struct PlatformSigningKey(SigningKey);

impl PlatformSigningKey {
    /// A fresh key from the OS random generator.
    pub fn generate() -> Self {
        PlatformSigningKey(SigningKey::generate(&mut OsRng))
    }

    /// The key for a 32-byte seed.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        PlatformSigningKey(SigningKey::from_bytes(seed))
    }

    /// A key file's content: exactly 32 raw seed bytes, or canonical standard base64 of them
    /// (surrounding whitespace ignored).
    pub fn from_file_bytes(raw: &[u8]) -> Result<Self, PlatformKeyError> {
        let seed: Zeroizing<[u8; 32]> = if raw.len() == 32 {
            let mut out = Zeroizing::new([0u8; 32]);
            out.copy_from_slice(raw);
            out
        } else {
            decode_base64_32(trim_ascii(raw))?
        };
        Ok(PlatformSigningKey::from_seed(&seed))
    }

    /// The 32-byte seed, for storage by the platform.
    pub fn to_seed(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.0.to_bytes())
    }

    /// The public key.
    pub fn public_key(&self) -> PlatformPublicKey {
        PlatformPublicKey::from_verifying_key(self.0.verifying_key())
    }

    /// The key id of the public key.
    pub fn key_id(&self) -> String {
        key_id(&self.0.verifying_key())
    }

    /// Sign raw bytes.
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.0.sign(msg).to_bytes()
    }

    /// A copy in a new zeroizing owner (the seed is copied, never printed).
    pub fn duplicate(&self) -> Self {
        PlatformSigningKey::from_seed(&self.to_seed())
    }
}

impl std::fmt::Debug for PlatformSigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PlatformSigningKey(keyId={}, <redacted>)", self.key_id())
    }
}

/// A platform public key, with its key id.
#[derive(Clone, PartialEq, Eq)]
pub struct PlatformPublicKey {
    key: VerifyingKey,
    key_id: String,
}

impl std::fmt::Debug for PlatformPublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PlatformPublicKey({})", self.key_id)
    }
}

impl PlatformPublicKey {
    fn from_verifying_key(key: VerifyingKey) -> Self {
        PlatformPublicKey {
            key_id: key_id(&key),
            key,
        }
    }

    /// The key for 32 public-key bytes; refuses bytes that are not a point and small-order (weak) keys.
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, PlatformKeyError> {
        let key = VerifyingKey::from_bytes(bytes).map_err(|_| PlatformKeyError::Invalid)?;
        if key.is_weak() {
            return Err(PlatformKeyError::Invalid);
        }
        Ok(PlatformPublicKey::from_verifying_key(key))
    }

    /// A public key file's content: 32 raw bytes, canonical standard base64 of them, or an identity
    /// document `{"keyId","publicKey","algorithm":"Ed25519"}` (whose key id must match).
    pub fn parse(raw: &[u8]) -> Result<Self, PlatformKeyError> {
        if raw.len() == 32 {
            let mut bytes = [0u8; 32];
            bytes.copy_from_slice(raw);
            return PlatformPublicKey::from_bytes(&bytes);
        }
        let text = trim_ascii(raw);
        if text.first() == Some(&b'{') {
            let doc: IdentityDocument =
                serde_json::from_slice(text).map_err(|_| PlatformKeyError::Invalid)?;
            let key = doc.verifying_key().map_err(|_| PlatformKeyError::Invalid)?;
            return Ok(PlatformPublicKey::from_verifying_key(key));
        }
        let bytes = decode_base64_32(text)?;
        PlatformPublicKey::from_bytes(&bytes)
    }

    /// The key id (first 16 lowercase hex of SHA-256 of the public key).
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The 32 public-key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        self.key.as_bytes()
    }

    /// Standard base64 of the public key.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.key.as_bytes())
    }

    /// The key as an identity document (`algorithm` `Ed25519`).
    pub fn identity_document(&self) -> IdentityDocument {
        IdentityDocument {
            key_id: self.key_id.clone(),
            public_key: self.to_base64(),
            algorithm: ALGORITHM_ED25519.to_owned(),
        }
    }

    /// Strict Ed25519 verification of `msg`.
    pub fn verify(&self, msg: &[u8], sig: &[u8; 64]) -> bool {
        self.key
            .verify_strict(msg, &Signature::from_bytes(sig))
            .is_ok()
    }
}

/// Why a platform key could not be read. Never contains key bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PlatformKeyError {
    /// Not 32 bytes, canonical base64 of 32 bytes, or (public keys) an identity document.
    #[error("expected 32 raw bytes, standard base64 of 32 bytes, or an identity document")]
    Encoding,
    /// The bytes are not a usable Ed25519 public key (not a point, a weak key, or a document whose
    /// key id or algorithm does not match).
    #[error("not a valid Ed25519 public key")]
    Invalid,
}

fn trim_ascii(raw: &[u8]) -> &[u8] {
    let start = raw
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(raw.len());
    let end = raw
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |i| i + 1);
    &raw[start..end]
}

fn decode_base64_32(text: &[u8]) -> Result<Zeroizing<[u8; 32]>, PlatformKeyError> {
    if text.len() != 44 {
        return Err(PlatformKeyError::Encoding);
    }
    let decoded = Zeroizing::new(
        STANDARD
            .decode(text)
            .map_err(|_| PlatformKeyError::Encoding)?,
    );
    let mut out = Zeroizing::new([0u8; 32]);
    if decoded.len() != 32 {
        return Err(PlatformKeyError::Encoding);
    }
    out.copy_from_slice(&decoded);
    Ok(out)
}

/// A fresh envelope nonce: 16 random bytes as 32 lowercase hex.
pub fn new_envelope_nonce() -> String {
    let mut bytes = [0u8; 16];
    OsRng.fill_bytes(&mut bytes);
    crate::hex::encode(&bytes)
}

/// The five-line message that is signed (see the module doc).
pub fn envelope_message(
    ts: i64,
    nonce: &str,
    method: &str,
    path_and_query: &str,
    body: &[u8],
) -> String {
    let body_hash = crate::hex::encode(&Sha256::digest(body));
    format!("{ENVELOPE_LABEL}\n{ts}\n{nonce}\n{method} {path_and_query}\n{body_hash}")
}

/// Sign a request; returns the `X-Keyholder-Envelope` header value.
pub fn sign_envelope(
    key: &PlatformSigningKey,
    ts: i64,
    nonce: &str,
    method: &str,
    path_and_query: &str,
    body: &[u8],
) -> String {
    let msg = envelope_message(ts, nonce, method, path_and_query, body);
    format!(
        "keyId={},ts={ts},nonce={nonce},sig={}",
        key.key_id(),
        STANDARD.encode(key.sign(msg.as_bytes()))
    )
}

/// A parsed `X-Keyholder-Envelope` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The signer's key id.
    pub key_id: String,
    /// Signing time, unix seconds.
    pub ts: i64,
    /// The single-use nonce (32 lowercase hex).
    pub nonce: String,
    /// The raw signature.
    pub sig: [u8; 64],
}

impl Envelope {
    /// Strict parse: exactly `keyId=<16 lowercase hex>,ts=<canonical integer>,nonce=<32 lowercase
    /// hex>,sig=<canonical padded standard base64 of 64 bytes>`.
    pub fn parse(header: &str) -> Result<Self, EnvelopeError> {
        use crate::compact::{base64_exact, canonical_i64, field, split_exact};
        let [k, t, n, s] =
            split_exact::<4>(header, ',', MAX_ENVELOPE_LEN).ok_or(EnvelopeError::Malformed)?;
        let key_id = field(k, "keyId").ok_or(EnvelopeError::Malformed)?;
        let ts_text = field(t, "ts").ok_or(EnvelopeError::Malformed)?;
        let nonce = field(n, "nonce").ok_or(EnvelopeError::Malformed)?;
        let sig_text = field(s, "sig").ok_or(EnvelopeError::Malformed)?;
        if !crate::hex::is_lower_hex(key_id, 16) || !crate::hex::is_lower_hex(nonce, 32) {
            return Err(EnvelopeError::Malformed);
        }
        let ts = canonical_i64(ts_text).ok_or(EnvelopeError::Malformed)?;
        let sig = base64_exact::<64>(sig_text).ok_or(EnvelopeError::Malformed)?;
        Ok(Envelope {
            key_id: key_id.to_owned(),
            ts,
            nonce: nonce.to_owned(),
            sig,
        })
    }
}

/// Why an envelope was refused (all map to `401 auth_failed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// No `X-Keyholder-Envelope` header.
    #[error("missing envelope")]
    Missing,
    /// The header does not have the exact format.
    #[error("malformed envelope")]
    Malformed,
    /// The key id is not one of the active platform keys.
    #[error("envelope signed by an unknown key")]
    UnknownKey,
    /// `ts` is outside the allowed clock skew.
    #[error("envelope timestamp outside the allowed window")]
    Stale,
    /// The signature does not verify over this request.
    #[error("bad envelope signature")]
    BadSignature,
}

impl EnvelopeError {
    /// The wire code: always `auth_failed`.
    pub fn error_code(&self) -> ErrorCode {
        ErrorCode::AuthFailed
    }
}

/// Verify a request's envelope over the exact method, target and body bytes received, against the
/// active platform keys (see the module doc for the order of checks). Returns the parsed envelope,
/// whose nonce the caller must then check and remember.
pub fn verify_envelope(
    keys: &[PlatformPublicKey],
    header: Option<&str>,
    method: &str,
    path_and_query: &str,
    body: &[u8],
    now: i64,
    max_skew_secs: i64,
) -> Result<Envelope, EnvelopeError> {
    let envelope = Envelope::parse(header.ok_or(EnvelopeError::Missing)?)?;
    let key = keys
        .iter()
        .find(|k| k.key_id() == envelope.key_id)
        .ok_or(EnvelopeError::UnknownKey)?;
    if (i128::from(now) - i128::from(envelope.ts)).abs() > i128::from(max_skew_secs) {
        return Err(EnvelopeError::Stale);
    }
    // A line break inside a field would let one message stand for another.
    if [method, path_and_query]
        .iter()
        .any(|f| f.contains(['\n', '\r']))
    {
        return Err(EnvelopeError::BadSignature);
    }
    let msg = envelope_message(envelope.ts, &envelope.nonce, method, path_and_query, body);
    if key.verify(msg.as_bytes(), &envelope.sig) {
        Ok(envelope)
    } else {
        Err(EnvelopeError::BadSignature)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    const NONCE: &str = "00112233445566778899aabbccddeeff";

    #[test]
    fn sign_verify_and_refusals() {
        let key = PlatformSigningKey::from_seed(&[3u8; 32]);
        let other = PlatformSigningKey::from_seed(&[4u8; 32]);
        let keys = [other.public_key(), key.public_key()];
        let h = sign_envelope(&key, 1_700_000_000, NONCE, "POST", "/v1/storage", b"{}");
        let v = |h: Option<&str>, m: &str, p: &str, b: &[u8], now: i64| {
            verify_envelope(&keys, h, m, p, b, now, 300)
        };
        let ok = v(Some(&h), "POST", "/v1/storage", b"{}", 1_700_000_300).unwrap();
        assert_eq!(ok.nonce, NONCE);
        assert_eq!(ok.key_id, key.key_id());
        assert_eq!(
            v(None, "POST", "/v1/storage", b"{}", 1_700_000_000),
            Err(EnvelopeError::Missing)
        );
        assert_eq!(
            v(
                Some(&format!("{h},")),
                "POST",
                "/v1/storage",
                b"{}",
                1_700_000_000
            ),
            Err(EnvelopeError::Malformed)
        );
        assert_eq!(
            v(Some(&h), "POST", "/v1/storage", b"{}", 1_700_000_301),
            Err(EnvelopeError::Stale)
        );
        assert_eq!(
            v(Some(&h), "POST", "/v1/storage", b"{ }", 1_700_000_000),
            Err(EnvelopeError::BadSignature)
        );
        assert_eq!(
            v(Some(&h), "POST", "/v1/proxy", b"{}", 1_700_000_000),
            Err(EnvelopeError::BadSignature)
        );
        assert_eq!(
            v(Some(&h), "POST", "/v1/storage\n", b"{}", 1_700_000_000),
            Err(EnvelopeError::BadSignature)
        );
        assert_eq!(
            verify_envelope(
                &[other.public_key()],
                Some(&h),
                "POST",
                "/v1/storage",
                b"{}",
                1_700_000_000,
                300
            ),
            Err(EnvelopeError::UnknownKey)
        );
        assert!(format!("{key:?}").contains("redacted"));
        assert_eq!(EnvelopeError::Stale.error_code(), ErrorCode::AuthFailed);
    }

    #[test]
    fn key_files() {
        let key = PlatformSigningKey::from_seed(&[5u8; 32]);
        let public = key.public_key();
        let b64 = public.to_base64();
        assert_eq!(PlatformPublicKey::parse(public.as_bytes()).unwrap(), public);
        assert_eq!(
            PlatformPublicKey::parse(format!("{b64}\n").as_bytes()).unwrap(),
            public
        );
        let doc = serde_json::to_vec(&public.identity_document()).unwrap();
        assert_eq!(PlatformPublicKey::parse(&doc).unwrap(), public);
        let mut wrong = public.identity_document();
        wrong.key_id = "0000000000000000".into();
        assert_eq!(
            PlatformPublicKey::parse(&serde_json::to_vec(&wrong).unwrap()),
            Err(PlatformKeyError::Invalid)
        );
        assert_eq!(
            PlatformPublicKey::parse(b"AAAA"),
            Err(PlatformKeyError::Encoding)
        );
        // The identity point is a weak key.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert_eq!(
            PlatformPublicKey::from_bytes(&identity),
            Err(PlatformKeyError::Invalid)
        );
        let seed_b64 = STANDARD.encode([5u8; 32]);
        assert_eq!(
            PlatformSigningKey::from_file_bytes(seed_b64.as_bytes())
                .unwrap()
                .key_id(),
            key.key_id()
        );
        assert_eq!(
            PlatformSigningKey::from_file_bytes(&[5u8; 32])
                .unwrap()
                .key_id(),
            key.key_id()
        );
        assert_eq!(new_envelope_nonce().len(), 32);
    }
}
