//! Identity pinning: the keyholder's Ed25519 response-signing key, pinned by key id or public key. Once
//! pinned, every answer's `X-Keyholder-Signature` is checked with `keyholder_protocol::response_sig`.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ed25519_dalek::VerifyingKey;
use keyholder_protocol::response_sig::{self, ResponseSigError, ResponseSignature};
use keyholder_protocol::IdentityDocument;

use crate::error::Error;

/// Which identity the client insists on.
///
/// A key-id pin is resolved on first use by fetching `GET /v1/identity` and checking that the document is
/// valid and carries the pinned key id; a public-key pin needs no fetch.
#[derive(Debug, Clone)]
pub enum IdentityPin {
    /// The first 16 lowercase hex characters of SHA-256 of the public key.
    KeyId(String),
    /// The full public key.
    Key(PinnedIdentity),
}

impl IdentityPin {
    /// Pin by key id (16 lowercase hex characters, as printed by `keyholder` and in `/v1/identity`).
    ///
    /// ```
    /// use keyholder_client::IdentityPin;
    /// assert!(IdentityPin::key_id("56475aa75463474c").is_ok());
    /// assert!(IdentityPin::key_id("56475AA75463474C").is_err());
    /// ```
    pub fn key_id(key_id: &str) -> Result<Self, Error> {
        if key_id.len() == 16
            && key_id
                .bytes()
                .all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
        {
            Ok(IdentityPin::KeyId(key_id.to_owned()))
        } else {
            Err(Error::Config(
                "an identity key id is 16 lowercase hex characters".into(),
            ))
        }
    }

    /// Pin an Ed25519 public key.
    pub fn public_key(key: VerifyingKey) -> Self {
        IdentityPin::Key(PinnedIdentity::from_public_key(key))
    }

    /// Pin the key of an identity document (`{"keyId","publicKey","algorithm"}`), after checking it.
    pub fn document(doc: &IdentityDocument) -> Result<Self, Error> {
        PinnedIdentity::from_document(doc).map(IdentityPin::Key)
    }

    /// Parse what an operator passes on a command line: a key id, a standard-base64 public key, or the
    /// JSON of an identity document.
    ///
    /// ```
    /// use keyholder_client::IdentityPin;
    /// let pin = IdentityPin::parse("A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg=").unwrap();
    /// assert_eq!(pin.expected_key_id(), "56475aa75463474c");
    /// ```
    pub fn parse(text: &str) -> Result<Self, Error> {
        let text = text.trim();
        if text.starts_with('{') {
            let doc: IdentityDocument = serde_json::from_str(text)
                .map_err(|_| Error::Config("not an identity document".into()))?;
            return IdentityPin::document(&doc);
        }
        if text.len() == 16 {
            return IdentityPin::key_id(text);
        }
        let raw = STANDARD
            .decode(text)
            .map_err(|_| Error::Config("not a key id, public key or identity document".into()))?;
        let bytes: [u8; 32] = raw
            .as_slice()
            .try_into()
            .map_err(|_| Error::Config("an Ed25519 public key is 32 bytes".into()))?;
        let key = VerifyingKey::from_bytes(&bytes)
            .map_err(|_| Error::Config("not a valid Ed25519 public key".into()))?;
        Ok(IdentityPin::public_key(key))
    }

    /// The key id this pin expects.
    pub fn expected_key_id(&self) -> &str {
        match self {
            IdentityPin::KeyId(id) => id,
            IdentityPin::Key(identity) => identity.key_id(),
        }
    }
}

/// A resolved identity: the public key every answer must be signed with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinnedIdentity {
    key: VerifyingKey,
    key_id: String,
}

impl PinnedIdentity {
    /// From a public key.
    pub fn from_public_key(key: VerifyingKey) -> Self {
        PinnedIdentity {
            key_id: response_sig::key_id(&key),
            key,
        }
    }

    /// From an identity document, checked by the protocol crate (algorithm, encoding, key id).
    pub fn from_document(doc: &IdentityDocument) -> Result<Self, Error> {
        let key = doc
            .verifying_key()
            .map_err(|_| Error::Protocol("invalid identity document".into()))?;
        Ok(PinnedIdentity::from_public_key(key))
    }

    /// The key id.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The public key.
    pub fn public_key(&self) -> &VerifyingKey {
        &self.key
    }

