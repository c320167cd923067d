//! Stored credential documents (PROTOCOL.md §4): our AEAD field format, the platform's v1 shape, plaintext
//! documents, sealing `/v1/store` token data and opening documents for `/v1/credential`.
//!
//! # Keyholder field format (`kh1`)
//!
//! `kh1:<key version>:<base64>` where the key version is canonical decimal (no sign, no leading zeros) and
//! `<base64>` is standard padded base64 of `nonce (12 bytes) ‖ ciphertext ‖ tag (16 bytes)`, AES-256-GCM
//! with a fresh random nonce per field. The associated data binds the ciphertext to its place:
//! `b"keyholder/v1/field"`, then each of service, field name and key version (decimal ASCII) as a
//! big-endian `u32` length followed by the bytes. A ciphertext moved to another service, field or key
//! version fails to decrypt. Our documents are
//! `{"v":2,"alg":"AES-256-GCM","fields":{<field>:"kh1:.."},"meta":{..}}`.
//!
//! # Platform v1 format
//!
//! `{"v":1,"alg":"AES-256-GCM","fields":{<field>:"<std base64 of IV(12) ‖ ciphertext ‖ tag(16)>"},"meta":{..}}`,
//! no associated data, UTF-8 plaintexts. Read (for migration), never written by the keyholder.
//!
//! Without associated data nothing in a v1 ciphertext says where it belongs, so whoever holds a
//! [`KeyLookup`] decides which v1 ciphertexts its platform key may open: [`open_document`] asks for
//! the key with the service, the field name and the ciphertext's digest
//! ([`platform_v1_field_digest`]: SHA-256 of the decoded bytes `IV ‖ ciphertext ‖ tag`). The keyholder
//! records those three for every v1 field it imports and opens a v1 field only where it was
//! imported, so a ciphertext copied to another service or field does not decrypt.

use std::collections::BTreeMap;

use aes_gcm::aead::{Aead as _, KeyInit as _, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use rand::rngs::OsRng;
use rand::RngCore as _;
use serde_json::{json, Map, Value};
use zeroize::{Zeroize as _, Zeroizing};

use crate::secret::DataKey;

/// Fields that are always encrypted, never in `meta`, never in a list. `sealedInputs` is the
/// keyholder's own (minting inputs and signing keys sealed at store time); listing it here keeps it
/// encrypted through any re-seal of a document. `secretAccessKey` and `sessionToken` are the secret
/// halves of an AWS credential (`tokenType: "aws"`), which the keyholder signs with (SigV4).
pub const SENSITIVE_FIELDS: [&str; 10] = [
    "accessToken",
    "refreshToken",
    "certificateData",
    "privateKeyData",
    "certificateChain",
    "sshPrivateKey",
    "totpSecret",
    "sealedInputs",
    "secretAccessKey",
    "sessionToken",
];

/// Prefix of our field format.
pub const FIELD_PREFIX: &str = "kh1:";
/// Domain label at the start of the associated data.
pub const FIELD_AAD_LABEL: &[u8] = b"keyholder/v1/field";
/// The `alg` value of encrypted documents.
pub const DOCUMENT_ALG: &str = "AES-256-GCM";
/// The `v` of documents the keyholder writes.
pub const DOCUMENT_VERSION: u64 = 2;
/// Longest encrypted field text accepted (longer is `Malformed`).
pub const MAX_FIELD_TEXT_LEN: usize = 1024 * 1024;

const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// True for the sensitive field names.
pub fn is_sensitive(field: &str) -> bool {
    SENSITIVE_FIELDS.contains(&field)
}

/// Why a field or document could not be sealed or opened. Opaque: never includes plaintext.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DocumentError {
    /// The field text or document does not have the expected shape or encoding.
    #[error("malformed encrypted document or field")]
    Malformed,
    /// A field was encrypted under a key version we do not have.
    #[error("unknown data key version {0}")]
    UnknownKeyVersion(u32),
    /// A platform v1 field, but no platform key that may open it here (none held, or the
    /// ciphertext was not imported as this service's field).
    #[error("platform v1 field but no platform key for it")]
    NoPlatformKey,
    /// Authentication failed: wrong key, tampered or moved ciphertext.
    #[error("decryption failed")]
    DecryptionFailed,
    /// A sensitive or encrypted field is not a non-empty JSON string.
    #[error("field {0} must be a non-empty string")]
    NotAString(String),
    /// A decrypted field is not UTF-8.
    #[error("field {0} did not decrypt to UTF-8 text")]
    NotUtf8(String),
    /// The document's `v` or `alg` is not one we read.
    #[error("unsupported document version or algorithm")]
    UnsupportedDocument,
}

