//! Credentials: encrypt and store what the owner's browser sends, decrypt for ticket holders,
//! and derive TOTP codes, all with the key ring in memory.

use keyholder_protocol::document::{open_document, seal_token_data, DocumentError, OpenedToken};
use keyholder_protocol::wire::{Collection, TotpCodeResponse};
use rusqlite::{params, OptionalExtension};
use serde_json::{Map, Value};
use zeroize::Zeroize;

use super::collections::validate_key;
use super::keyring::KeyRing;
use super::sealed::{self, SealedInputs};
use super::{from_store, into_store, Vault, VaultError};

/// How `/v1/store` treats an existing credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreMode {
    /// Replace it (the default).
    Overwrite,
    /// Refuse with `already_exists`.
    Create,
}

impl StoreMode {
    /// From the ticket's `mode` claim.
    pub fn from_claim(mode: Option<&str>) -> Result<StoreMode, VaultError> {
        match mode {
            None | Some("overwrite") => Ok(StoreMode::Overwrite),
            Some("create") => Ok(StoreMode::Create),
            Some(_) => Err(VaultError::Invalid("unknown store mode".into())),
        }
    }
}

/// A decrypted credential with its sealed inputs (no Debug: it holds secrets).
pub struct OpenedCredential {
    /// The credential's fields and meta.
    pub token: OpenedToken,
    /// What was sealed at store time beside them (minting inputs, provider), if anything.
    pub sealed: Option<SealedInputs>,
}

/// Opens a stored document: the sealed inputs are taken out first (so they never show among the
/// credential's fields) and opened on their own.
pub fn open_with_inputs(
    doc: &Value,
    service: &str,
    keys: &KeyRing,
) -> Result<OpenedCredential, VaultError> {
    let (rest, sealed_text) = sealed::detach(doc);
    let token =
        open_document(rest.as_ref().unwrap_or(doc), service, keys).map_err(document_error)?;
    let sealed = match sealed_text {
        Some(text) => Some(sealed::open(keys, service, &text)?),
        None => None,
    };
    Ok(OpenedCredential { token, sealed })
}

/// Overwrites every string in a JSON value (plaintext credentials leave memory when dropped).
pub fn scrub(value: &mut Value) {
    match value {
        Value::String(s) => s.zeroize(),
        Value::Array(items) => items.iter_mut().for_each(scrub),
        Value::Object(map) => map.values_mut().for_each(scrub),
        _ => {}
    }
}

pub(super) fn document_error(err: DocumentError) -> VaultError {
    match err {
        DocumentError::NotAString(field) => {
            VaultError::Invalid(format!("'{field}' must be a non-empty string"))
        }
        other => {
            tracing::error!(error = %other, "stored credential cannot be opened");
            VaultError::Undecryptable
        }
    }
}

impl Vault {
    /// Encrypts `token_data` and stores it as the credential of `service`; returns its meta.
    /// Nothing plaintext is written: the sealed document is built in memory first.
    pub async fn store_credential(
        &self,
        service: &str,
        mut token_data: Map<String, Value>,
        mode: StoreMode,
        creation_id: Option<&str>,
    ) -> Result<Map<String, Value>, VaultError> {
        let result = self
            .store_credential_once(service, &token_data, mode, creation_id)
            .await;
        let result = match result {
            // The owner rotated or retired a data key since our last reload: follow, then retry once.
            Err(VaultError::KeyRingChanged) => {
                self.reload_from_disk(false).await?;
                self.store_credential_once(service, &token_data, mode, creation_id)
                    .await
            }
            other => other,
        };
        token_data.values_mut().for_each(scrub);
        result
    }

