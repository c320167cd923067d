//! 32-byte secrets (the HMAC secret and AES data keys): zeroized on drop, never printed, cloned or serialized.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use rand::rngs::OsRng;
use rand::RngCore as _;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use zeroize::Zeroizing;

/// Why bytes could not become a 32-byte key. Never contains key bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyLengthError {
    /// The key was not exactly 32 bytes long.
    #[error("key must be 32 bytes, got {actual}")]
    WrongLength {
        /// The length received.
        actual: usize,
    },
    /// The text was not canonical standard base64.
    #[error("key is not canonical standard base64")]
    InvalidBase64,
}

fn array_from_slice(b: &[u8]) -> Result<Zeroizing<[u8; 32]>, KeyLengthError> {
    if b.len() != 32 {
        return Err(KeyLengthError::WrongLength { actual: b.len() });
    }
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(b);
    Ok(out)
}

fn array_from_base64(s: &str) -> Result<Zeroizing<[u8; 32]>, KeyLengthError> {
    // 32 bytes are 44 base64 chars; refuse anything much longer before allocating.
    if s.len() > 64 {
        return Err(KeyLengthError::WrongLength {
            actual: s.len() / 4 * 3,
        });
    }
    let decoded = Zeroizing::new(
        STANDARD
            .decode(s)
            .map_err(|_| KeyLengthError::InvalidBase64)?,
    );
    array_from_slice(&decoded)
}

fn random_array() -> Zeroizing<[u8; 32]> {
    let mut out = Zeroizing::new([0u8; 32]);
    OsRng.fill_bytes(out.as_mut());
    out
}

fn to_base64(bytes: &[u8; 32]) -> Zeroizing<String> {
    let mut out = Zeroizing::new(String::with_capacity(44));
    STANDARD.encode_string(bytes, &mut out);
    out
}

/// What a 32-byte secret is for: names the type in `Debug` output and keeps the kinds apart (an
/// HMAC secret is never usable as a data key, or the other way round).
pub trait SecretKind {
    /// The type's name in `Debug` output.
    const NAME: &'static str;
}

/// Marks the webhook's HMAC secret.
pub enum HmacKind {}
impl SecretKind for HmacKind {
    const NAME: &'static str = "HmacSecret";
}

/// Marks an AES-256-GCM data key.
pub enum DataKind {}
impl SecretKind for DataKind {
    const NAME: &'static str = "DataKey";
}

/// A 32-byte secret of kind `K`: zeroized on drop, never printed, cloned or serialized.
pub struct Secret32<K: SecretKind>(Zeroizing<[u8; 32]>, std::marker::PhantomData<fn() -> K>);

/// The webhook's 32-byte HMAC secret (request signatures, tickets, bind `hmac_hash`).
pub type HmacSecret = Secret32<HmacKind>;

/// A 32-byte AES-256-GCM data key that encrypts stored credential fields.
pub type DataKey = Secret32<DataKind>;

impl<K: SecretKind> Secret32<K> {
    fn new(bytes: Zeroizing<[u8; 32]>) -> Self {
        Secret32(bytes, std::marker::PhantomData)
    }

    /// A fresh secret from the OS random generator.
    pub fn generate() -> Self {
        Self::new(random_array())
    }

    /// Wrap raw bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self::new(Zeroizing::new(bytes))
    }

    /// Copy from a slice that must be exactly 32 bytes.
    pub fn from_slice(b: &[u8]) -> Result<Self, KeyLengthError> {
        array_from_slice(b).map(Self::new)
    }

    /// Decode canonical standard (padded) base64 of exactly 32 bytes.
    pub fn from_base64(s: &str) -> Result<Self, KeyLengthError> {
        array_from_base64(s).map(Self::new)
    }

    /// The raw bytes, for use at the point of signing or encryption only.
    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }

    /// Standard base64 (as sent in the exchange response, or for key files).
    pub fn to_base64(&self) -> Zeroizing<String> {
        to_base64(&self.0)
    }

    /// Constant-time equality.
    pub fn ct_eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&*other.0).into()
    }
}

impl Secret32<HmacKind> {
    /// Lowercase hex SHA-256 of the raw secret bytes (the bind `hmac_hash`).
    pub fn sha256_hex(&self) -> String {
        crate::hex::encode(&Sha256::digest(self.0.as_ref()))
    }
}

impl<K: SecretKind> std::fmt::Debug for Secret32<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}(<redacted>)", K::NAME)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    const GOLDEN_B64: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

    fn golden_bytes() -> [u8; 32] {
        let mut b = [0u8; 32];
        for (i, x) in b.iter_mut().enumerate() {
            *x = i as u8;
        }
        b
    }

    #[test]
    fn golden_hmac_hash_and_base64() {
        let s = HmacSecret::from_base64(GOLDEN_B64).unwrap();
        assert_eq!(s.expose(), &golden_bytes());
        assert_eq!(
            s.sha256_hex(),
            "630dcd2966c4336691125448bbb25b4ff412a49c732db2c8abc1b8581bd710dd"
        );
        assert_eq!(s.to_base64().as_str(), GOLDEN_B64);
        assert!(s.ct_eq(&HmacSecret::from_bytes(golden_bytes())));
        assert!(!s.ct_eq(&HmacSecret::generate()));
    }

    #[test]
    fn strict_base64_and_length() {
        // missing padding, non-canonical trailing bits, whitespace, wrong length
        assert_eq!(
            HmacSecret::from_base64("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8").unwrap_err(),
            KeyLengthError::InvalidBase64
        );
        assert_eq!(
            HmacSecret::from_base64("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh9=").unwrap_err(),
            KeyLengthError::InvalidBase64
        );
        assert!(HmacSecret::from_base64(" AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=").is_err());
        assert_eq!(
            DataKey::from_base64("AAEC").unwrap_err(),
            KeyLengthError::WrongLength { actual: 3 }
        );
        assert!(DataKey::from_slice(&[0u8; 31]).is_err());
        assert!(DataKey::from_slice(&[0u8; 32]).is_ok());
    }

    #[test]
    fn debug_is_redacted() {
        let s = HmacSecret::from_bytes(golden_bytes());
        assert_eq!(format!("{s:?}"), "HmacSecret(<redacted>)");
        assert_eq!(format!("{:?}", DataKey::generate()), "DataKey(<redacted>)");
    }
}