/// The format of one encrypted field value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldFormat {
    /// Our `kh1:` format under the given data key version.
    Keyholder {
        /// The data key version.
        key_version: u32,
    },
    /// The platform's v1 format (anything not starting with `kh1:`).
    PlatformV1,
}

fn field_aad(service: &str, field: &str, key_version: u32) -> Vec<u8> {
    let version = key_version.to_string();
    let mut aad = Vec::with_capacity(
        FIELD_AAD_LABEL.len() + 12 + service.len() + field.len() + version.len(),
    );
    aad.extend_from_slice(FIELD_AAD_LABEL);
    for part in [service.as_bytes(), field.as_bytes(), version.as_bytes()] {
        // Service and field names are far below 4 GiB; saturate rather than wrap if one ever is not.
        let len = u32::try_from(part.len()).unwrap_or(u32::MAX);
        aad.extend_from_slice(&len.to_be_bytes());
        aad.extend_from_slice(part);
    }
    aad
}

fn random_nonce() -> [u8; NONCE_LEN] {
    let mut nonce = [0u8; NONCE_LEN];
    OsRng.fill_bytes(&mut nonce);
    nonce
}

/// `nonce ‖ AES-256-GCM(key, nonce, plaintext, aad)`.
fn seal(key: &DataKey, nonce: [u8; NONCE_LEN], plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
    let cipher = Aes256Gcm::new(key.expose().into());
    // AES-GCM refuses only plaintexts over 64 GiB, which no JSON field can reach.
    #[allow(clippy::expect_used)]
    let ciphertext = cipher
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .expect("AES-GCM plaintext under 64 GiB");
    let mut out = Vec::with_capacity(NONCE_LEN + ciphertext.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ciphertext);
    out
}