    /// Check one answer's `X-Keyholder-Signature` with
    /// [`keyholder_protocol::response_sig::verify_response`]. `request_id` is the id the client sent (so an
    /// old signed answer cannot be replayed for a new request) and `path_and_query` the exact target sent.
    ///
    /// ```
    /// use keyholder_client::PinnedIdentity;
    /// use keyholder_protocol::response_sig::sign_response;
    /// use keyholder_protocol::IdentityKey;
    ///
    /// let key = IdentityKey::from_bytes(&[7u8; 32]);
    /// let pinned = PinnedIdentity::from_public_key(key.verifying_key());
    /// let header = sign_response(&key, 1_700_000_000, "GET", "/v1/health", "kh_1", 200, b"{}");
    /// assert!(pinned.verify(Some(&header), "GET", "/v1/health", "kh_1", 200, b"{}").is_ok());
    /// assert!(pinned.verify(Some(&header), "GET", "/v1/health", "kh_2", 200, b"{}").is_err());
    /// assert!(pinned.verify(None, "GET", "/v1/health", "kh_1", 200, b"{}").is_err());
    /// ```
    pub fn verify(
        &self,
        signature_header: Option<&str>,
        method: &str,
        path_and_query: &str,
        request_id: &str,
        status: u16,
        body: &[u8],
    ) -> Result<ResponseSignature, Error> {
        let header = signature_header.ok_or_else(|| Error::MissingResponseSignature {
            status,
            request_id: request_id.to_owned(),
        })?;
        response_sig::verify_response(
            &self.key,
            header,
            method,
            path_and_query,
            request_id,
            status,
            body,
        )
        .map_err(|reason: ResponseSigError| Error::ResponseSignature {
            status,
            request_id: request_id.to_owned(),
            reason,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    //! The protocol crate's vectors, and its response-signature cases once more through the client's own
    //! verification path ([`PinnedIdentity::verify`]).
    use super::*;
    use serde_json::Value;

    #[test]
    fn protocol_vectors_pass() {
        let failures = keyholder_protocol::vectors::failures();
        assert!(failures.is_empty(), "{failures:#?}");
    }

    fn text<'a>(case: &'a Value, key: &str) -> &'a str {
        case[key].as_str().unwrap()
    }

    #[test]
    fn response_signature_vectors_through_the_client() {
        let (_, file) = keyholder_protocol::vectors::FILES
            .iter()
            .find(|(name, _)| *name == "response_signatures.json")
            .unwrap();
        let doc: Value = serde_json::from_str(file).unwrap();
        let mut ran = 0;
        for case in doc["cases"].as_array().unwrap() {
            let name = text(case, "name");
            match text(case, "op") {
                "verify" => {
                    let pin = IdentityPin::parse(text(case, "public_key_base64")).unwrap();
                    let IdentityPin::Key(pinned) = pin else {
                        panic!("{name}: a public key pins a key")
                    };
                    let got = pinned.verify(
                        Some(text(case, "header")),
                        text(case, "method"),
                        text(case, "path_and_query"),
                        text(case, "request_id"),
                        case["status"].as_u64().unwrap() as u16,
                        text(case, "body").as_bytes(),
                    );
                    let expected = &case["expected"];
                    match (got, expected.get("ok"), expected.get("error")) {
                        (Ok(parsed), Some(ok), None) => {
                            assert_eq!(parsed.key_id, ok["keyId"].as_str().unwrap(), "{name}");
                            assert_eq!(parsed.ts, ok["ts"].as_i64().unwrap(), "{name}");
                        }
                        (Err(Error::ResponseSignature { reason, .. }), None, Some(err)) => {
                            assert_eq!(format!("{reason:?}"), err.as_str().unwrap(), "{name}");
                        }
                        (got, _, _) => panic!("{name}: expected {expected}, got {got:?}"),
                    }
                    ran += 1;
                }
                "identity_verify" => {
                    let doc: IdentityDocument =
                        serde_json::from_value(case["document"].clone()).unwrap();
                    let ok = case["expected"].get("ok").is_some();
                    assert_eq!(IdentityPin::document(&doc).is_ok(), ok, "{name}");
                    ran += 1;
                }
                _ => {}
            }
        }
        assert!(ran >= 10, "only {ran} cases ran");
    }
}
