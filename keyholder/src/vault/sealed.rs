//! The sealed inputs of a credential: what decides where its secret goes or what it may do (the
//! minting parameters and signing key of a GitHub App or Google service account, the OAuth
//! provider), sealed at store time into the `kh1` field `sealedInputs`. The field's associated data
//! binds it to its service and field name, so a platform that rewrites the document with
//! `storage set` can drop it but neither forge, edit nor move it; meta copies are display data only.
//!
//! The signing key of a minting credential lives only here (not in `privateKeyData`): a platform
//! that edits meta cannot turn a GitHub App into a plain credential whose key `/v1/credential` would
//! hand out, since a `kh1` field cannot be renamed.

use keyholder_protocol::document::{
    decrypt_field, encrypt_field, field_key_version, FieldFormat, KeyLookup,
};
use keyholder_protocol::DataKey;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use zeroize::{Zeroize as _, Zeroizing};

use super::oauth::validate_provider_name;
use super::VaultError;

/// Name of the sealed field in a document's `fields`.
pub const SEALED_FIELD: &str = "sealedInputs";
/// GitHub's API, where a GitHub App mints unless sealed otherwise (and then only if the owner
/// allowed that origin: GitHub Enterprise hosts need `keyholder egress allow`).
pub const GITHUB_DEFAULT_API: &str = "https://api.github.com";
/// Google's token endpoint, used when a service-account key names none.
pub const GOOGLE_DEFAULT_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
const GOOGLE_DEFAULT_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";

/// The sealed inputs (no Debug or Clone: it may hold a signing key; wiped on drop).
#[derive(Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SealedInputs {
    /// The OAuth provider whose owner-configured client refreshes this credential.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// A GitHub App.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub github_app: Option<GitHubAppInputs>,
    /// A Google service account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub google: Option<GoogleInputs>,
}

/// GitHub App minting inputs.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GitHubAppInputs {
    /// The App id (JWT `iss`).
    pub app_id: String,
    /// The installation whose token is minted.
    pub installation_id: String,
    /// API base URL (no trailing slash).
    pub api_url: String,
    /// PEM RSA private key.
    pub private_key: String,
}

/// Google service-account minting inputs.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GoogleInputs {
    /// The whole key file (`type: service_account`, with `token_uri`).
    pub key_json: String,
    /// Space-separated scopes.
    pub scope: String,
    /// The user to act as (domain-wide delegation), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
}

impl Drop for SealedInputs {
    fn drop(&mut self) {
        if let Some(app) = self.github_app.as_mut() {
            app.private_key.zeroize();
        }
        if let Some(google) = self.google.as_mut() {
            google.key_json.zeroize();
        }
    }
}

impl SealedInputs {
    fn is_empty(&self) -> bool {
        self.provider.is_none() && self.github_app.is_none() && self.google.is_none()
    }

    /// True for a minting credential.
    pub fn mints(&self) -> bool {
        self.github_app.is_some() || self.google.is_some()
    }
}