fn open(key: &DataKey, sealed: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>, DocumentError> {
    if sealed.len() < NONCE_LEN + TAG_LEN {
        return Err(DocumentError::Malformed);
    }
    let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
    let cipher = Aes256Gcm::new(key.expose().into());
    cipher
        .decrypt(
            Nonce::from_slice(nonce),
            Payload {
                msg: ciphertext,
                aad,
            },
        )
        .map(Zeroizing::new)
        .map_err(|_| DocumentError::DecryptionFailed)
}

/// Encrypt one field in our `kh1` format with a fresh random nonce.
pub fn encrypt_field(
    key: &DataKey,
    key_version: u32,
    service: &str,
    field: &str,
    plaintext: &[u8],
) -> String {
    encrypt_field_with_nonce(key, key_version, service, field, plaintext, random_nonce())
}

/// [`encrypt_field`] with a caller-chosen nonce: for deterministic test vectors only. Never reuse a nonce.
#[doc(hidden)]
pub fn encrypt_field_with_nonce(
    key: &DataKey,
    key_version: u32,
    service: &str,
    field: &str,
    plaintext: &[u8],
    nonce: [u8; 12],
) -> String {
    let sealed = seal(
        key,
        nonce,
        plaintext,
        &field_aad(service, field, key_version),
    );
    format!("{FIELD_PREFIX}{key_version}:{}", STANDARD.encode(sealed))
}

/// Canonical decimal `u32`: digits only, no leading zeros.
fn parse_version(s: &str) -> Option<u32> {
    let canonical = !s.is_empty()
        && s.len() <= 10
        && s.bytes().all(|c| c.is_ascii_digit())
        && (s == "0" || !s.starts_with('0'));
    if canonical {
        s.parse().ok()
    } else {
        None
    }
}

/// Split `kh1:<version>:<base64>` strictly.
fn parse_kh1(value: &str) -> Result<(u32, &str), DocumentError> {
    let rest = value
        .strip_prefix(FIELD_PREFIX)
        .ok_or(DocumentError::Malformed)?;
    let (version, b64) = rest.split_once(':').ok_or(DocumentError::Malformed)?;
    let version = parse_version(version).ok_or(DocumentError::Malformed)?;
    Ok((version, b64))
}

fn decode_sealed(b64: &str) -> Result<Vec<u8>, DocumentError> {
    if b64.len() > MAX_FIELD_TEXT_LEN {
        return Err(DocumentError::Malformed);
    }
    let raw = STANDARD.decode(b64).map_err(|_| DocumentError::Malformed)?;
    if raw.len() < NONCE_LEN + TAG_LEN {
        return Err(DocumentError::Malformed);
    }
    Ok(raw)
}

/// Which format a field value is in (and, for ours, the key version).
pub fn field_key_version(value: &str) -> Result<FieldFormat, DocumentError> {
    if value.starts_with(FIELD_PREFIX) {
        parse_kh1(value).map(|(key_version, _)| FieldFormat::Keyholder { key_version })
    } else {
        Ok(FieldFormat::PlatformV1)
    }
}

/// Decrypt a `kh1` field of `service`/`field` with the key of its version.
pub fn decrypt_field(
    key: &DataKey,
    service: &str,
    field: &str,
    value: &str,
) -> Result<Zeroizing<Vec<u8>>, DocumentError> {
    let (version, b64) = parse_kh1(value)?;
    let sealed = decode_sealed(b64)?;
    open(key, &sealed, &field_aad(service, field, version))
}

/// Encrypt in the platform's v1 format (no associated data); for migration tests.
pub fn encrypt_platform_v1_field(key: &DataKey, plaintext: &[u8]) -> String {
    STANDARD.encode(seal(key, random_nonce(), plaintext, b""))
}

/// The digest that identifies a platform v1 field's ciphertext: SHA-256 of its decoded bytes
/// (`IV ‖ ciphertext ‖ tag`), so every base64 spelling of one ciphertext has one digest.
pub fn platform_v1_field_digest(value: &str) -> Result<[u8; 32], DocumentError> {
    use sha2::{Digest as _, Sha256};
    let sealed = decode_sealed(value)?;
    Ok(Sha256::digest(&sealed).into())
}

/// Decrypt a platform v1 field.
pub fn decrypt_platform_v1_field(
    key: &DataKey,
    value: &str,
) -> Result<Zeroizing<Vec<u8>>, DocumentError> {
    let sealed = decode_sealed(value)?;
    open(key, &sealed, b"")
}

/// Key lookup used when opening a document: returns the data key of a version.
pub trait KeyLookup {
    /// The data key of `version`, if held.
    fn data_key(&self, version: u32) -> Option<&DataKey>;
    /// The key that may open the platform v1 ciphertext with `digest` ([`platform_v1_field_digest`])
    /// as field `field` of service `service`, if any: the implementor decides where v1 ciphertexts,
    /// which carry no associated data, belong.
    fn platform_v1_key(&self, service: &str, field: &str, digest: &[u8; 32]) -> Option<&DataKey>;
}

/// A simple in-memory [`KeyLookup`] (test vectors, and checking a reference webhook's own files
/// before they are imported).
#[derive(Debug, Default)]
pub struct KeySet {
    /// Data keys by version.
    pub keys: BTreeMap<u32, DataKey>,
    /// The platform v1 key: opens every v1 field, wherever it is (the keyholder's own key ring
    /// binds each imported v1 ciphertext to its service and field instead).
    pub platform_v1: Option<DataKey>,
}

impl KeyLookup for KeySet {
    fn data_key(&self, version: u32) -> Option<&DataKey> {
        self.keys.get(&version)
    }
    fn platform_v1_key(
        &self,
        _service: &str,
        _field: &str,
        _digest: &[u8; 32],
    ) -> Option<&DataKey> {
        self.platform_v1.as_ref()
    }
}

/// Encrypt a tokenData object from /v1/store into our document shape:
/// `{"v":2,"alg":"AES-256-GCM","fields":{<sensitive field>:"kh1:.."},"meta":{..}}`.
///
/// Meta holds every non-sensitive tokenData field verbatim, then these computed ones: `serviceName`
/// (tokenData's non-empty string, else `service`), `tokenType` (tokenData's non-empty string, else
/// `oauth`), `createdAt` (`existing_created_at`, else now), `updatedAt` (now), `expiryTime`, `hasRefreshToken`,
/// `hasCertificate`, `hasPrivateKey`, `hasSSHKey`, `hasTotpSecret`, and `creationId` when given.
///
/// `expiryTime` (integer ms) comes from `expiresAt` when given (an ISO 8601 string, or a number: ms when
/// `>= 10^11`, else seconds), else from `expiryTime` (a number of ms, or an ISO 8601 string); when neither
/// yields a time, `expiryTime` is left out of meta.
///
/// Sensitive values must be non-empty JSON strings, else `NotAString(field)`.
pub fn seal_token_data(
    service: &str,
    token_data: &Map<String, Value>,
    key: &DataKey,
    key_version: u32,
    now_unix: i64,
    existing_created_at: Option<&str>,
    creation_id: Option<&str>,
) -> Result<Value, DocumentError> {
    let mut fields = Map::new();
    let mut meta = Map::new();
    for (name, value) in token_data {
        if is_sensitive(name) {
            let text = value
                .as_str()
                .filter(|s| !s.is_empty())
                .ok_or_else(|| DocumentError::NotAString(name.clone()))?;
            fields.insert(
                name.clone(),
                Value::String(encrypt_field(
                    key,
                    key_version,
                    service,
                    name,
                    text.as_bytes(),
                )),
            );
        } else {
            meta.insert(name.clone(), value.clone());
        }
    }
    let non_empty = |k: &str| {
        token_data
            .get(k)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    let now = format_iso8601(now_unix);
    meta.insert(
        "serviceName".into(),
        json!(non_empty("serviceName").unwrap_or(service)),
    );
    meta.insert(
        "tokenType".into(),
        json!(non_empty("tokenType").unwrap_or("oauth")),
    );
    meta.insert(
        "createdAt".into(),
        json!(existing_created_at.unwrap_or(&now)),
    );
    meta.insert("updatedAt".into(), json!(now));
    match expiry_ms(token_data) {
        Some(ms) => meta.insert("expiryTime".into(), json!(ms)),
        None => meta.remove("expiryTime"),
    };
    for (flag, field) in [
        ("hasRefreshToken", "refreshToken"),
        ("hasCertificate", "certificateData"),
        ("hasPrivateKey", "privateKeyData"),
        ("hasSSHKey", "sshPrivateKey"),
        ("hasTotpSecret", "totpSecret"),
    ] {
        meta.insert(flag.into(), json!(fields.contains_key(field)));
    }
    if let Some(id) = creation_id {
        meta.insert("creationId".into(), json!(id));
    }
    Ok(json!({
        "v": DOCUMENT_VERSION,
        "alg": DOCUMENT_ALG,
        "fields": fields,
        "meta": meta,
    }))
}

fn number_ms(v: &Value) -> Option<i64> {
    v.as_i64().or_else(|| {
        v.as_f64()
            .filter(|f| f.is_finite() && f.abs() < 9.0e15)
            .map(|f| f as i64)
    })
}

fn expiry_ms(token_data: &Map<String, Value>) -> Option<i64> {
    let from_expires_at = token_data.get("expiresAt").and_then(|v| match v {
        Value::String(s) => parse_iso8601(s).and_then(|secs| secs.checked_mul(1000)),
        Value::Number(_) => number_ms(v).and_then(|n| {
            if n.abs() >= 100_000_000_000 {
                Some(n)
            } else {
                n.checked_mul(1000)
            }
        }),
        _ => None,
    });
    from_expires_at.or_else(|| {
        token_data.get("expiryTime").and_then(|v| match v {
            Value::String(s) => parse_iso8601(s).and_then(|secs| secs.checked_mul(1000)),
            Value::Number(_) => number_ms(v),
            _ => None,
        })
    })
}

enum FieldValue {
    Secret(Zeroizing<String>),
    Plain(Value),
}

/// Decrypted view of a stored document. No Debug/Clone/Serialize; secrets are zeroized on drop.
pub struct OpenedToken {
    fields: BTreeMap<String, FieldValue>,
    meta: Map<String, Value>,
}

/// Where credential JSON goes: first counted (to size the buffer once), then written.
trait Sink {
    fn put(&mut self, bytes: &[u8]);
}

struct Counter(usize);

impl Sink for Counter {
    fn put(&mut self, bytes: &[u8]) {
        self.0 += bytes.len();
    }
}

impl Sink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// Write a JSON string literal without intermediate copies.
fn put_json_str(out: &mut impl Sink, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.put(b"\"");
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: Option<&[u8]> = match b {
            b'"' => Some(b"\\\""),
            b'\\' => Some(b"\\\\"),
            b'\n' => Some(b"\\n"),
            b'\r' => Some(b"\\r"),
            b'\t' => Some(b"\\t"),
            0x08 => Some(b"\\b"),
            0x0c => Some(b"\\f"),
            _ => None,
        };
        if escape.is_none() && b >= 0x20 {
            continue;
        }
        out.put(&bytes[start..i]);
        match escape {
            Some(e) => out.put(e),
            None => out.put(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0x0f)],
            ]),
        }
        start = i + 1;
    }
    out.put(&bytes[start..]);
    out.put(b"\"");
}

