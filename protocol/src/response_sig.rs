//! Ed25519 response signatures (`X-Keyholder-Signature`, a Keyholder extension) and the identity document.
//!
//! Header: `keyId=<16 hex>,ts=<unix seconds>,sig=<standard base64 of 64 bytes>`. Signed message: the UTF-8
//! of six lines joined by `\n`, no trailing newline: `keyholder-response-v1`, the `ts` value,
//! `<METHOD> <path-and-query>`, the response's `X-Request-Id` (empty if none), the status in decimal, and
//! the lowercase hex SHA-256 of the body bytes. `keyId` = first 16 lowercase hex of SHA-256(public key).
//!
//! Batch form: a server answering many requests at once may sign up to [`MAX_BATCH`] responses with one
//! signature. The header then goes on with `,batch=<index>/<size>,salt=<standard base64 of 16 bytes>,
//! path=<standard base64 of 32-byte hashes>`, 2 <= size <= 64, index < size. Each response's leaf is
//! `SHA-256(0x00 || salt || message)` (the six-line message above; the salt is random per response, so
//! the hashes of other responses in a path reveal nothing about them), the leaves form an RFC 9162
//! Merkle tree in index order ([`crate::merkle`]), `path` is the leaf's inclusion proof, and the
//! signature is over the three lines `keyholder-response-batch-v1`, the size in decimal and the
//! lowercase hex root. A verifier recomputes the root from its own response and the path.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use rand::rngs::OsRng;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use zeroize::Zeroizing;

/// First line of every signed response message.
pub const RESPONSE_SIG_LABEL: &str = "keyholder-response-v1";
/// First line of the message a batch signature signs.
pub const RESPONSE_BATCH_LABEL: &str = "keyholder-response-batch-v1";
/// Responses one batch signature covers at most (a proof has at most 6 hashes).
pub const MAX_BATCH: usize = 64;
/// The only algorithm of identity documents.
pub const ALGORITHM_ED25519: &str = "Ed25519";

/// The keyholder's Ed25519 response-signing key. Not printable, cloneable or serializable.
pub struct IdentityKey(SigningKey);

impl IdentityKey {
    /// A fresh key from the OS random generator.
    pub fn generate() -> Self {
        IdentityKey(SigningKey::generate(&mut OsRng))
    }

    /// The key for a 32-byte seed.
    pub fn from_bytes(seed: &[u8; 32]) -> Self {
        IdentityKey(SigningKey::from_bytes(seed))
    }

    /// The 32-byte seed, for storage.
    pub fn to_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.0.to_bytes())
    }

    /// The public key.
    pub fn verifying_key(&self) -> VerifyingKey {
        self.0.verifying_key()
    }

    /// The key id of the public key.
    pub fn key_id(&self) -> String {
        key_id(&self.verifying_key())
    }

    /// The public identity document served at `/v1/identity` and in the exchange response.
    pub fn identity_document(&self) -> IdentityDocument {
        let vk = self.verifying_key();
        IdentityDocument {
            key_id: key_id(&vk),
            public_key: STANDARD.encode(vk.as_bytes()),
            algorithm: ALGORITHM_ED25519.to_owned(),
        }
    }

    /// Sign raw bytes.
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.0.sign(msg).to_bytes()
    }
}

impl std::fmt::Debug for IdentityKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IdentityKey(keyId={}, <redacted>)", self.key_id())
    }
}

/// First 16 lowercase hex characters of SHA-256 of the 32-byte public key.
pub fn key_id(public: &VerifyingKey) -> String {
    let digest = Sha256::digest(public.as_bytes());
    crate::hex::encode(&digest[..8])
}

/// The public identity: `{"keyId","publicKey"(standard base64),"algorithm":"Ed25519"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IdentityDocument {
    /// Key id (16 lowercase hex).
    pub key_id: String,
    /// Standard base64 of the 32-byte public key.
    pub public_key: String,
    /// Always `Ed25519`.
    pub algorithm: String,
}

