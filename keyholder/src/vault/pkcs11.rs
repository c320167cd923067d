//! The master key sealed by a PKCS#11 token (an HSM): a non-extractable AES key inside the token
//! encrypts (AES-256-GCM, performed by the token) a random 32-byte key-ring key kept in the
//! database. At start the token is asked once to decrypt it; the key-ring key then wraps the key
//! ring exactly as a key file's key does. The token's own key never leaves the token, so a copy of
//! the data folder (and of everything else but the token) opens nothing.

use std::path::PathBuf;

use cryptoki::context::{CInitializeArgs, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use rand::RngCore;
use zeroize::Zeroizing;

use super::master::MasterKey;
use super::VaultError;

/// The database setting holding the token-encrypted key-ring key (hex of IV || ciphertext || tag).
pub const SEALED_SETTING: &str = "pkcs11_sealed_master";
/// The environment variable read for the PIN when no PIN file is given.
pub const PIN_ENV: &str = "KEYHOLDER_PKCS11_PIN";
const AAD: &[u8] = b"keyholder/v1/pkcs11-master";

/// How to reach the token: its RFC 7512 URI, the module (shared library) and where the PIN is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pkcs11Config {
    /// `pkcs11:token=...;object=...` (RFC 7512).
    pub uri: String,
    /// The PKCS#11 module; else the URI's `module-path` query attribute.
    pub module: Option<PathBuf>,
    /// A file holding the user PIN; else the URI's `pin-source`, else `KEYHOLDER_PKCS11_PIN`.
    pub pin_file: Option<PathBuf>,
}

/// The parts of an RFC 7512 URI that select a token and a key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenUri {
    /// `token=`: the token label.
    pub token: Option<String>,
    /// `manufacturer=`.
    pub manufacturer: Option<String>,
    /// `serial=`.
    pub serial: Option<String>,
    /// `model=`.
    pub model: Option<String>,
    /// `slot-id=`.
    pub slot_id: Option<u64>,
    /// `object=`: the key's label.
    pub object: Option<String>,
    /// `id=`: the key's CKA_ID (bytes).
    pub id: Option<Vec<u8>>,
    /// `module-path=` (query).
    pub module_path: Option<PathBuf>,
    /// `pin-source=` (query; a file path or `file:` URI).
    pub pin_source: Option<PathBuf>,
}

fn invalid(uri: &str, why: &str) -> VaultError {
    VaultError::Pkcs11(format!("invalid PKCS#11 URI '{uri}': {why}"))
}

fn decode(uri: &str, value: &str) -> Result<Vec<u8>, VaultError> {
    let bytes: Vec<u8> = percent_encoding::percent_decode_str(value).collect();
    if value.contains('%')
        && !value
            .split('%')
            .skip(1)
            .all(|p| p.len() >= 2 && p.as_bytes()[..2].iter().all(u8::is_ascii_hexdigit))
    {
        return Err(invalid(uri, "bad percent-encoding"));
    }
    Ok(bytes)
}

fn decode_text(uri: &str, value: &str) -> Result<String, VaultError> {
    String::from_utf8(decode(uri, value)?).map_err(|_| invalid(uri, "a value is not UTF-8"))
}