fn text(data: &Map<String, Value>, name: &str) -> Option<String> {
    match data.get(name)? {
        Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn google_scope(data: &Map<String, Value>) -> String {
    let scopes: Vec<String> = match data.get("scopes").or_else(|| data.get("scope")) {
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect(),
        Some(Value::String(s)) => s
            .split([' ', ','])
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
        _ => Vec::new(),
    };
    if scopes.is_empty() {
        GOOGLE_DEFAULT_SCOPE.to_string()
    } else {
        scopes.join(" ")
    }
}

/// True when `text` is a Google service-account key file.
pub fn is_service_account_key(text: &str) -> bool {
    if !text.trim_start().starts_with('{') {
        return false;
    }
    let Ok(mut parsed) = serde_json::from_str::<Value>(text) else {
        return false;
    };
    let found = parsed.get("type").and_then(Value::as_str) == Some("service_account");
    super::credentials::scrub(&mut parsed);
    found
}

/// Splits `/v1/store` tokenData into what is sealed as usual and the sealed inputs: a minting
/// credential's signing key moves into the inputs (out of the ordinary fields). The returned map
/// holds secrets: the caller scrubs it.
pub fn split_token_data(
    token_data: &Map<String, Value>,
) -> Result<(Map<String, Value>, Option<SealedInputs>), VaultError> {
    if token_data.contains_key(SEALED_FIELD) {
        return Err(VaultError::Invalid(format!(
            "'{SEALED_FIELD}' is reserved for the keyholder"
        )));
    }
    let mut rest = token_data.clone();
    let mut inputs = SealedInputs::default();
    inputs.provider = text(token_data, "provider");
    if let Some(provider) = &inputs.provider {
        validate_provider_name(provider)?;
    }
    let token_type = text(token_data, "tokenType").unwrap_or_default();
    if token_type.eq_ignore_ascii_case("githubapp") {
        let invalid = |what: &str| VaultError::Invalid(format!("GitHub App credential: {what}"));
        let app_id = text(token_data, "appId").ok_or_else(|| invalid("'appId' missing"))?;
        let installation_id = text(token_data, "installationId")
            .ok_or_else(|| invalid("'installationId' missing"))?;
        if app_id.is_empty()
            || app_id.len() > 64
            || !app_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.')
            || installation_id.is_empty()
            || installation_id.len() > 20
            || !installation_id.chars().all(|c| c.is_ascii_digit())
        {
            return Err(invalid("'appId' or 'installationId' is malformed"));
        }
        let api_url = text(token_data, "apiUrl").unwrap_or_else(|| GITHUB_DEFAULT_API.into());
        let parsed =
            url::Url::parse(&api_url).map_err(|_| invalid("'apiUrl' is not an absolute URL"))?;
        if !matches!(parsed.scheme(), "https" | "http") || parsed.host_str().is_none() {
            return Err(invalid("'apiUrl' must be an http(s) URL"));
        }
        let private_key = rest
            .remove("privateKeyData")
            .and_then(|v| match v {
                Value::String(s) if !s.is_empty() => Some(s),
                _ => None,
            })
            .ok_or_else(|| invalid("'privateKeyData' missing"))?;
        inputs.github_app = Some(GitHubAppInputs {
            app_id,
            installation_id,
            api_url: api_url.trim_end_matches('/').to_string(),
            private_key,
        });
    } else {
        for field in ["privateKeyData", "accessToken"] {
            let Some(Value::String(key)) = token_data.get(field) else {
                continue;
            };
            if !is_service_account_key(key) {
                continue;
            }
            if let Some(mut moved) = rest.remove(field) {
                super::credentials::scrub(&mut moved);
            }
            inputs.google = Some(GoogleInputs {
                key_json: key.clone(),
                scope: google_scope(token_data),
                subject: text(token_data, "subject"),
            });
            break;
        }
    }
    Ok((rest, (!inputs.is_empty()).then_some(inputs)))
}

/// The write that marks `service` as a GitHub App stored before minting inputs were sealed, if
/// its document's meta says so (an import from a reference webhook brings such documents).
pub fn mark_if_legacy_minting(service: &str, doc: &Value) -> Option<crate::storage::Write> {
    let github_app = doc
        .get("meta")
        .and_then(|m| m.get("tokenType"))
        .and_then(Value::as_str)
        .is_some_and(|t| t.eq_ignore_ascii_case("githubapp"));
    if github_app
        && doc
            .get("fields")
            .and_then(|f| f.get(SEALED_FIELD))
            .is_none()
    {
        return Some(crate::storage::Write::MarkLegacyMinting(
            service.to_string(),
        ));
    }
    None
}

/// Adds the sealed inputs to a sealed document (`seal_token_data`'s output).
pub fn attach(
    doc: &mut Value,
    inputs: &SealedInputs,
    key: &DataKey,
    key_version: u32,
    service: &str,
) -> Result<(), VaultError> {
    let plain =
        Zeroizing::new(serde_json::to_vec(inputs).map_err(|e| VaultError::Corrupt(e.to_string()))?);
    let sealed = encrypt_field(key, key_version, service, SEALED_FIELD, &plain);
    attach_text(doc, sealed, inputs.mints());
    Ok(())
}

/// Puts an already sealed `sealedInputs` text back into a re-sealed document.
pub fn attach_text(doc: &mut Value, sealed: String, mints: bool) {
    if let Some(fields) = doc.get_mut("fields").and_then(Value::as_object_mut) {
        fields.insert(SEALED_FIELD.into(), Value::String(sealed));
    }
    if mints {
        if let Some(meta) = doc.get_mut("meta").and_then(Value::as_object_mut) {
            meta.insert("hasPrivateKey".into(), json!(true));
        }
    }
}

/// The document without its sealed field, and that field's text (`None` when there is none).
pub fn detach(doc: &Value) -> (Option<Value>, Option<String>) {
    let Some(sealed) = doc.get("fields").and_then(|f| f.get(SEALED_FIELD)).cloned() else {
        return (None, None);
    };
    let mut rest = doc.clone();
    if let Some(fields) = rest.get_mut("fields").and_then(Value::as_object_mut) {
        fields.remove(SEALED_FIELD);
    }
    match sealed {
        Value::String(s) => (Some(rest), Some(s)),
        // Not a string: keep it visible to the opener, which refuses it as malformed.
        _ => (None, None),
    }
}

/// Opens a `sealedInputs` text of `service`: only our own `kh1` format is accepted (a platform v1
/// field would be one the platform can write itself).
pub fn open(keys: &dyn KeyLookup, service: &str, text: &str) -> Result<SealedInputs, VaultError> {
    let refused = || {
        // The platform can write any document: a 4xx, not a retried 500.
        tracing::warn!(service, "the sealed inputs of a credential do not open");
        VaultError::CorruptDocument
    };
    let Ok(FieldFormat::Keyholder { key_version }) = field_key_version(text) else {
        return Err(refused());
    };
    let key = keys.data_key(key_version).ok_or_else(refused)?;
    let plain = decrypt_field(key, service, SEALED_FIELD, text).map_err(|_| refused())?;
    serde_json::from_slice(&plain).map_err(|_| refused())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use keyholder_protocol::document::KeySet;

    #[test]
    fn sealed_inputs_are_bound_to_their_service() {
        let key = DataKey::from_bytes([7u8; 32]);
        let data = json!({"tokenType": "GitHubApp", "appId": "12", "installationId": "34",
            "privateKeyData": "PEM", "provider": "gh"});
        let (rest, inputs) = split_token_data(data.as_object().unwrap()).unwrap();
        assert!(!rest.contains_key("privateKeyData"));
        let inputs = inputs.unwrap();
        let mut doc = json!({"fields": {}, "meta": {}});
        attach(&mut doc, &inputs, &key, 1, "a").unwrap();
        let text = doc["fields"][SEALED_FIELD].as_str().unwrap().to_string();
        let mut keys = KeySet::default();
        keys.keys.insert(1, DataKey::from_bytes([7u8; 32]));
        let opened = open(&keys, "a", &text).unwrap();
        assert_eq!(
            opened.github_app.as_ref().unwrap().api_url,
            GITHUB_DEFAULT_API
        );
        assert_eq!(opened.provider.as_deref(), Some("gh"));
        assert!(matches!(
            open(&keys, "b", &text),
            Err(VaultError::CorruptDocument)
        ));
        assert!(matches!(
            open(&keys, "a", "bm90IGtoMQ=="),
            Err(VaultError::CorruptDocument)
        ));
        // A re-seal of the whole document by code that knows nothing of sealed inputs keeps them
        // encrypted (a sensitive field), never in meta.
        let opened = keyholder_protocol::document::open_document(&doc, "a", &keys).unwrap();
        let mut data = Map::new();
        for name in opened.field_names() {
            data.insert(name.to_string(), json!(opened.secret(name).unwrap()));
        }
        let resealed =
            keyholder_protocol::document::seal_token_data("a", &data, &key, 1, 0, None, None)
                .unwrap();
        assert!(resealed["meta"].get(SEALED_FIELD).is_none());
        let text = resealed["fields"][SEALED_FIELD].as_str().unwrap();
        assert!(open(&keys, "a", text).unwrap().github_app.is_some());
        let reserved = json!({"sealedInputs": "x"});
        assert!(split_token_data(reserved.as_object().unwrap()).is_err());
    }
}