impl IdentityDocument {
    /// The public key, after checking the algorithm, the canonical encoding and that `keyId` matches.
    pub fn verifying_key(&self) -> Result<VerifyingKey, ResponseSigError> {
        if self.algorithm != ALGORITHM_ED25519 || self.public_key.len() != 44 {
            return Err(ResponseSigError::BadIdentity);
        }
        let raw = STANDARD
            .decode(&self.public_key)
            .map_err(|_| ResponseSigError::BadIdentity)?;
        let bytes: [u8; 32] = raw
            .as_slice()
            .try_into()
            .map_err(|_| ResponseSigError::BadIdentity)?;
        let vk = VerifyingKey::from_bytes(&bytes).map_err(|_| ResponseSigError::BadIdentity)?;
        if vk.is_weak() || key_id(&vk) != self.key_id {
            return Err(ResponseSigError::BadIdentity);
        }
        Ok(vk)
    }
}

/// The six-line message that is signed (see the module doc).
pub fn response_signing_message(
    ts: i64,
    method: &str,
    path_and_query: &str,
    request_id: &str,
    status: u16,
    body: &[u8],
) -> String {
    let body_hash = crate::hex::encode(&Sha256::digest(body));
    prehashed_message(ts, method, path_and_query, request_id, status, &body_hash)
}

fn prehashed_message(
    ts: i64,
    method: &str,
    path_and_query: &str,
    request_id: &str,
    status: u16,
    body_sha256_hex: &str,
) -> String {
    format!("{RESPONSE_SIG_LABEL}\n{ts}\n{method} {path_and_query}\n{request_id}\n{status}\n{body_sha256_hex}")
}

fn header_value(key: &IdentityKey, ts: i64, msg: &str) -> String {
    let sig = key.sign(msg.as_bytes());
    format!(
        "keyId={},ts={},sig={}",
        key.key_id(),
        ts,
        STANDARD.encode(sig)
    )
}

/// Sign a response; returns the `X-Keyholder-Signature` header value.
pub fn sign_response(
    key: &IdentityKey,
    ts: i64,
    method: &str,
    path_and_query: &str,
    request_id: &str,
    status: u16,
    body: &[u8],
) -> String {
    let msg = response_signing_message(ts, method, path_and_query, request_id, status, body);
    header_value(key, ts, &msg)
}

/// Pre-hashed variant so a server can hash a body once: `body_sha256_hex` is the lowercase hex SHA-256
/// of the body.
pub fn sign_response_prehashed(
    key: &IdentityKey,
    ts: i64,
    method: &str,
    path_and_query: &str,
    request_id: &str,
    status: u16,
    body_sha256_hex: &str,
) -> String {
    let msg = prehashed_message(
        ts,
        method,
        path_and_query,
        request_id,
        status,
        body_sha256_hex,
    );
    header_value(key, ts, &msg)
}

/// One response of a batch to sign: its signing time and its six-line message
/// ([`response_signing_message`]).
#[derive(Debug, Clone)]
pub struct ResponseToSign {
    /// Signing time, unix seconds (the `ts` of the message and the header).
    pub ts: i64,
    /// The six-line message.
    pub message: String,
}

/// Signs `responses` with one signature per [`MAX_BATCH`] of them and returns their
/// `X-Keyholder-Signature` header values in order. A batch of one gets the plain form.
pub fn sign_response_batch(key: &IdentityKey, responses: &[ResponseToSign]) -> Vec<String> {
    let salts: Vec<[u8; 16]> = responses.iter().map(|_| rand::random()).collect();
    sign_response_batch_salted(key, responses, &salts)
}