/// Parses an RFC 7512 `pkcs11:` URI. Unknown path attributes are refused (a typo would select a
/// different token); `pin-value` is refused (a PIN on a command line is visible to every user).
pub fn parse_uri(uri: &str) -> Result<TokenUri, VaultError> {
    let rest = uri
        .strip_prefix("pkcs11:")
        .ok_or_else(|| invalid(uri, "it must start with pkcs11:"))?;
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest, None),
    };
    let mut parsed = TokenUri::default();
    for attr in path.split(';').filter(|a| !a.is_empty()) {
        let (name, value) = attr
            .split_once('=')
            .ok_or_else(|| invalid(uri, &format!("'{attr}' is not name=value")))?;
        match name {
            "token" => parsed.token = Some(decode_text(uri, value)?),
            "manufacturer" => parsed.manufacturer = Some(decode_text(uri, value)?),
            "serial" => parsed.serial = Some(decode_text(uri, value)?),
            "model" => parsed.model = Some(decode_text(uri, value)?),
            "slot-id" => {
                parsed.slot_id = Some(
                    decode_text(uri, value)?
                        .parse()
                        .map_err(|_| invalid(uri, "slot-id must be a number"))?,
                )
            }
            "object" => parsed.object = Some(decode_text(uri, value)?),
            "id" => parsed.id = Some(decode(uri, value)?),
            "type" => {
                if decode_text(uri, value)? != "secret-key" {
                    return Err(invalid(uri, "type must be secret-key (an AES key)"));
                }
            }
            "library-manufacturer"
            | "library-description"
            | "library-version"
            | "slot-description"
            | "slot-manufacturer" => {}
            other => return Err(invalid(uri, &format!("unknown attribute '{other}'"))),
        }
    }
    for attr in query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter(|a| !a.is_empty())
    {
        let (name, value) = attr
            .split_once('=')
            .ok_or_else(|| invalid(uri, &format!("'{attr}' is not name=value")))?;
        match name {
            "module-path" => parsed.module_path = Some(PathBuf::from(decode_text(uri, value)?)),
            "pin-source" => {
                let text = decode_text(uri, value)?;
                let path = text.strip_prefix("file:").unwrap_or(&text).to_string();
                parsed.pin_source = Some(PathBuf::from(path));
            }
            "pin-value" => {
                return Err(invalid(
                    uri,
                    "pin-value is refused: put the PIN in a file (--pkcs11-pin-file) or KEYHOLDER_PKCS11_PIN",
                ))
            }
            _ => {}
        }
    }
    if parsed.object.is_none() && parsed.id.is_none() {
        return Err(invalid(
            uri,
            "name the AES key with object=<label> or id=<hex>",
        ));
    }
    Ok(parsed)
}

/// A logged-in session on the token and the handle of its AES key.
pub struct TokenKey {
    session: Session,
    key: ObjectHandle,
    label: String,
    _context: Pkcs11,
}

fn ck(what: &str, e: CkError) -> VaultError {
    VaultError::Pkcs11(format!("{what}: {e}"))
}

fn read_pin(config: &Pkcs11Config, uri: &TokenUri) -> Result<AuthPin, VaultError> {
    let file = config.pin_file.clone().or_else(|| uri.pin_source.clone());
    let pin = match file {
        Some(path) => {
            let raw =
                Zeroizing::new(std::fs::read_to_string(&path).map_err(|e| {
                    VaultError::Pkcs11(format!("PIN file {}: {e}", path.display()))
                })?);
            raw.trim_end_matches(['\r', '\n']).to_string()
        }
        None => std::env::var(PIN_ENV).map_err(|_| {
            VaultError::Pkcs11(format!(
                "no PIN for the PKCS#11 token: pass --pkcs11-pin-file FILE or set {PIN_ENV}"
            ))
        })?,
    };
    Ok(AuthPin::new(pin))
}

fn token_matches(uri: &TokenUri, slot: Slot, info: &cryptoki::slot::TokenInfo) -> bool {
    let eq = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have.trim());
    eq(&uri.token, info.label())
        && eq(&uri.manufacturer, info.manufacturer_id())
        && eq(&uri.serial, info.serial_number())
        && eq(&uri.model, info.model())
        && uri.slot_id.is_none_or(|id| id == slot.id())
}

