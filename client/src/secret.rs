//! Secret-carrying values handed to and from the SDK: zeroized on drop, never printed, cloned or
//! serialized. The value is reachable only through an explicit `expose()` at the point of use.
//!
//! Zeroization is best effort: buffers inside the HTTP stack and the JSON parser are outside our control.

use std::collections::BTreeMap;
use std::fmt;

use serde_json::{Map, Value};
use zeroize::Zeroizing;

/// A secret string (a token, a refresh token, a TOTP code). No `Debug` value, `Display`, `Clone` or
/// `Serialize`.
///
/// ```
/// use keyholder_client::SecretString;
/// let token = SecretString::new("gho_example".to_owned());
/// assert_eq!(token.expose(), "gho_example");
/// assert_eq!(format!("{token:?}"), "SecretString(<redacted>)");
/// ```
pub struct SecretString(Zeroizing<String>);

impl SecretString {
    /// Wrap a string (moved, not copied).
    pub fn new(value: String) -> Self {
        SecretString(Zeroizing::new(value))
    }

    /// The value, for use at the point of use only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretString(<redacted>)")
    }
}

impl From<String> for SecretString {
    fn from(value: String) -> Self {
        SecretString::new(value)
    }
}

impl From<&str> for SecretString {
    fn from(value: &str) -> Self {
        SecretString::new(value.to_owned())
    }
}

/// A credential fetched from `/v1/credential`: the decrypted fields plus the non-secret meta fields.
///
/// String fields are held as [`SecretString`]s; other JSON values (booleans, numbers, objects) as plain
/// values. `Debug` prints the service and the field names only.
pub struct Credential {
    service: String,
    secrets: BTreeMap<String, SecretString>,
    other: Map<String, Value>,
}

impl Credential {
    /// Split the `token` object of a credential answer into secret strings and other values. The strings
    /// are moved into their zeroizing wrappers, not copied.
    pub(crate) fn from_token(service: &str, token: Map<String, Value>) -> Self {
        let mut secrets = BTreeMap::new();
        let mut other = Map::new();
        for (name, value) in token {
            match value {
                Value::String(s) => {
                    secrets.insert(name, SecretString::new(s));
                }
                v => {
                    other.insert(name, v);
                }
            }
        }
        Credential {
            service: service.to_owned(),
            secrets,
            other,
        }
    }

    /// The service this credential is for.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// A string field (`accessToken`, `refreshToken`, `scope`, `tokenType`, ...).
    pub fn get(&self, field: &str) -> Option<&SecretString> {
        self.secrets.get(field)
    }

    /// `accessToken`, if present.
    pub fn access_token(&self) -> Option<&SecretString> {
        self.get("accessToken")
    }

    /// `refreshToken`, if present.
    pub fn refresh_token(&self) -> Option<&SecretString> {
        self.get("refreshToken")
    }

    /// A non-string field (`expiryTime`, `hasRefreshToken`, ...).
    pub fn value(&self, field: &str) -> Option<&Value> {
        self.other.get(field)
    }

    /// Every field name, sorted.
    pub fn field_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .secrets
            .keys()
            .chain(self.other.keys())
            .map(String::as_str)
            .collect();
        names.sort_unstable();
        names
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("service", &self.service)
            .field("fields", &self.field_names())
            .finish()
    }
}

/// A TOTP code from `/v1/totp-code`.
#[derive(Debug)]
pub struct TotpCode {
    /// The current code (a short-lived secret).
    pub code: SecretString,
    /// Seconds left in the current period.
    pub remaining_seconds: u64,
    /// Period in seconds.
    pub period: u64,
    /// Number of digits.
    pub digits: u32,
}

/// The `tokenData` of a store: secret fields (zeroized on drop) and plain fields.
///
/// ```
/// use keyholder_client::TokenData;
/// let data = TokenData::new()
///     .secret("accessToken", "gho_example")
///     .field("scope", "repo")
///     .field("expiresAt", "2030-01-01T00:00:00Z");
/// assert_eq!(data.field_names(), ["accessToken", "expiresAt", "scope"]);
/// assert!(!format!("{data:?}").contains("gho_example"));
/// ```
#[derive(Default)]
pub struct TokenData {
    secrets: BTreeMap<String, SecretString>,
    plain: Map<String, Value>,
}

impl TokenData {
    /// Empty token data.
    pub fn new() -> Self {
        TokenData::default()
    }

    /// Add a secret string field (`accessToken`, `refreshToken`, `totpSecret`, ...).
    pub fn secret(mut self, name: impl Into<String>, value: impl Into<SecretString>) -> Self {
        let name = name.into();
        self.plain.remove(&name);
        self.secrets.insert(name, value.into());
        self
    }

    /// Add a non-secret field (`scope`, `tokenType`, `expiresAt`, ...).
    pub fn field(mut self, name: impl Into<String>, value: impl Into<Value>) -> Self {
        let name = name.into();
        self.secrets.remove(&name);
        self.plain.insert(name, value.into());
        self
    }

    /// Every field name, sorted.
    pub fn field_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .secrets
            .keys()
            .chain(self.plain.keys())
            .map(String::as_str)
            .collect();
        names.sort_unstable();
        names
    }

    /// True when no field is set.
    pub fn is_empty(&self) -> bool {
        self.secrets.is_empty() && self.plain.is_empty()
    }
}

/// Serializes [`TokenData`] as one JSON object without copying secrets into unzeroized strings.
pub(crate) struct TokenDataWire<'a>(pub(crate) &'a TokenData);

impl serde::Serialize for TokenDataWire<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap as _;
        let data = self.0;
        let mut map = serializer.serialize_map(Some(data.secrets.len() + data.plain.len()))?;
        for (name, value) in &data.secrets {
            map.serialize_entry(name, value.expose())?;
        }
        for (name, value) in &data.plain {
            map.serialize_entry(name, value)?;
        }
        map.end()
    }
}

impl fmt::Debug for TokenData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenData")
            .field("fields", &self.field_names())
            .finish()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn credential_split_and_redaction() {
        let Value::Object(token) = json!({"accessToken":"gho_x","scope":"repo","expiryTime":5})
        else {
            panic!()
        };
        let c = Credential::from_token("github", token);
        assert_eq!(c.access_token().unwrap().expose(), "gho_x");
        assert_eq!(c.value("expiryTime"), Some(&json!(5)));
        assert_eq!(c.field_names(), ["accessToken", "expiryTime", "scope"]);
        assert!(!format!("{c:?}").contains("gho_x"));
    }
}
