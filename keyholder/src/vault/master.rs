//! The master key that wraps every other key: from a key file, from a passphrase (Argon2id), or a
//! key file created in the data folder on first start. Wrapping is AES-256-GCM bound to what is wrapped.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use rand::RngCore;
use zeroize::Zeroizing;

use super::VaultError;
use crate::storage::{ChangeSet, Check, KeyRingSnapshot, Setting, Write};
use crate::store::restrict_file_mode;

/// Name of the master key file created in the data folder when no other source is configured.
pub const DEFAULT_MASTER_KEY_FILE: &str = "master.key";
const CHECK_PLAINTEXT: &[u8] = b"keyholder master key check v1";
const WRAP_LABEL: &[u8] = b"keyholder/v1/wrap";

/// Where the master key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MasterKeySource {
    /// A file holding 32 bytes, raw or as standard base64 text.
    File(PathBuf),
    /// A file holding a passphrase; the key is derived with Argon2id and a salt kept in the database.
    Passphrase(PathBuf),
    /// `master.key` inside the data folder, created on first start (convenient, and weaker).
    DataFolder,
    /// A key-ring key sealed by a non-extractable AES key in a PKCS#11 token (see `vault::pkcs11`).
    Pkcs11(super::pkcs11::Pkcs11Config),
}

/// The 32-byte key-encryption key. Never printed, zeroized on drop.
pub struct MasterKey(Zeroizing<[u8; 32]>);

impl MasterKey {
    /// Builds a master key from raw bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        MasterKey(Zeroizing::new(bytes))
    }

    /// Encrypts `plaintext` for storage, bound to its `kind` and `version`.
    pub fn wrap(&self, kind: &str, version: u32, plaintext: &[u8]) -> Result<Vec<u8>, VaultError> {
        let cipher = Aes256Gcm::new_from_slice(self.0.as_ref()).map_err(|_| VaultError::Crypto)?;
        let mut nonce = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let aad = wrap_aad(kind, version);
        let ct = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            .map_err(|_| VaultError::Crypto)?;
        let mut out = Vec::with_capacity(12 + ct.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    /// Decrypts a value made by [`MasterKey::wrap`] for the same `kind` and `version`.
    pub fn unwrap_key(
        &self,
        kind: &str,
        version: u32,
        wrapped: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, VaultError> {
        if wrapped.len() < 12 + 16 {
            return Err(VaultError::Crypto);
        }
        let cipher = Aes256Gcm::new_from_slice(self.0.as_ref()).map_err(|_| VaultError::Crypto)?;
        let aad = wrap_aad(kind, version);
        let (nonce, ct) = wrapped.split_at(12);
        cipher
            .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad: &aad })
            .map(Zeroizing::new)
            .map_err(|_| VaultError::Crypto)
    }

    /// Verifies the stored check value (`stored`, the `master_check` setting) so that a wrong
    /// master key is reported clearly, or makes one when none is stored. Returns the check value
    /// in force and, when it is new, the change that records it (only if still unset).
    pub fn check_or_record(
        &self,
        stored: Option<&str>,
    ) -> Result<(String, Option<ChangeSet>), VaultError> {
        match stored {
            Some(stored) => {
                let wrapped = hex::decode(stored).map_err(|_| VaultError::WrongMasterKey)?;
                let plain = self
                    .unwrap_key("check", 0, &wrapped)
                    .map_err(|_| VaultError::WrongMasterKey)?;
                if plain.as_slice() != CHECK_PLAINTEXT {
                    return Err(VaultError::WrongMasterKey);
                }
                Ok((stored.to_string(), None))
            }
            None => {
                let check = hex::encode(self.wrap("check", 0, CHECK_PLAINTEXT)?);
                Ok((
                    check.clone(),
                    Some(record_once(Setting::MasterCheck, check)),
                ))
            }
        }
    }

    /// Like [`MasterKey::check_or_record`] for a key that must match what is stored: the check
    /// value, or [`VaultError::WrongMasterKey`] (also when none is stored yet).
    pub fn check(&self, stored: Option<&str>) -> Result<String, VaultError> {
        match stored {
            Some(_) => Ok(self.check_or_record(stored)?.0),
            None => Err(VaultError::WrongMasterKey),
        }
    }
}