impl TokenKey {
    /// Loads the module, finds the one token the URI names, logs in and finds its AES key
    /// (refused unless it is a sensitive, non-extractable AES key that may encrypt and decrypt).
    pub fn open(config: &Pkcs11Config) -> Result<TokenKey, VaultError> {
        let uri = parse_uri(&config.uri)?;
        let module = config
            .module
            .clone()
            .or_else(|| uri.module_path.clone())
            .ok_or_else(|| {
                VaultError::Pkcs11(
                    "no PKCS#11 module: pass --pkcs11-module /path/to/module.so (or module-path= in the URI)"
                        .into(),
                )
            })?;
        let context = Pkcs11::new(&module).map_err(|e| {
            VaultError::Pkcs11(format!(
                "the PKCS#11 module {} cannot be loaded: {e}",
                module.display()
            ))
        })?;
        context
            .initialize(CInitializeArgs::OsThreads)
            .map_err(|e| ck("C_Initialize", e))?;
        let slots = context
            .get_slots_with_token()
            .map_err(|e| ck("C_GetSlotList", e))?;
        let mut present = Vec::new();
        let mut chosen = Vec::new();
        for slot in slots {
            let info = context
                .get_token_info(slot)
                .map_err(|e| ck("C_GetTokenInfo", e))?;
            present.push(format!("'{}'", info.label().trim()));
            if token_matches(&uri, slot, &info) {
                chosen.push((slot, info.label().trim().to_string()));
            }
        }
        let (slot, label) = match chosen.len() {
            1 => chosen.remove(0),
            0 => {
                return Err(VaultError::Pkcs11(format!(
                    "no PKCS#11 token matches {} in {} (tokens present: {}); is the token plugged in, initialised and named as in the URI?",
                    config.uri,
                    module.display(),
                    if present.is_empty() { "none".to_string() } else { present.join(", ") }
                )))
            }
            _ => {
                return Err(VaultError::Pkcs11(format!(
                    "{} matches more than one token ({}); add serial= or slot-id= to the URI",
                    config.uri,
                    present.join(", ")
                )))
            }
        };
        let pin = read_pin(config, &uri)?;
        let session = context
            .open_ro_session(slot)
            .map_err(|e| ck("C_OpenSession", e))?;
        match session.login(UserType::User, Some(&pin)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(CkError::Pkcs11(RvError::PinIncorrect, _)) => {
                return Err(VaultError::Pkcs11(format!(
                    "the PKCS#11 token '{label}' refused the PIN (CKR_PIN_INCORRECT): check --pkcs11-pin-file / {PIN_ENV} (tokens lock after a few wrong PINs)"
                )))
            }
            Err(CkError::Pkcs11(RvError::PinLocked, _)) => {
                return Err(VaultError::Pkcs11(format!(
                    "the PKCS#11 token '{label}' has locked its user PIN (CKR_PIN_LOCKED): unlock it with the security officer PIN"
                )))
            }
            Err(e) => return Err(ck(&format!("C_Login on token '{label}'"), e)),
        }
        let mut template = vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
        ];
        if let Some(object) = &uri.object {
            template.push(Attribute::Label(object.as_bytes().to_vec()));
        }
        if let Some(id) = &uri.id {
            template.push(Attribute::Id(id.clone()));
        }
        let keys = session
            .find_objects(&template)
            .map_err(|e| ck("C_FindObjects", e))?;
        let key = match keys.as_slice() {
            [key] => *key,
            [] => {
                return Err(VaultError::Pkcs11(format!(
                    "token '{label}' has no AES secret key matching {}",
                    config.uri
                )))
            }
            _ => {
                return Err(VaultError::Pkcs11(format!(
                    "token '{label}' has several AES keys matching {}; add id= to the URI",
                    config.uri
                )))
            }
        };
        let attrs = session
            .get_attributes(
                key,
                &[
                    AttributeType::Extractable,
                    AttributeType::Sensitive,
                    AttributeType::Encrypt,
                    AttributeType::Decrypt,
                ],
            )
            .map_err(|e| ck("C_GetAttributeValue", e))?;
        let flag = |want: AttributeType| {
            attrs.iter().any(|a| {
                a.attribute_type() == want
                    && matches!(
                        a,
                        Attribute::Extractable(true)
                            | Attribute::Sensitive(true)
                            | Attribute::Encrypt(true)
                            | Attribute::Decrypt(true)
                    )
            })
        };
        if flag(AttributeType::Extractable) || !flag(AttributeType::Sensitive) {
            return Err(VaultError::Pkcs11(format!(
                "the AES key {} on token '{label}' is extractable or not sensitive: its value could leave the token; make a new one with CKA_EXTRACTABLE=false and CKA_SENSITIVE=true",
                config.uri
            )));
        }
        if !flag(AttributeType::Encrypt) || !flag(AttributeType::Decrypt) {
            return Err(VaultError::Pkcs11(format!(
                "the AES key {} on token '{label}' may not encrypt and decrypt (CKA_ENCRYPT/CKA_DECRYPT)",
                config.uri
            )));
        }
        Ok(TokenKey {
            session,
            key,
            label,
            _context: context,
        })
    }

    /// Encrypts in the token: AES-GCM, a fresh 12-byte IV, 128-bit tag. Returns IV || ct || tag.
    /// Tokens that generate the IV themselves (FIPS-mode HSMs) write it into the parameter
    /// buffer; the IV stored is the one the token used.
    pub fn seal(&self, plaintext: &[u8]) -> Result<Vec<u8>, VaultError> {
        let mut iv = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut iv);
        let ct = {
            let params = GcmParams::new(&mut iv, AAD, 128.into())
                .map_err(|e| ck("AES-GCM parameters", e))?;
            self.session
                .encrypt(&Mechanism::AesGcm(params), self.key, plaintext)
                .map_err(|e| ck(&format!("C_Encrypt (AES-GCM) on token '{}'", self.label), e))?
        };
        let mut out = iv.to_vec();
        out.extend_from_slice(&ct);
        Ok(out)
    }

    /// Decrypts in the token what [`TokenKey::seal`] made.
    pub fn open_sealed(&self, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, VaultError> {
        if sealed.len() < 12 + 16 {
            return Err(VaultError::Corrupt(SEALED_SETTING.into()));
        }
        let (iv, ct) = sealed.split_at(12);
        let mut iv = iv.to_vec();
        let params =
            GcmParams::new(&mut iv, AAD, 128.into()).map_err(|e| ck("AES-GCM parameters", e))?;
        self.session
            .decrypt(&Mechanism::AesGcm(params), self.key, ct)
            .map(Zeroizing::new)
            .map_err(|_| {
                VaultError::Pkcs11(format!(
                    "the AES key on token '{}' does not open this data folder's master key (a different key or token?)",
                    self.label
                ))
            })
    }
}