/// [`sign_response_batch`] with given salts (one per response; for test vectors).
pub fn sign_response_batch_salted(
    key: &IdentityKey,
    responses: &[ResponseToSign],
    salts: &[[u8; 16]],
) -> Vec<String> {
    let mut headers = Vec::with_capacity(responses.len());
    for (batch, salts) in responses.chunks(MAX_BATCH).zip(salts.chunks(MAX_BATCH)) {
        if let [single] = batch {
            headers.push(header_value(key, single.ts, &single.message));
            continue;
        }
        let leaves: Vec<crate::merkle::Hash> = batch
            .iter()
            .zip(salts)
            .map(|(r, salt)| crate::merkle::leaf_hash(&[salt, r.message.as_bytes()]))
            .collect();
        let Some((root, proofs)) = crate::merkle::root_and_proofs(&leaves) else {
            continue;
        };
        let sig = STANDARD.encode(key.sign(batch_message(batch.len(), &root).as_bytes()));
        let key_id = key.key_id();
        for (index, ((response, salt), proof)) in batch.iter().zip(salts).zip(proofs).enumerate() {
            headers.push(format!(
                "keyId={key_id},ts={},sig={sig},batch={index}/{},salt={},path={}",
                response.ts,
                batch.len(),
                STANDARD.encode(salt),
                STANDARD.encode(proof.concat()),
            ));
        }
    }
    headers
}

fn batch_message(size: usize, root: &crate::merkle::Hash) -> String {
    format!(
        "{RESPONSE_BATCH_LABEL}\n{size}\n{}",
        crate::hex::encode(root)
    )
}

/// Where a response signed in a batch sits in it (the header's batch form).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchProof {
    /// The response's leaf index.
    pub index: u32,
    /// Responses in the batch (2 to [`MAX_BATCH`]).
    pub size: u32,
    /// The response's leaf salt.
    pub salt: [u8; 16],
    /// The leaf's inclusion proof.
    pub path: Vec<[u8; 32]>,
}

/// A parsed `X-Keyholder-Signature` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseSignature {
    /// The signer's key id.
    pub key_id: String,
    /// Signing time, unix seconds.
    pub ts: i64,
    /// The raw signature.
    pub sig: [u8; 64],
    /// Present when the signature covers a batch of responses.
    pub batch: Option<BatchProof>,
}

impl ResponseSignature {
    /// Strict parse: exactly `keyId=<16 lowercase hex>,ts=<canonical integer>,sig=<canonical base64>`,
    /// optionally followed by `,batch=<index>/<size>,salt=<canonical base64>,path=<canonical base64>`.
    pub fn parse(header: &str) -> Result<Self, ResponseSigError> {
        if header.len() > 512 {
            return Err(ResponseSigError::Malformed);
        }
        let mut parts = header.split(',');
        let (k, t, s) = match (parts.next(), parts.next(), parts.next()) {
            (Some(k), Some(t), Some(s)) => (k, t, s),
            _ => return Err(ResponseSigError::Malformed),
        };
        let batch = match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (None, ..) => None,
            (Some(b), Some(salt), Some(path), None) => Some(parse_batch(b, salt, path)?),
            _ => return Err(ResponseSigError::Malformed),
        };
        let (key_id, ts) = parse_key_and_ts(k, t)?;
        let sig_text = s.strip_prefix("sig=").ok_or(ResponseSigError::Malformed)?;
        let sig: [u8; 64] = decode_exact(sig_text)?;
        Ok(ResponseSignature {
            key_id: key_id.to_owned(),
            ts,
            sig,
            batch,
        })
    }
}

/// Canonical standard base64 of exactly `N` bytes.
pub(crate) fn decode_exact<const N: usize>(text: &str) -> Result<[u8; N], ResponseSigError> {
    crate::compact::base64_exact::<N>(text).ok_or(ResponseSigError::Malformed)
}

/// The `keyId=<16 lowercase hex>` and `ts=<canonical integer>` fields that open both forms of
/// the response signature header (whole and streamed).
pub(crate) fn parse_key_and_ts<'a>(
    k: &'a str,
    t: &str,
) -> Result<(&'a str, i64), ResponseSigError> {
    let key_id = crate::compact::field(k, "keyId")
        .filter(|k| crate::hex::is_lower_hex(k, 16))
        .ok_or(ResponseSigError::Malformed)?;
    let ts = crate::compact::field(t, "ts")
        .and_then(crate::compact::canonical_i64)
        .ok_or(ResponseSigError::Malformed)?;
    Ok((key_id, ts))
}

