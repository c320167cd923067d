//! The master key that wraps every other key: from a key file, from a passphrase (Argon2id), or a
//! key file created in the data folder on first start. Wrapping is AES-256-GCM bound to what is wrapped.

use std::io::Write;
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use rand::RngCore;
use rusqlite::Connection;
use zeroize::Zeroizing;

use super::VaultError;
use crate::store::{get_setting, put_setting, restrict_file_mode};

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

    /// Records a check value so that a wrong master key is reported clearly at start, or
    /// verifies it when it exists.
    pub fn check_or_record(&self, conn: &Connection) -> Result<(), VaultError> {
        match get_setting(conn, "master_check")? {
            Some(stored) => {
                let wrapped = hex::decode(&stored).map_err(|_| VaultError::WrongMasterKey)?;
                let plain = self
                    .unwrap_key("check", 0, &wrapped)
                    .map_err(|_| VaultError::WrongMasterKey)?;
                if plain.as_slice() != CHECK_PLAINTEXT {
                    return Err(VaultError::WrongMasterKey);
                }
                Ok(())
            }
            None => {
                let wrapped = self.wrap("check", 0, CHECK_PLAINTEXT)?;
                put_setting(conn, "master_check", &hex::encode(&wrapped))?;
                Ok(())
            }
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

/// Loads (or, for [`MasterKeySource::DataFolder`], creates) the master key. `conn` must be a write
/// connection: the passphrase salt is created on first use. Returns whether a key file was created.
pub fn load_master_key(
    data_dir: &Path,
    source: &MasterKeySource,
    conn: &Connection,
) -> Result<(MasterKey, bool), VaultError> {
    if !matches!(source, MasterKeySource::Pkcs11(_)) && super::pkcs11::is_token_sealed(conn)? {
        return Err(VaultError::Pkcs11(
            "this data folder's master key is sealed by a PKCS#11 token: pass --master-key-pkcs11 URI with --pkcs11-module and the PIN (--pkcs11-pin-file or KEYHOLDER_PKCS11_PIN)".into(),
        ));
    }
    match source {
        MasterKeySource::Pkcs11(config) => Ok((super::pkcs11::load(config, conn)?, false)),
        MasterKeySource::File(path) => Ok((read_key_file(path)?, false)),
        MasterKeySource::Passphrase(path) => Ok((derive_from_passphrase(path, conn)?, false)),
        MasterKeySource::DataFolder => {
            let path = data_dir.join(DEFAULT_MASTER_KEY_FILE);
            if path.exists() {
                return Ok((read_key_file(&path)?, false));
            }
            if get_setting(conn, "master_check")?.is_some() {
                // Keys exist but the key file is gone: never silently make a new one.
                return Err(VaultError::MasterKeyMissing(path));
            }
            let mut bytes = Zeroizing::new([0u8; 32]);
            rand::rngs::OsRng.fill_bytes(bytes.as_mut());
            let text =
                Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(bytes.as_ref()));
            write_private_file(&path, text.as_bytes())?;
            Ok((MasterKey(bytes), true))
        }
    }
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

fn derive_from_passphrase(path: &Path, conn: &Connection) -> Result<MasterKey, VaultError> {
    let salt = match get_setting(conn, "kdf_salt")? {
        Some(stored) => hex::decode(&stored).map_err(|_| VaultError::Corrupt("kdf_salt".into()))?,
        None => {
            let salt = new_kdf_salt();
            put_setting(conn, "kdf_salt", &hex::encode(&salt))?;
            salt
        }
    };
    derive_with_salt(path, &salt)
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