/// A new random key-ring key, sealed by the token: returns it and the sealed form for
/// [`SEALED_SETTING`].
pub fn new_sealed_master(config: &Pkcs11Config) -> Result<(MasterKey, String), VaultError> {
    let token = TokenKey::open(config)?;
    let mut bytes = Zeroizing::new([0u8; 32]);
    rand::rngs::OsRng.fill_bytes(bytes.as_mut());
    let sealed = token.seal(bytes.as_ref())?;
    // Read back through the token before anything depends on it.
    let check = token.open_sealed(&sealed)?;
    if check.as_slice() != bytes.as_ref() {
        return Err(VaultError::Pkcs11(
            "the token's AES-GCM did not round-trip".into(),
        ));
    }
    Ok((MasterKey::from_bytes(*bytes), hex::encode(sealed)))
}

/// Loads the master key through the token (asking it once) from the stored sealed key, or on a
/// new data folder makes one and returns it sealed (hex) to record.
pub fn load(
    config: &Pkcs11Config,
    stored: Option<&str>,
    master_check: Option<&str>,
) -> Result<(MasterKey, Option<String>), VaultError> {
    match stored {
        Some(stored) => {
            let sealed =
                hex::decode(stored).map_err(|_| VaultError::Corrupt(SEALED_SETTING.into()))?;
            let token = TokenKey::open(config)?;
            let plain = token.open_sealed(&sealed)?;
            let bytes: [u8; 32] = plain
                .as_slice()
                .try_into()
                .map_err(|_| VaultError::Corrupt(SEALED_SETTING.into()))?;
            Ok((MasterKey::from_bytes(bytes), None))
        }
        None => {
            if master_check.is_some() {
                return Err(VaultError::Pkcs11(
                    "this data folder's master key is not in a PKCS#11 token; move it there with `keyholder rotate-master-key --to-pkcs11 URI` (with the current key's flags)".into(),
                ));
            }
            let (master, sealed) = new_sealed_master(config)?;
            Ok((master, Some(sealed)))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn uri_parsing() {
        let u = parse_uri("pkcs11:token=Key%20holder;object=master;type=secret-key?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/pin").unwrap();
        assert_eq!(u.token.as_deref(), Some("Key holder"));
        assert_eq!(u.object.as_deref(), Some("master"));
        assert_eq!(
            u.module_path.as_deref(),
            Some(Path::new("/usr/lib/softhsm/libsofthsm2.so"))
        );
        assert_eq!(u.pin_source.as_deref(), Some(Path::new("/etc/pin")));
        let u = parse_uri("pkcs11:serial=abc;id=%01%02").unwrap();
        assert_eq!(u.id, Some(vec![1, 2]));
        for bad in [
            "token=x;object=y",
            "pkcs11:token=x",
            "pkcs11:tokn=x;object=y",
            "pkcs11:object=y;type=private",
            "pkcs11:object=y?pin-value=1234",
            "pkcs11:object=%zz",
            "pkcs11:object=y;slot-id=one",
        ] {
            assert!(parse_uri(bad).is_err(), "{bad}");
        }
    }
}