/// Before a response signature is checked: it is by `key`, and no signed field holds a line
/// break (which would let one message stand for another).
pub(crate) fn check_signer_and_fields(
    key: &VerifyingKey,
    signed_by: &str,
    fields: [&str; 3],
) -> Result<(), ResponseSigError> {
    if signed_by != key_id(key) {
        return Err(ResponseSigError::UnknownKey);
    }
    if fields.iter().any(|f| f.contains(['\n', '\r'])) {
        return Err(ResponseSigError::BadSignature);
    }
    Ok(())
}

fn parse_count(text: &str) -> Result<u32, ResponseSigError> {
    text.parse::<u32>()
        .ok()
        .filter(|n| n.to_string() == text)
        .ok_or(ResponseSigError::Malformed)
}

fn parse_batch(batch: &str, salt: &str, path: &str) -> Result<BatchProof, ResponseSigError> {
    let (index, size) = batch
        .strip_prefix("batch=")
        .and_then(|b| b.split_once('/'))
        .ok_or(ResponseSigError::Malformed)?;
    let (index, size) = (parse_count(index)?, parse_count(size)?);
    if size < 2 || size as usize > MAX_BATCH || index >= size {
        return Err(ResponseSigError::Malformed);
    }
    let salt = decode_exact::<16>(
        salt.strip_prefix("salt=")
            .ok_or(ResponseSigError::Malformed)?,
    )?;
    let path_text = path
        .strip_prefix("path=")
        .ok_or(ResponseSigError::Malformed)?;
    // At most 6 hashes (a tree of 64); the exact number is checked when the root is computed.
    if path_text.is_empty() || path_text.len() > 256 {
        return Err(ResponseSigError::Malformed);
    }
    let raw = STANDARD
        .decode(path_text)
        .map_err(|_| ResponseSigError::Malformed)?;
    if raw.len() % 32 != 0 || STANDARD.encode(&raw) != path_text {
        return Err(ResponseSigError::Malformed);
    }
    let path = raw
        .chunks_exact(32)
        .filter_map(|c| <[u8; 32]>::try_from(c).ok())
        .collect();
    Ok(BatchProof {
        index,
        size,
        salt,
        path,
    })
}

/// Why a response signature was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ResponseSigError {
    /// The header does not have the exact format.
    #[error("malformed response signature")]
    Malformed,
    /// The key id is not the expected key's.
    #[error("response signed by an unknown key")]
    UnknownKey,
    /// The signature does not verify.
    #[error("bad response signature")]
    BadSignature,
    /// The signature time is outside the allowed window.
    #[error("stale response signature")]
    Stale,
    /// The identity document is invalid.
    #[error("invalid identity document")]
    BadIdentity,
}

/// Verify a response signature header against `key` (strict Ed25519 verification). Does not check `ts`
/// freshness; see [`verify_response_at`].
pub fn verify_response(
    key: &VerifyingKey,
    header: &str,
    method: &str,
    path_and_query: &str,
    request_id: &str,
    status: u16,
    body: &[u8],
) -> Result<ResponseSignature, ResponseSigError> {
    let parsed = ResponseSignature::parse(header)?;
    check_signer_and_fields(key, &parsed.key_id, [method, path_and_query, request_id])?;
    let msg = response_signing_message(parsed.ts, method, path_and_query, request_id, status, body);
    let signed = match parsed.batch.as_ref() {
        None => msg,
        Some(batch) => {
            let leaf = crate::merkle::leaf_hash(&[&batch.salt, msg.as_bytes()]);
            let root = crate::merkle::root_from_proof(
                u64::from(batch.index),
                u64::from(batch.size),
                &leaf,
                &batch.path,
            )
            .ok_or(ResponseSigError::BadSignature)?;
            batch_message(batch.size as usize, &root)
        }
    };
    key.verify_strict(signed.as_bytes(), &Signature::from_bytes(&parsed.sig))
        .map_err(|_| ResponseSigError::BadSignature)?;
    Ok(parsed)
}

