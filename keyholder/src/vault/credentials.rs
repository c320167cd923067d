//! Credentials: encrypt and store what the owner's browser sends, decrypt for ticket holders
//! (the `/v1/credential` body starts here: documents cache, key ring, protocol), and derive TOTP
//! codes, all with the key ring in memory.

use keyholder_protocol::document::{
    format_iso8601, is_sensitive, open_document, seal_token_data, DocumentError, OpenedToken,
};
use keyholder_protocol::otpauth::{expand_totp_uri, parse_otpauth, TotpAlgorithm, TOTP_URI_FIELD};
use keyholder_protocol::wire::{Collection, TotpCodeResponse};
use keyholder_protocol::{DataKey, TicketClaims};
use serde_json::{json, Map, Value};
use zeroize::{Zeroize, Zeroizing};

use std::sync::Arc;

use super::collections::{validate_key, StorageService};
use super::key_handle::KeyHandle;
use super::keyring::KeyRing;
use super::minting::MintingService;
use super::reload::ReloadService;
use super::sealed::{self, SealedInputs};
use super::VaultError;
use crate::storage::{ChangeSet, Check, CredentialDocument, CredentialWrite, Write};
use crate::upstream::Upstream;

/// How `/v1/store` treats an existing credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreMode {
    /// Replace it (the default).
    Overwrite,
    /// Refuse with `already_exists`.
    Create,
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
    let token = open_document(rest.as_ref().unwrap_or(doc), service, keys).map_err(open_error)?;
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

/// Why a stored document could not be opened. Whatever is wrong with it (bad base64, wrong
/// shapes, fields that do not decrypt under this service), the platform may have written it with
/// `storage set`: `422 corrupt_document`, never a 5xx the platform would retry.
pub(super) fn open_error(err: DocumentError) -> VaultError {
    tracing::warn!(error = %err, "stored credential document cannot be opened");
    VaultError::CorruptDocument
}

/// Why a credential could not be sealed (its input was refused, or sealing failed).
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

/// The credentials service: stores and opens credentials (documents repository through the storage
/// service's cache, key ring from the key handle), and answers them as the protocol says.
pub struct CredentialsService {
    keys: Arc<KeyHandle>,
    documents: Arc<StorageService>,
    minting: Arc<MintingService>,
    reload: Arc<ReloadService>,
}

impl CredentialsService {
    /// The service over the documents, the key ring, minting, and the reload it retries after.
    pub fn new(
        keys: Arc<KeyHandle>,
        documents: Arc<StorageService>,
        minting: Arc<MintingService>,
        reload: Arc<ReloadService>,
    ) -> CredentialsService {
        CredentialsService {
            keys,
            documents,
            minting,
            reload,
        }
    }

    fn keys(&self) -> Arc<KeyRing> {
        self.keys.keys()
    }

    fn ensure_unsealed(&self) -> Result<(), VaultError> {
        self.keys.ensure_unsealed()
    }

    fn documents(&self) -> &super::documents::CachedDocuments {
        self.documents.documents()
    }