    async fn store_credential_once(
        &self,
        service: &str,
        token_data: &Map<String, Value>,
        mode: StoreMode,
        creation_id: Option<&str>,
    ) -> Result<Map<String, Value>, VaultError> {
        self.ensure_unsealed()?;
        validate_key(service)?;
        if token_data.is_empty() {
            return Err(VaultError::Invalid("'tokenData' must not be empty".into()));
        }
        let existing = self
            .storage_get(Collection::Tokens, service.to_string())
            .await?;
        if mode == StoreMode::Create && existing.is_some() {
            return Err(VaultError::AlreadyExists);
        }
        let created_at = existing
            .as_ref()
            .and_then(|d| d.get("meta"))
            .and_then(|m| m.get("createdAt"))
            .and_then(Value::as_str)
            .map(str::to_string);
        let keys = self.keys();
        let key = keys.current_data_key()?;
        let version = keys.current_data_version();
        let (mut rest, inputs) = sealed::split_token_data(token_data)?;
        let sealed = seal_token_data(
            service,
            &rest,
            key,
            version,
            crate::clock::now_unix(),
            created_at.as_deref(),
            creation_id,
        );
        rest.values_mut().for_each(scrub);
        let mut sealed = sealed.map_err(document_error)?;
        if let Some(inputs) = &inputs {
            sealed::attach(&mut sealed, inputs, key, version, service)?;
        }
        let meta = sealed
            .get("meta")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        let text = sealed.to_string();
        let service_name = service.to_string();
        let service = service.to_string();
        let now = crate::clock::now_unix();
        let written = self.store()
            .write(move |conn| {
                // Written under the version that is current on disk, never under one the owner has
                // since rotated away from (and perhaps retired).
                let current = crate::store::get_setting(conn, "data_version")?;
                if current.as_deref() != Some(version.to_string().as_str()) {
                    return Err(into_store(VaultError::KeyRingChanged));
                }
                if mode == StoreMode::Create {
                    let exists: Option<i64> = conn
                        .query_row(
                            "SELECT 1 FROM documents WHERE collection = 'tokens' AND key = ?1",
                            [&service],
                            |r| r.get(0),
                        )
                        .optional()?;
                    if exists.is_some() {
                        return Err(into_store(VaultError::AlreadyExists));
                    }
                }
                conn.execute(
                    "INSERT INTO documents(collection, key, doc, updated_at) VALUES ('tokens', ?1, ?2, ?3)
                     ON CONFLICT(collection, key) DO UPDATE SET doc = excluded.doc, updated_at = excluded.updated_at",
                    params![service, text, now],
                )?;
                conn.execute("DELETE FROM legacy_minting WHERE service = ?1", [&service])?;
                Ok(())
            })
            .await
            .map_err(from_store);
        // Whatever the outcome, a cached copy may now be stale.
        self.cache.invalidate(Collection::Tokens, &service_name);
        written?;
        Ok(meta)
    }

    /// Decrypts the credential of `service`.
    pub async fn open_credential(&self, service: &str) -> Result<OpenedToken, VaultError> {
        Ok(self.open_credential_full(service).await?.token)
    }

    /// Decrypts the credential of `service` and its sealed inputs (see [`super::sealed`]).
    pub async fn open_credential_full(
        &self,
        service: &str,
    ) -> Result<OpenedCredential, VaultError> {
        self.ensure_unsealed()?;
        validate_key(service)?;
        let doc = self
            .document(Collection::Tokens, service.to_string())
            .await?
            .ok_or(VaultError::TokenNotFound)?;
        let keys = self.keys();
        // Checked again right before decrypting: a seal that arrived during the read applies.
        self.ensure_unsealed()?;
        match open_with_inputs(&doc, service, &keys) {
            Ok(opened) => Ok(opened),
            // The owner may have re-encrypted and retired a key since this copy was cached:
            // forget it and try once more from the database.
            Err(_) if self.cache.get(Collection::Tokens, service).is_some() => {
                self.cache.invalidate(Collection::Tokens, service);
                let doc = self
                    .document(Collection::Tokens, service.to_string())
                    .await?
                    .ok_or(VaultError::TokenNotFound)?;
                open_with_inputs(&doc, service, &self.keys())
            }
            Err(err) => Err(err),
        }
    }

    /// The current TOTP code of a `tokenType: TOTP` credential.
    pub async fn totp_code(&self, service: &str) -> Result<TotpCodeResponse, VaultError> {
        let token = self.open_credential(service).await?;
        let is_totp = token
            .meta()
            .get("tokenType")
            .and_then(Value::as_str)
            .is_some_and(|t| t.eq_ignore_ascii_case("totp"));
        if !is_totp {
            return Err(VaultError::NotTotp);
        }
        let secret = token.secret("totpSecret").ok_or(VaultError::NotTotp)?;
        totp_now(secret, crate::clock::now_unix())
    }
}

/// Computes the TOTP code at `now` from an `otpauth://` URI or a base32 secret
/// (SHA1, 6 digits, 30 s unless the URI says otherwise).
pub fn totp_now(secret: &str, now: i64) -> Result<TotpCodeResponse, VaultError> {
    let invalid = || {
        VaultError::Invalid(
            "the stored TOTP secret is not a valid otpauth URI or base32 secret".into(),
        )
    };
    let totp = if secret.trim_start().starts_with("otpauth://") {
        totp_rs::TOTP::from_url_unchecked(secret.trim()).map_err(|_| invalid())?
    } else {
        let cleaned: String = secret
            .chars()
            .filter(|c| !c.is_whitespace() && *c != '-')
            .collect::<String>()
            .to_uppercase();
        let bytes = totp_rs::Secret::Encoded(cleaned)
            .to_bytes()
            .map_err(|_| invalid())?;
        totp_rs::TOTP::new_unchecked(
            totp_rs::Algorithm::SHA1,
            6,
            1,
            30,
            bytes,
            None,
            String::new(),
        )
    };
    if totp.step == 0 || !(6..=8).contains(&totp.digits) {
        return Err(invalid());
    }
    let now = u64::try_from(now).unwrap_or(0);
    Ok(TotpCodeResponse {
        code: totp.generate(now),
        remaining_seconds: totp.step - (now % totp.step),
        period: totp.step,
        digits: totp.digits as u32,
    })
}