fn wrap_aad(kind: &str, version: u32) -> Vec<u8> {
    let mut aad = WRAP_LABEL.to_vec();
    for part in [kind.as_bytes(), version.to_string().as_bytes()] {
        aad.extend_from_slice(&(part.len() as u32).to_be_bytes());
        aad.extend_from_slice(part);
    }
    aad
}

/// A change that sets `setting` to `value` only if it is still unset (first start).
pub fn record_once(setting: Setting, value: String) -> ChangeSet {
    ChangeSet::default()
        .check(Check::SettingIs(setting, None))
        .write(Write::PutSetting(setting, value))
}

/// What [`load_master_key`] found or made.
pub struct LoadedMaster {
    /// The key.
    pub key: MasterKey,
    /// A key file was created in the data folder.
    pub created_file: bool,
    /// Settings first use makes (the passphrase salt, the token-sealed key), to apply.
    pub record: Option<ChangeSet>,
}

/// Loads (or, for [`MasterKeySource::DataFolder`], creates) the master key from the settings in
/// `stored`. The passphrase salt (or the token-sealed key) made on first use comes back as
/// [`LoadedMaster::record`] for the caller to apply.
pub fn load_master_key(
    data_dir: &Path,
    source: &MasterKeySource,
    stored: &KeyRingSnapshot,
) -> Result<LoadedMaster, VaultError> {
    let done = |key: MasterKey| LoadedMaster {
        key,
        created_file: false,
        record: None,
    };
    if !matches!(source, MasterKeySource::Pkcs11(_))
        && stored.setting(Setting::Pkcs11SealedMaster).is_some()
    {
        return Err(VaultError::Pkcs11(
            "this data folder's master key is sealed by a PKCS#11 token: pass --master-key-pkcs11 URI with --pkcs11-module and the PIN (--pkcs11-pin-file or KEYHOLDER_PKCS11_PIN)".into(),
        ));
    }
    match source {
        MasterKeySource::Pkcs11(config) => {
            let (key, record) = super::pkcs11::load(
                config,
                stored.setting(Setting::Pkcs11SealedMaster),
                stored.setting(Setting::MasterCheck),
            )?;
            Ok(LoadedMaster {
                key,
                created_file: false,
                record: record.map(|sealed| record_once(Setting::Pkcs11SealedMaster, sealed)),
            })
        }
        MasterKeySource::File(path) => Ok(done(read_key_file(path)?)),
        MasterKeySource::Passphrase(path) => {
            let (key, salt) = derive_from_passphrase(path, stored.setting(Setting::KdfSalt))?;
            Ok(LoadedMaster {
                key,
                created_file: false,
                record: salt.map(|salt| record_once(Setting::KdfSalt, salt)),
            })
        }
        MasterKeySource::DataFolder => {
            let path = data_dir.join(DEFAULT_MASTER_KEY_FILE);
            if path.exists() {
                return Ok(done(read_key_file(&path)?));
            }
            if stored.setting(Setting::MasterCheck).is_some() {
                // Keys exist but the key file is gone: never silently make a new one.
                return Err(VaultError::MasterKeyMissing(path));
            }
            let mut bytes = Zeroizing::new([0u8; 32]);
            rand::rngs::OsRng.fill_bytes(bytes.as_mut());
            let text =
                Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(bytes.as_ref()));
            write_private_file(&path, text.as_bytes())?;
            Ok(LoadedMaster {
                key: MasterKey(bytes),
                created_file: true,
                record: None,
            })
        }
    }
}