impl OpenedToken {
    /// A decrypted field as text (`None` if absent or, in a plaintext document, not a string).
    pub fn secret(&self, field: &str) -> Option<&str> {
        match self.fields.get(field)? {
            FieldValue::Secret(s) => Some(s.as_str()),
            FieldValue::Plain(Value::String(s)) => Some(s.as_str()),
            FieldValue::Plain(_) => None,
        }
    }

    /// The document's meta (never secret).
    pub fn meta(&self) -> &Map<String, Value> {
        &self.meta
    }

    /// Names of the decrypted (or plaintext) fields.
    pub fn field_names(&self) -> impl Iterator<Item = &str> {
        self.fields.keys().map(String::as_str)
    }

    fn write_credential(&self, out: &mut impl Sink) {
        out.put(b"{\"token\":{");
        let mut first = true;
        let mut sep = |out: &mut dyn FnMut(&[u8])| {
            if !first {
                out(b",");
            }
            first = false;
        };
        for (name, value) in &self.fields {
            sep(&mut |b| out.put(b));
            put_json_str(out, name);
            out.put(b":");
            match value {
                FieldValue::Secret(s) => put_json_str(out, s),
                FieldValue::Plain(v) => out.put(Zeroizing::new(v.to_string()).as_bytes()),
            }
        }
        for (name, value) in &self.meta {
            if self.fields.contains_key(name) {
                continue;
            }
            sep(&mut |b| out.put(b));
            put_json_str(out, name);
            out.put(b":");
            out.put(value.to_string().as_bytes());
        }
        out.put(b"}}");
    }