    /// Encrypts `token_data` and stores it as the credential of `service`; returns its meta.
    /// Nothing plaintext is written: the sealed document is built in memory first.
    pub async fn store_credential(
        &self,
        service: &str,
        mut token_data: Map<String, Value>,
        mode: StoreMode,
        creation_id: Option<&str>,
    ) -> Result<Map<String, Value>, VaultError> {
        // The creation id comes from the ticket alone (2.4.0): none in the ticket, none stored.
        if let Some(mut given) = token_data.remove("creationId") {
            scrub(&mut given);
        }
        // A totpUri link is never kept: its seed becomes the sealed totpSecret, its descriptors meta.
        if let Err(err) = expand_totp_uri(&mut token_data) {
            token_data.values_mut().for_each(scrub);
            return Err(VaultError::Invalid(format!(
                "'totpUri' is not a usable otpauth://totp/ link: {err}"
            )));
        }
        let result = self
            .store_credential_once(service, &token_data, mode, creation_id)
            .await;
        let result = match result {
            // The owner rotated or retired a data key since our last reload: follow, then retry once.
            Err(VaultError::KeyRingChanged) => {
                self.reload.reload_from_disk(false).await?;
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
            .documents
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
        let sealed = seal_credential(
            service,
            token_data,
            key,
            version,
            crate::clock::now_unix(),
            created_at.as_deref(),
            creation_id,
        )?;
        let meta = sealed
            .get("meta")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        let written = self
            .documents()
            .store_credential(CredentialDocument {
                service: service.to_string(),
                doc: sealed.to_string(),
                // Written under the version that is current on disk, never under one the owner
                // has since rotated away from (and perhaps retired).
                data_version: version,
                create_only: mode == StoreMode::Create,
                now: crate::clock::now_unix(),
            })
            .await?;
        match written {
            CredentialWrite::Stored => Ok(meta),
            CredentialWrite::KeyRingChanged => Err(VaultError::KeyRingChanged),
            CredentialWrite::AlreadyExists => Err(VaultError::AlreadyExists),
        }
    }

    /// The `/v1/credential` path, top-down: the stored document (through the documents cache),
    /// opened with the key ring, answered as the protocol's credential body.
    /// The access token to use for `service` (see [`MintingService::token_of`]).
    pub async fn access_token(
        &self,
        upstream: &Upstream,
        service: &str,
    ) -> Result<Zeroizing<String>, VaultError> {
        let credential = self.open_credential_full(service).await?;
        let mint = super::minting::detect(&credential)?;
        self.minting
            .token_of(upstream, service, credential, mint, "")
            .await
    }

    /// The `/v1/credential` body: for a minting credential, its meta with a minted `accessToken`
    /// (never the key); otherwise the decrypted credential.
    pub async fn credential_body(
        &self,
        upstream: &Upstream,
        service: &str,
    ) -> Result<Zeroizing<Vec<u8>>, VaultError> {
        let credential = self.open_credential_full(service).await?;
        // 2.4.0: a TOTP credential is answered with its current code, never its seed.
        if is_totp(&credential.token) {
            return totp_credential_json(&credential.token, service, crate::clock::now_unix());
        }
        let Some(kind) = super::minting::detect(&credential)? else {
            if credential.sealed.is_none()
                && credential.token.secret("privateKeyData").is_some()
                && self.minting.is_legacy_minting(service).await?
            {
                return Err(super::minting::legacy_minting_refusal());
            }
            return Ok(credential.token.credential_json());
        };
        let token = credential.token;
        let minted = self.minting.minted(upstream, service, &kind, "").await?;
        let mut fields: Map<String, Value> = token
            .meta()
            .iter()
            .filter(|(name, _)| !is_sensitive(name))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        fields.insert("accessToken".into(), json!(minted.token.as_str()));
        fields.insert("expiresAt".into(), json!(format_iso8601(minted.expires_at)));
        fields.insert("expiryTime".into(), json!(minted.expires_at * 1000));
        fields.insert("minted".into(), json!(true));
        let mut body = json!({ "token": fields });
        let bytes = Zeroizing::new(serde_json::to_vec(&body).unwrap_or_default());
        scrub(&mut body);
        Ok(bytes)
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
        crate::telemetry::timed(crate::telemetry::SPAN_DECRYPT, self.read_and_open(service)).await
    }

    async fn read_and_open(&self, service: &str) -> Result<OpenedCredential, VaultError> {
        self.ensure_unsealed()?;
        validate_key(service)?;
        let doc = self
            .documents
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
            Err(_)
                if self
                    .documents()
                    .cached(Collection::Tokens, service)
                    .is_some() =>
            {
                self.documents().forget(Collection::Tokens, service);
                let doc = self
                    .documents
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
        if !is_totp(&token) {
            return Err(VaultError::NotTotp);
        }
        token_totp_now(&token, crate::clock::now_unix())
    }

    /// Refuses with `stale_creation` when the ticket carries a `cid` that is not the stored token's
    /// `creationId` (in meta, or at the top level of a plaintext document). Without `cid`, no read.
    pub async fn check_creation(
        &self,
        service: &str,
        claims: &TicketClaims,
    ) -> Result<(), VaultError> {
        if matches!(claims.cid, None | Some(Value::Null)) {
            return Ok(());
        }
        let doc = self
            .documents
            .document(Collection::Tokens, service.to_string())
            .await?
            .ok_or(VaultError::TokenNotFound)?;
        let stored = doc
            .get("meta")
            .and_then(|m| m.get("creationId"))
            .or_else(|| doc.get("creationId"))
            .and_then(Value::as_str);
        claims.check_creation(stored).map_err(|_| {
            tracing::info!(
                service,
                "ticket for a replaced token refused (stale_creation)"
            );
            VaultError::StaleCreation
        })
    }
}

/// The sealed document of a credential: its fields under `key`, and the minting inputs and the
/// provider sealed apart in `sealedInputs` (the one sealing path of `/v1/store` and `keyholder store`).
fn seal_credential(
    service: &str,
    token_data: &Map<String, Value>,
    key: &DataKey,
    version: u32,
    now: i64,
    created_at: Option<&str>,
    creation_id: Option<&str>,
) -> Result<Value, VaultError> {
    super::signing::validate_material(token_data)?;
    let (mut rest, inputs) = sealed::split_token_data(token_data)?;
    let sealed = seal_token_data(service, &rest, key, version, now, created_at, creation_id);
    rest.values_mut().for_each(scrub);
    let mut sealed = sealed.map_err(document_error)?;
    if let Some(inputs) = &inputs {
        sealed::attach(&mut sealed, inputs, key, version, service)?;
    }
    Ok(sealed)
}

/// Seals `token_data` as the credential of `service` for the owner's `keyholder store` on the
/// data folder: under the data key current in storage (the ring `ring` was read with), keeping
/// the `createdAt` of a credential it replaces, like an overwriting `/v1/store`. `existing` is the
/// stored document as read; the change applies only if it is still that one and the data key
/// version unchanged, and it bumps the owner generation, so a running server drops its cached
/// copy within a quarter second. Returns the change and the meta.
pub fn store_on_disk(
    ring: &super::keyring::KeyRing,
    service: &str,
    token_data: &mut Map<String, Value>,
    existing: Option<&str>,
    now: i64,
) -> Result<(ChangeSet, Map<String, Value>), VaultError> {
    validate_key(service)?;
    if token_data.is_empty() {
        return Err(VaultError::Invalid("'tokenData' must not be empty".into()));
    }
    // As on `/v1/store`: a totpUri link is never kept, its seed is sealed as totpSecret.
    expand_totp_uri(token_data).map_err(|err| {
        VaultError::Invalid(format!(
            "'totpUri' is not a usable otpauth://totp/ link: {err}"
        ))
    })?;
    let created_at = existing
        .and_then(|text| serde_json::from_str::<Value>(text).ok())
        .and_then(|doc| {
            doc.get("meta")?
                .get("createdAt")?
                .as_str()
                .map(str::to_string)
        });
    let key = ring.current_data_key()?;
    let version = ring.current_data_version();
    let sealed = seal_credential(
        service,
        token_data,
        key,
        version,
        now,
        created_at.as_deref(),
        None,
    )?;
    let unchanged = match existing {
        Some(text) => Check::DocumentIs(Collection::Tokens, service.into(), text.into()),
        None => Check::DocumentAbsent(Collection::Tokens, service.into()),
    };
    let change = ChangeSet::owner()
        .check(Check::SettingIs(
            crate::storage::Setting::DataVersion,
            Some(version.to_string()),
        ))
        .check(unchanged)
        .write(Write::PutDocument {
            collection: Collection::Tokens,
            key: service.into(),
            doc: sealed.to_string(),
            now,
        })
        .write(Write::ClearLegacyMinting(service.into()));
    let meta = sealed
        .get("meta")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    Ok((change, meta))
}

/// True for a credential of `tokenType` TOTP (any case) that holds a seed.
pub fn is_totp(token: &OpenedToken) -> bool {
    token
        .meta()
        .get("tokenType")
        .and_then(Value::as_str)
        .is_some_and(|t| t.eq_ignore_ascii_case("totp"))
        && token.secret("totpSecret").is_some()
}

/// The `/v1/credential` body of a TOTP credential (PROTOCOL.md §7.6): its meta, the current code in
/// `accessToken` and the code's parameters; never the seed.
pub fn totp_credential_json(
    token: &OpenedToken,
    service: &str,
    now: i64,
) -> Result<Zeroizing<Vec<u8>>, VaultError> {
    let code = token_totp_now(token, now)?;
    let mut fields: Map<String, Value> = token
        .meta()
        .iter()
        .filter(|(name, _)| !is_sensitive(name) && name.as_str() != TOTP_URI_FIELD)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let service_name = token
        .meta()
        .get("serviceName")
        .and_then(Value::as_str)
        .unwrap_or(service)
        .to_string();
    fields.insert("accessToken".into(), json!(code.code));
    fields.insert("tokenType".into(), json!("TOTP"));
    fields.insert("serviceName".into(), json!(service_name));
    fields.insert("remainingSeconds".into(), json!(code.remaining_seconds));
    fields.insert("period".into(), json!(code.period));
    fields.insert("digits".into(), json!(code.digits));
    fields.insert("totpGenerated".into(), json!(true));
    let mut body = json!({ "token": fields });
    let bytes = Zeroizing::new(serde_json::to_vec(&body).unwrap_or_default());
    scrub(&mut body);
    Ok(bytes)
}

fn stored_invalid() -> VaultError {
    // The stored data is at fault, not the server: a 4xx, which the platform does not retry.
    VaultError::Invalid(
        "the stored TOTP secret or its parameters are not valid (store it again)".into(),
    )
}

/// The current code of a TOTP credential: from a sealed base32 seed with the meta descriptors
/// (`totpAlgorithm`, `totpDigits`, `totpPeriod`; defaults SHA1, 6, 30), or from a sealed
/// `otpauth://totp/` link (documents of the reference webhooks).
pub fn token_totp_now(token: &OpenedToken, now: i64) -> Result<TotpCodeResponse, VaultError> {
    let secret = token.secret("totpSecret").ok_or(VaultError::NotTotp)?;
    let meta = token.meta();
    if secret
        .trim_start()
        .get(..10)
        .is_some_and(|p| p.eq_ignore_ascii_case("otpauth://"))
    {
        let link = parse_otpauth(secret.trim()).map_err(|_| stored_invalid())?;
        return totp_now(link.secret(), link.algorithm, link.digits, link.period, now);
    }
    let algorithm = match meta.get("totpAlgorithm") {
        None | Some(Value::Null) => TotpAlgorithm::Sha1,
        Some(v) => v
            .as_str()
            .and_then(TotpAlgorithm::parse)
            .ok_or_else(stored_invalid)?,
    };
    let number =
        |name: &str, default: u64, range: std::ops::RangeInclusive<u64>| match meta.get(name) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v
                .as_u64()
                .filter(|n| range.contains(n))
                .ok_or_else(stored_invalid),
        };
    let digits = number("totpDigits", 6, 6..=8)? as u32;
    let period = number("totpPeriod", 30, 1..=3600)?;
    totp_now(secret, algorithm, digits, period, now)
}

/// Computes the TOTP code at `now` from a base32 seed (spaces, dashes and padding ignored).
pub fn totp_now(
    secret: &str,
    algorithm: TotpAlgorithm,
    digits: u32,
    period: u64,
    now: i64,
) -> Result<TotpCodeResponse, VaultError> {
    if period == 0 || !(6..=8).contains(&digits) {
        return Err(stored_invalid());
    }
    let cleaned = Zeroizing::new(
        secret
            .chars()
            .filter(|c| !c.is_whitespace() && *c != '-' && *c != '=')
            .collect::<String>()
            .to_uppercase(),
    );
    let bytes = totp_rs::Secret::Encoded(cleaned.to_string())
        .to_bytes()
        .map_err(|_| stored_invalid())?;
    if bytes.is_empty() {
        return Err(stored_invalid());
    }
    let algorithm = match algorithm {
        TotpAlgorithm::Sha1 => totp_rs::Algorithm::SHA1,
        TotpAlgorithm::Sha256 => totp_rs::Algorithm::SHA256,
        TotpAlgorithm::Sha512 => totp_rs::Algorithm::SHA512,
    };
    let totp = totp_rs::TOTP::new_unchecked(
        algorithm,
        digits as usize,
        1,
        period,
        bytes,
        None,
        String::new(),
    );
    let now = u64::try_from(now).unwrap_or(0);
    Ok(TotpCodeResponse {
        code: totp.generate(now),
        remaining_seconds: period - (now % period),
        period,
        digits,
    })
}