/// Loads the master key from `source` for the data folder behind `storage`, recording what first
/// use makes (the passphrase salt, the token-sealed key). Returns whether a key file was created.
pub async fn open_master_key(
    storage: &dyn crate::storage::Storage,
    data_dir: &Path,
    source: &MasterKeySource,
) -> Result<(MasterKey, bool), VaultError> {
    let mut created = false;
    for _ in 0..2 {
        let snapshot = storage.key_ring_snapshot().await?;
        let loaded = load_master_key(data_dir, source, &snapshot)?;
        created |= loaded.created_file;
        let Some(record) = loaded.record else {
            return Ok((loaded.key, created));
        };
        match storage.apply(record).await? {
            crate::storage::Applied::Done { .. } => return Ok((loaded.key, created)),
            // Another process (the owner's CLI) recorded its own first: use theirs.
            crate::storage::Applied::CheckFailed(_) => continue,
        }
    }
    Err(VaultError::Corrupt(
        "the master key settings keep changing; try again".into(),
    ))
}

/// Writes a new file readable by its owner only; refuses to overwrite.
pub fn write_private_file(path: &Path, contents: &[u8]) -> Result<(), VaultError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .map_err(|e| VaultError::KeyFile(path.to_path_buf(), e.to_string()))?;
    file.write_all(contents)
        .and_then(|_| file.write_all(b"\n"))
        .and_then(|_| file.sync_all())
        .map_err(|e| VaultError::KeyFile(path.to_path_buf(), e.to_string()))?;
    restrict_file_mode(path);
    Ok(())
}

/// Reads a master key file: 32 raw bytes or standard base64 text.
pub fn read_key_file(path: &Path) -> Result<MasterKey, VaultError> {
    let raw = Zeroizing::new(
        std::fs::read(path).map_err(|e| VaultError::KeyFile(path.to_path_buf(), e.to_string()))?,
    );
    let mut key = Zeroizing::new([0u8; 32]);
    if raw.len() == 32 {
        key.copy_from_slice(&raw);
        return Ok(MasterKey(key));
    }
    let text = std::str::from_utf8(&raw).map_err(|_| {
        VaultError::KeyFile(path.to_path_buf(), "not 32 bytes or base64 text".into())
    })?;
    let decoded = Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|_| {
                VaultError::KeyFile(path.to_path_buf(), "not 32 bytes or base64 text".into())
            })?,
    );
    if decoded.len() != 32 {
        return Err(VaultError::KeyFile(
            path.to_path_buf(),
            "the key must be 32 bytes (44 characters of base64)".into(),
        ));
    }
    key.copy_from_slice(&decoded);
    Ok(MasterKey(key))
}

/// The key from a passphrase and the stored salt; on first use a new salt, returned (hex) to
/// record.
fn derive_from_passphrase(
    path: &Path,
    stored: Option<&str>,
) -> Result<(MasterKey, Option<String>), VaultError> {
    match stored {
        Some(stored) => {
            let salt = hex::decode(stored).map_err(|_| VaultError::Corrupt("kdf_salt".into()))?;
            Ok((derive_with_salt(path, &salt)?, None))
        }
        None => {
            let salt = new_kdf_salt();
            Ok((derive_with_salt(path, &salt)?, Some(hex::encode(&salt))))
        }
    }
}

/// A fresh random salt for the passphrase KDF.
pub fn new_kdf_salt() -> Vec<u8> {
    let mut salt = vec![0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut salt);
    salt
}

/// Derives the master key from the passphrase in `path` with `salt` (Argon2id, 64 MiB, 3 passes:
/// once at start or per owner command, never per request).
pub fn derive_with_salt(path: &Path, salt: &[u8]) -> Result<MasterKey, VaultError> {
    let raw = Zeroizing::new(
        std::fs::read_to_string(path)
            .map_err(|e| VaultError::KeyFile(path.to_path_buf(), e.to_string()))?,
    );
    let passphrase = raw.trim_end_matches(['\r', '\n']);
    if passphrase.chars().count() < 12 {
        return Err(VaultError::KeyFile(
            path.to_path_buf(),
            "the passphrase must have at least 12 characters".into(),
        ));
    }
    let params = argon2::Params::new(64 * 1024, 3, 1, Some(32)).map_err(|_| VaultError::Crypto)?;
    let kdf = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut key = Zeroizing::new([0u8; 32]);
    kdf.hash_password_into(passphrase.as_bytes(), salt, key.as_mut())
        .map_err(|_| VaultError::Crypto)?;
    Ok(MasterKey(key))
}