    /// The exact `/v1/credential` response body: `{"token":{<decrypted fields>, <meta fields not already
    /// present>}}`, written into a zeroizing buffer sized up front (so no stray copies are left behind).
    pub fn credential_json(&self) -> Zeroizing<Vec<u8>> {
        let mut counter = Counter(0);
        self.write_credential(&mut counter);
        let mut out = Zeroizing::new(Vec::with_capacity(counter.0));
        self.write_credential(&mut *out);
        out
    }
}

fn into_text(
    field: &str,
    mut plaintext: Zeroizing<Vec<u8>>,
) -> Result<Zeroizing<String>, DocumentError> {
    let bytes = std::mem::take(&mut *plaintext);
    match String::from_utf8(bytes) {
        Ok(s) => Ok(Zeroizing::new(s)),
        Err(e) => {
            e.into_bytes().zeroize();
            Err(DocumentError::NotUtf8(field.to_owned()))
        }
    }
}

/// Open a stored document: our v2 shape (fields in `kh1` format, any key version via `keys`), the
/// platform's v1 shape (each field needs `keys.platform_v1_key(service, field, digest)`), or a plaintext document (no `fields`: every
/// top-level field except `meta` is returned as-is; meta from `meta` if present).
///
/// With `v` = 2 every field must be `kh1`; with `v` = 1 every field must be platform v1; without `v` each
/// field's format is detected.
pub fn open_document(
    doc: &Value,
    service: &str,
    keys: &dyn KeyLookup,
) -> Result<OpenedToken, DocumentError> {
    let obj = doc.as_object().ok_or(DocumentError::Malformed)?;
    let meta = match obj.get("meta") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => return Err(DocumentError::Malformed),
    };
    let mut out = BTreeMap::new();
    let Some(fields) = obj.get("fields") else {
        for (name, value) in obj {
            if name == "meta" {
                continue;
            }
            let v = match value {
                Value::String(s) => FieldValue::Secret(Zeroizing::new(s.clone())),
                other => FieldValue::Plain(other.clone()),
            };
            out.insert(name.clone(), v);
        }
        return Ok(OpenedToken { fields: out, meta });
    };
    let fields = fields.as_object().ok_or(DocumentError::Malformed)?;
    let version = match obj.get("v") {
        None => None,
        Some(v) => match v.as_u64() {
            Some(n @ (1 | 2)) => Some(n),
            _ => return Err(DocumentError::UnsupportedDocument),
        },
    };
    if obj
        .get("alg")
        .is_some_and(|a| a.as_str() != Some(DOCUMENT_ALG))
    {
        return Err(DocumentError::UnsupportedDocument);
    }
    for (name, value) in fields {
        let text = value
            .as_str()
            .ok_or_else(|| DocumentError::NotAString(name.clone()))?;
        let plaintext = match (field_key_version(text)?, version) {
            (FieldFormat::Keyholder { key_version }, None | Some(2)) => {
                let key = keys
                    .data_key(key_version)
                    .ok_or(DocumentError::UnknownKeyVersion(key_version))?;
                decrypt_field(key, service, name, text)?
            }
            (FieldFormat::PlatformV1, None | Some(1)) => {
                let digest = platform_v1_field_digest(text)?;
                let key = keys
                    .platform_v1_key(service, name, &digest)
                    .ok_or(DocumentError::NoPlatformKey)?;
                decrypt_platform_v1_field(key, text)?
            }
            _ => return Err(DocumentError::Malformed),
        };
        out.insert(
            name.clone(),
            FieldValue::Secret(into_text(name, plaintext)?),
        );
    }
    Ok(OpenedToken { fields: out, meta })
}