/// [`verify_response`], then require `|now - ts| <= max_skew_secs` (else `Stale`).
#[allow(clippy::too_many_arguments)]
pub fn verify_response_at(
    key: &VerifyingKey,
    header: &str,
    method: &str,
    path_and_query: &str,
    request_id: &str,
    status: u16,
    body: &[u8],
    now: i64,
    max_skew_secs: i64,
) -> Result<ResponseSignature, ResponseSigError> {
    let parsed = verify_response(
        key,
        header,
        method,
        path_and_query,
        request_id,
        status,
        body,
    )?;
    if (i128::from(now) - i128::from(parsed.ts)).abs() > i128::from(max_skew_secs) {
        return Err(ResponseSigError::Stale);
    }
    Ok(parsed)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_and_refusals() {
        let key = IdentityKey::from_bytes(&[9u8; 32]);
        let vk = key.verifying_key();
        let h = sign_response(
            &key,
            1_700_000_000,
            "GET",
            "/v1/health",
            "req_1",
            200,
            b"{}",
        );
        let parsed = verify_response(&vk, &h, "GET", "/v1/health", "req_1", 200, b"{}").unwrap();
        assert_eq!(parsed.ts, 1_700_000_000);
        assert_eq!(parsed.key_id, key.key_id());
        let pre = sign_response_prehashed(
            &key,
            1_700_000_000,
            "GET",
            "/v1/health",
            "req_1",
            200,
            &crate::hex::encode(&Sha256::digest(b"{}")),
        );
        assert_eq!(pre, h);
        let bad =
            |m: &str, p: &str, r: &str, s: u16, b: &[u8]| verify_response(&vk, &h, m, p, r, s, b);
        assert_eq!(
            bad("GET", "/v1/health", "req_1", 201, b"{}"),
            Err(ResponseSigError::BadSignature)
        );
        assert_eq!(
            bad("GET", "/v1/health", "req_1", 200, b"{ }"),
            Err(ResponseSigError::BadSignature)
        );
        assert_eq!(
            bad("POST", "/v1/health", "req_1", 200, b"{}"),
            Err(ResponseSigError::BadSignature)
        );
        assert_eq!(
            bad("GET", "/v1/health?x", "req_1", 200, b"{}"),
            Err(ResponseSigError::BadSignature)
        );
        assert_eq!(
            bad("GET", "/v1/health", "", 200, b"{}"),
            Err(ResponseSigError::BadSignature)
        );
        let other = IdentityKey::from_bytes(&[8u8; 32]).verifying_key();
        assert_eq!(
            verify_response(&other, &h, "GET", "/v1/health", "req_1", 200, b"{}"),
            Err(ResponseSigError::UnknownKey)
        );
        assert_eq!(
            verify_response_at(
                &vk,
                &h,
                "GET",
                "/v1/health",
                "req_1",
                200,
                b"{}",
                1_700_000_301,
                300
            ),
            Err(ResponseSigError::Stale)
        );
        let doc = key.identity_document();
        assert_eq!(doc.verifying_key().unwrap(), vk);
        let mut wrong = doc.clone();
        wrong.key_id = "0000000000000000".into();
        assert_eq!(wrong.verifying_key(), Err(ResponseSigError::BadIdentity));
        let json = serde_json::to_string(&doc).unwrap();
        assert!(json.starts_with(r#"{"keyId":""#) && json.contains(r#""algorithm":"Ed25519""#));
        assert!(format!("{key:?}").contains("redacted"));
    }

    #[test]
    fn strict_header_parse() {
        let key = IdentityKey::from_bytes(&[9u8; 32]);
        let h = sign_response(&key, 5, "GET", "/", "", 200, b"");
        assert!(ResponseSignature::parse(&h).is_ok());
        let sig_part = h.split(",sig=").nth(1).unwrap();
        let kid = key.key_id();
        for bad in [
            format!("ts=5,keyId={kid},sig={sig_part}"),
            format!("keyId={kid}, ts=5,sig={sig_part}"),
            format!("keyId={kid},ts=05,sig={sig_part}"),
            format!("keyId={kid},ts=+5,sig={sig_part}"),
            format!("keyId={},ts=5,sig={sig_part}", kid.to_uppercase()),
            format!("keyId={kid}0,ts=5,sig={sig_part}"),
            format!("keyId={kid},ts=5,sig={}", sig_part.trim_end_matches('=')),
            format!("keyId={kid},ts=5,sig={sig_part},"),
            format!("keyId={kid},ts=5,sig={sig_part} "),
        ] {
            assert_eq!(
                ResponseSignature::parse(&bad),
                Err(ResponseSigError::Malformed),
                "{bad}"
            );
        }
    }

    #[test]
    fn batch_signatures_verify_each_response_and_nothing_else() {
        let key = IdentityKey::from_bytes(&[9u8; 32]);
        let vk = key.verifying_key();
        let responses: Vec<(String, Vec<u8>)> = (0..70)
            .map(|i| (format!("req_{i}"), format!("{{\"n\":{i}}}").into_bytes()))
            .collect();
        let to_sign: Vec<ResponseToSign> = responses
            .iter()
            .map(|(rid, body)| ResponseToSign {
                ts: 1_700_000_000,
                message: response_signing_message(
                    1_700_000_000,
                    "GET",
                    "/v1/credential",
                    rid,
                    200,
                    body,
                ),
            })
            .collect();
        // 70 = one batch of 64 and one of 6, with two signatures.
        let headers = sign_response_batch(&key, &to_sign);
        assert_eq!(headers.len(), 70);
        let sigs: std::collections::BTreeSet<&str> = headers
            .iter()
            .filter_map(|h| h.split(",sig=").nth(1)?.split(',').next())
            .collect();
        assert_eq!(sigs.len(), 2);
        for (i, ((rid, body), header)) in responses.iter().zip(&headers).enumerate() {
            let parsed =
                verify_response(&vk, header, "GET", "/v1/credential", rid, 200, body).unwrap();
            let batch = parsed.batch.unwrap();
            assert_eq!(
                (batch.index as usize, batch.size),
                (i % 64, if i < 64 { 64 } else { 6 })
            );
            // Another response's header, or this one with another body, does not verify.
            let other = &headers[(i + 1) % 70];
            assert_eq!(
                verify_response(&vk, other, "GET", "/v1/credential", rid, 200, body),
                Err(ResponseSigError::BadSignature)
            );
            assert_eq!(
                verify_response(&vk, header, "GET", "/v1/credential", rid, 200, b"{}"),
                Err(ResponseSigError::BadSignature)
            );
        }
        // A single response gets the plain form.
        let single = sign_response_batch(&key, &to_sign[..1]);
        assert_eq!(
            single[0],
            header_value(&key, 1_700_000_000, &to_sign[0].message)
        );
        assert!(sign_response_batch(&key, &[]).is_empty());

        // Tampering with the batch fields is refused.
        let h = &headers[3];
        let (head, tail) = h.split_once(",batch=").unwrap();
        let (_, rest) = tail.split_once(',').unwrap();
        let verify = |header: &str| {
            verify_response(
                &vk,
                header,
                "GET",
                "/v1/credential",
                "req_3",
                200,
                b"{\"n\":3}",
            )
        };
        for forged in [
            format!("{head},batch=4/64,{rest}"),
            format!("{head},batch=3/63,{rest}"),
            head.to_string(),
        ] {
            assert_eq!(
                verify(&forged),
                Err(ResponseSigError::BadSignature),
                "{forged}"
            );
        }
        let path = h.split(",path=").nth(1).unwrap();
        let short = STANDARD.encode(&STANDARD.decode(path).unwrap()[32..]);
        assert_eq!(
            verify(&h.replace(path, &short)),
            Err(ResponseSigError::BadSignature)
        );
        for malformed in [
            format!("{head},batch=3/65,{rest}"),
            format!("{head},batch=3/1,{rest}"),
            format!("{head},batch=64/64,{rest}"),
            format!("{head},batch=03/64,{rest}"),
            format!("{head},batch=3,{rest}"),
            format!("{h},"),
            h.replace(",salt=", ",salt=A"),
            h.replace(",path=", ",path=A"),
            h.replace(",path=", ",paths="),
            format!("{head},batch=3/64,salt=AAAAAAAAAAAAAAAAAAAAAA==,path="),
        ] {
            assert_eq!(
                verify(&malformed),
                Err(ResponseSigError::Malformed),
                "{malformed}"
            );
        }
    }
}