/// Key versions referenced by a document's `kh1` fields, sorted and deduplicated (for rotation and
/// retire checks). Platform v1 and plaintext fields reference none.
pub fn document_key_versions(doc: &Value) -> Vec<u32> {
    let mut versions: Vec<u32> = doc
        .get("fields")
        .and_then(Value::as_object)
        .map(|fields| {
            fields
                .values()
                .filter_map(Value::as_str)
                .filter_map(|s| match field_key_version(s) {
                    Ok(FieldFormat::Keyholder { key_version }) => Some(key_version),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    versions.sort_unstable();
    versions.dedup();
    versions
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// ISO 8601 `YYYY-MM-DDTHH:MM:SSZ` (UTC) from unix seconds. Meant for years 0000-9999.
pub fn format_iso8601(unix: i64) -> String {
    let (days, secs) = (unix.div_euclid(86_400), unix.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

fn digits(b: &[u8]) -> Option<i64> {
    if b.is_empty() || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(b.iter().fold(0i64, |acc, c| acc * 10 + i64::from(c - b'0')))
}

/// Parse `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)` strictly into unix seconds (fraction truncated).
pub fn parse_iso8601(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 || b.len() > 40 {
        return None;
    }
    if b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let year = digits(&b[0..4])?;
    let month = digits(&b[5..7])?;
    let day = digits(&b[8..10])?;
    let hour = digits(&b[11..13])?;
    let minute = digits(&b[14..16])?;
    let second = digits(&b[17..19])?;
    let mut rest = &b[19..];
    if let Some(frac) = rest.strip_prefix(b".") {
        let n = frac.iter().take_while(|c| c.is_ascii_digit()).count();
        if n == 0 || n > 9 {
            return None;
        }
        rest = &frac[n..];
    }
    let offset = match rest {
        b"Z" => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let oh = digits(&[*h1, *h2])?;
            let om = digits(&[*m1, *m2])?;
            if oh > 23 || om > 59 {
                return None;
            }
            let off = oh * 3600 + om * 60;
            if *sign == b'-' {
                -off
            } else {
                off
            }
        }
        _ => return None,
    };
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return None,
    };
    if day < 1 || day > month_days || hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second - offset)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn keys() -> KeySet {
        let mut k = KeySet::default();
        k.keys.insert(1, DataKey::from_bytes([1u8; 32]));
        k.keys.insert(2, DataKey::from_bytes([2u8; 32]));
        k.platform_v1 = Some(DataKey::from_bytes([9u8; 32]));
        k
    }

    #[test]
    fn field_round_trip_and_binding() {
        let k = keys();
        let key = k.data_key(1).unwrap();
        let ct = encrypt_field(key, 1, "github", "accessToken", b"gho_x");
        assert!(ct.starts_with("kh1:1:"));
        assert_eq!(
            field_key_version(&ct).unwrap(),
            FieldFormat::Keyholder { key_version: 1 }
        );
        assert_eq!(
            &*decrypt_field(key, "github", "accessToken", &ct).unwrap(),
            b"gho_x"
        );
        assert_eq!(
            decrypt_field(key, "gitlab", "accessToken", &ct),
            Err(DocumentError::DecryptionFailed)
        );
        assert_eq!(
            decrypt_field(key, "github", "refreshToken", &ct),
            Err(DocumentError::DecryptionFailed)
        );
        let relabeled = ct.replacen("kh1:1:", "kh1:2:", 1);
        assert_eq!(
            decrypt_field(key, "github", "accessToken", &relabeled),
            Err(DocumentError::DecryptionFailed)
        );
        let zero_padded = ct.replacen("kh1:1:", "kh1:01:", 1);
        assert_eq!(
            decrypt_field(key, "github", "accessToken", &zero_padded),
            Err(DocumentError::Malformed)
        );
        assert_ne!(ct, encrypt_field(key, 1, "github", "accessToken", b"gho_x"));
        let v1 = encrypt_platform_v1_field(key, b"plain");
        assert_eq!(field_key_version(&v1).unwrap(), FieldFormat::PlatformV1);
        assert_eq!(&*decrypt_platform_v1_field(key, &v1).unwrap(), b"plain");
    }

    #[test]
    fn seal_and_open() {
        let k = keys();
        let td: Map<String, Value> = serde_json::from_value(json!({
            "accessToken": "gho_secret\"\n\u{1}é",
            "refreshToken": "ghr_secret",
            "scopes": ["repo"],
            "expiresAt": "2030-01-01T00:00:00Z",
            "tokenType": "",
        }))
        .unwrap();
        let doc = seal_token_data(
            "github",
            &td,
            k.data_key(2).unwrap(),
            2,
            1_700_000_000,
            None,
            Some("c1"),
        )
        .unwrap();
        let text = doc.to_string();
        assert!(!text.contains("secret"));
        let meta = &doc["meta"];
        assert_eq!(meta["serviceName"], "github");
        assert_eq!(meta["tokenType"], "oauth");
        assert_eq!(meta["createdAt"], "2023-11-14T22:13:20Z");
        assert_eq!(meta["expiryTime"], json!(1_893_456_000_000i64));
        assert_eq!(meta["hasRefreshToken"], true);
        assert_eq!(meta["hasSSHKey"], false);
        assert_eq!(meta["creationId"], "c1");
        assert_eq!(meta["scopes"], json!(["repo"]));
        assert_eq!(document_key_versions(&doc), vec![2]);

        let opened = open_document(&doc, "github", &k).unwrap();
        assert_eq!(opened.secret("refreshToken"), Some("ghr_secret"));
        let cred: Value = serde_json::from_slice(&opened.credential_json()).unwrap();
        assert_eq!(cred["token"]["accessToken"], "gho_secret\"\n\u{1}é");
        assert_eq!(cred["token"]["serviceName"], "github");
        assert_eq!(
            opened.field_names().collect::<Vec<_>>(),
            ["accessToken", "refreshToken"]
        );
        assert!(matches!(
            open_document(&doc, "gitlab", &k),
            Err(DocumentError::DecryptionFailed)
        ));

        let bad: Map<String, Value> = serde_json::from_value(json!({"accessToken": 5})).unwrap();
        assert_eq!(
            seal_token_data("s", &bad, k.data_key(1).unwrap(), 1, 0, None, None).unwrap_err(),
            DocumentError::NotAString("accessToken".into())
        );
        let empty: Map<String, Value> = serde_json::from_value(json!({"totpSecret": ""})).unwrap();
        assert!(seal_token_data("s", &empty, k.data_key(1).unwrap(), 1, 0, None, None).is_err());
    }

    #[test]
    fn platform_and_plaintext_documents() {
        let k = keys();
        let v1 = json!({"v":1,"alg":"AES-256-GCM","fields":{"accessToken": encrypt_platform_v1_field(k.platform_v1.as_ref().unwrap(), b"tok")},"meta":{"serviceName":"x","accessToken":"shadow"}});
        let opened = open_document(&v1, "anything", &k).unwrap();
        let cred: Value = serde_json::from_slice(&opened.credential_json()).unwrap();
        assert_eq!(
            cred,
            json!({"token":{"accessToken":"tok","serviceName":"x"}})
        );
        let no_platform = KeySet::default();
        assert!(matches!(
            open_document(&v1, "x", &no_platform),
            Err(DocumentError::NoPlatformKey)
        ));

        let plain = json!({"accessToken":"t","expires":5,"meta":{"tokenType":"api_key"}});
        let opened = open_document(&plain, "x", &k).unwrap();
        let cred: Value = serde_json::from_slice(&opened.credential_json()).unwrap();
        assert_eq!(
            cred,
            json!({"token":{"accessToken":"t","expires":5,"tokenType":"api_key"}})
        );
        assert_eq!(opened.secret("expires"), None);

        let mixed = json!({"v":2,"fields":{"accessToken": encrypt_platform_v1_field(k.platform_v1.as_ref().unwrap(), b"tok")}});
        assert!(matches!(
            open_document(&mixed, "x", &k),
            Err(DocumentError::Malformed)
        ));
        assert!(matches!(
            open_document(&json!({"v":3,"fields":{}}), "x", &k),
            Err(DocumentError::UnsupportedDocument)
        ));
        assert!(matches!(
            open_document(&json!([]), "x", &k),
            Err(DocumentError::Malformed)
        ));
        let unknown = json!({"fields":{"accessToken": encrypt_field(k.data_key(1).unwrap(), 7, "x", "accessToken", b"t")}});
        assert!(matches!(
            open_document(&unknown, "x", &k),
            Err(DocumentError::UnknownKeyVersion(7))
        ));
    }

    /// A lookup that opens one v1 ciphertext, only as one field of one service.
    struct BoundV1 {
        key: DataKey,
        service: &'static str,
        field: &'static str,
        digest: [u8; 32],
    }

    impl KeyLookup for BoundV1 {
        fn data_key(&self, _version: u32) -> Option<&DataKey> {
            None
        }
        fn platform_v1_key(
            &self,
            service: &str,
            field: &str,
            digest: &[u8; 32],
        ) -> Option<&DataKey> {
            (service == self.service && field == self.field && digest == &self.digest)
                .then_some(&self.key)
        }
    }

    #[test]
    fn platform_v1_fields_open_only_where_the_lookup_binds_them() {
        use sha2::Digest as _;
        let key = DataKey::from_bytes([9u8; 32]);
        let ct = encrypt_platform_v1_field(&key, b"tok");
        let digest = platform_v1_field_digest(&ct).unwrap();
        let raw = STANDARD.decode(&ct).unwrap();
        assert_eq!(digest, <[u8; 32]>::from(sha2::Sha256::digest(&raw)));
        let lookup = BoundV1 {
            key,
            service: "github",
            field: "accessToken",
            digest,
        };
        let doc = |field: &str| json!({"v": 1, "fields": {field: ct.clone()}});
        let opened = open_document(&doc("accessToken"), "github", &lookup).unwrap();
        assert_eq!(opened.secret("accessToken"), Some("tok"));
        // Another service, another field, another ciphertext: no key.
        for (service, field) in [("gitlab", "accessToken"), ("github", "refreshToken")] {
            assert!(matches!(
                open_document(&doc(field), service, &lookup),
                Err(DocumentError::NoPlatformKey)
            ));
        }
        let other = encrypt_platform_v1_field(&lookup.key, b"tok");
        let doc = json!({"v": 1, "fields": {"accessToken": other}});
        assert!(matches!(
            open_document(&doc, "github", &lookup),
            Err(DocumentError::NoPlatformKey)
        ));
        assert_eq!(
            platform_v1_field_digest("not base64!"),
            Err(DocumentError::Malformed)
        );
    }

    #[test]
    fn iso8601() {
        assert_eq!(format_iso8601(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_iso8601(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(format_iso8601(-1), "1969-12-31T23:59:59Z");
        assert_eq!(parse_iso8601("2023-11-14T22:13:20Z"), Some(1_700_000_000));
        assert_eq!(
            parse_iso8601("2023-11-14T22:13:20.999Z"),
            Some(1_700_000_000)
        );
        assert_eq!(
            parse_iso8601("2023-11-14T22:13:20+00:00"),
            Some(1_700_000_000)
        );
        assert_eq!(
            parse_iso8601("2023-11-14T23:13:20+01:00"),
            Some(1_700_000_000)
        );
        assert_eq!(parse_iso8601("2024-02-29T00:00:00Z"), Some(1_709_164_800));
        for bad in [
            "2023-02-29T00:00:00Z",
            "2023-11-14 22:13:20Z",
            "2023-11-14T22:13:20",
            "2023-11-14T24:00:00Z",
            "2023-11-14T22:13:20.Z",
            "2023-11-14T22:13:20Zx",
            "+023-11-14T22:13:20Z",
            "2023-11-14T22:13:20+0000",
            "",
        ] {
            assert_eq!(parse_iso8601(bad), None, "{bad}");
        }
    }
}
