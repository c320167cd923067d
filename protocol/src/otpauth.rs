//! `otpauth://totp/` links (PROTOCOL.md §7.5): a strict parser, and the rewrite of `/v1/store` token data
//! that seals a link's seed as `totpSecret` and keeps only its descriptors as meta.
//!
//! # Accepted form
//!
//! `otpauth://totp/<label>?<parameters>`, at most [`MAX_URI_LEN`] bytes, no fragment.
//! - The scheme `otpauth` and the type are ASCII case-insensitive; a type other than `totp` (`hotp`
//!   among them) is [`OtpauthError::NotTotp`].
//! - `<label>` is percent-decoded (`%XX`; `+` stays a plus) to UTF-8 without control characters:
//!   `Issuer:Account` (split at the first `:`, spaces after it dropped) or `Account`.
//! - Parameters are `name=value` joined by `&` (empty pieces skipped), values percent-decoded like the
//!   label. Known names are `secret` (required), `issuer`, `algorithm`, `digits`, `period`; each at most
//!   once. Others (`image`, ...) are ignored.
//! - `secret`: base32 (RFC 4648), case-insensitive, optional `=` padding (then to a multiple of 8),
//!   1 to [`MAX_SECRET_CHARS`] characters without padding, canonical (no impossible length, unused
//!   trailing bits zero). Normalised to upper case without padding.
//! - `issuer` (the parameter wins over the label's prefix) and the account name: at most
//!   [`MAX_TEXT_LEN`] bytes each.
//! - `algorithm`: `SHA1` (default), `SHA256`, `SHA512`, case-insensitive; `digits`: 6-8 (default 6);
//!   `period`: 1-3600 seconds (default 30); both ASCII decimal.
//!
//! The seed never appears in an error or in `Debug` output.

use serde_json::{json, Map, Value};
use zeroize::Zeroizing;

/// Longest accepted link, in bytes.
pub const MAX_URI_LEN: usize = 2048;
/// Longest accepted seed, in base32 characters (without padding): 160 bytes.
pub const MAX_SECRET_CHARS: usize = 256;
/// Longest accepted issuer or account name, in bytes (after decoding).
pub const MAX_TEXT_LEN: usize = 256;

/// The token-data field that carries a link at `/v1/store` (never stored, echoed or listed).
pub const TOTP_URI_FIELD: &str = "totpUri";

/// Why a link was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OtpauthError {
    /// Longer than [`MAX_URI_LEN`].
    #[error("otpauth link too long")]
    TooLong,
    /// Not an `otpauth://` URI.
    #[error("not an otpauth:// link")]
    WrongScheme,
    /// An `otpauth://` URI of another type than `totp`.
    #[error("only otpauth://totp/ links are accepted")]
    NotTotp,
    /// No type/label separator, a fragment, or a parameter without `=`.
    #[error("malformed otpauth link")]
    Malformed,
    /// Bad percent-encoding, not UTF-8, control characters or too long (label, issuer).
    #[error("malformed label or issuer in otpauth link")]
    BadText,
    /// A known parameter given twice.
    #[error("duplicate parameter in otpauth link")]
    DuplicateParameter,
    /// No `secret` parameter.
    #[error("otpauth link has no secret")]
    MissingSecret,
    /// The secret is not canonical base32 of 1-160 bytes.
    #[error("otpauth secret is not valid base32")]
    BadSecret,
    /// `algorithm` is not SHA1, SHA256 or SHA512.
    #[error("otpauth algorithm must be SHA1, SHA256 or SHA512")]
    BadAlgorithm,
    /// `digits` is not 6-8.
    #[error("otpauth digits must be 6-8")]
    BadDigits,
    /// `period` is not 1-3600.
    #[error("otpauth period must be 1-3600 seconds")]
    BadPeriod,
    /// Token data with a link must not also carry `totpSecret`, and the link must be a string.
    #[error("totpUri must be a string and cannot be combined with totpSecret")]
    Conflict,
}

/// The HMAC of a TOTP link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TotpAlgorithm {
    /// HMAC-SHA1 (the default).
    Sha1,
    /// HMAC-SHA256.
    Sha256,
    /// HMAC-SHA512.
    Sha512,
}

impl TotpAlgorithm {
    /// `SHA1`, `SHA256` or `SHA512`.
    pub fn as_str(self) -> &'static str {
        match self {
            TotpAlgorithm::Sha1 => "SHA1",
            TotpAlgorithm::Sha256 => "SHA256",
            TotpAlgorithm::Sha512 => "SHA512",
        }
    }

    /// Parse case-insensitively.
    pub fn parse(s: &str) -> Option<Self> {
        [
            TotpAlgorithm::Sha1,
            TotpAlgorithm::Sha256,
            TotpAlgorithm::Sha512,
        ]
        .into_iter()
        .find(|a| a.as_str().eq_ignore_ascii_case(s))
    }
}

/// A parsed link. The seed is zeroized on drop and never printed.
pub struct OtpauthLink {
    secret: Zeroizing<String>,
    /// Issuer (parameter, else the label's prefix).
    pub issuer: Option<String>,
    /// Account name (the label without its issuer prefix).
    pub account_name: String,
    /// HMAC algorithm.
    pub algorithm: TotpAlgorithm,
    /// Code length, 6-8.
    pub digits: u32,
    /// Period in seconds, 1-3600.
    pub period: u64,
}

impl std::fmt::Debug for OtpauthLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OtpauthLink")
            .field("secret", &"<redacted>")
            .field("issuer", &self.issuer)
            .field("account_name", &self.account_name)
            .field("algorithm", &self.algorithm)
            .field("digits", &self.digits)
            .field("period", &self.period)
            .finish()
    }
}

impl OtpauthLink {
    /// The seed: upper-case base32 without padding.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// The meta descriptors of PROTOCOL.md §7.5 (`totpIssuer` only when there is one).
    pub fn descriptors(&self) -> Map<String, Value> {
        let mut meta = Map::new();
        if let Some(issuer) = &self.issuer {
            meta.insert("totpIssuer".into(), json!(issuer));
        }
        meta.insert("totpAccountName".into(), json!(self.account_name));
        meta.insert("totpAlgorithm".into(), json!(self.algorithm.as_str()));
        meta.insert("totpDigits".into(), json!(self.digits));
        meta.insert("totpPeriod".into(), json!(self.period));
        meta
    }
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Strict percent-decoding to UTF-8 (a `%` must start `%XX`), into a zeroizing buffer.
fn percent_decode(s: &str) -> Option<Zeroizing<String>> {
    let bytes = s.as_bytes();
    let mut out = Zeroizing::new(Vec::with_capacity(bytes.len()));
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hi = hex_value(*bytes.get(i + 1)?)?;
            let lo = hex_value(*bytes.get(i + 2)?)?;
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    let text = std::str::from_utf8(&out).ok()?;
    Some(Zeroizing::new(text.to_owned()))
}

fn decode_text(s: &str) -> Result<String, OtpauthError> {
    let text = percent_decode(s).ok_or(OtpauthError::BadText)?;
    if text.len() > MAX_TEXT_LEN || text.chars().any(char::is_control) {
        return Err(OtpauthError::BadText);
    }
    Ok(text.to_string())
}

/// Normalise and check a base32 seed (see the module doc).
fn normalise_secret(raw: &str) -> Result<Zeroizing<String>, OtpauthError> {
    let unpadded = raw.trim_end_matches('=');
    if unpadded.len() != raw.len() && !raw.len().is_multiple_of(8) {
        return Err(OtpauthError::BadSecret);
    }
    if unpadded.is_empty() || unpadded.len() > MAX_SECRET_CHARS {
        return Err(OtpauthError::BadSecret);
    }
    let mut out = Zeroizing::new(String::with_capacity(unpadded.len()));
    let mut last = 0u8;
    for c in unpadded.chars() {
        let upper = c.to_ascii_uppercase();
        last = match upper {
            'A'..='Z' => upper as u8 - b'A',
            '2'..='7' => upper as u8 - b'2' + 26,
            _ => return Err(OtpauthError::BadSecret),
        };
        out.push(upper);
    }
    // Bits of the last character that do not belong to a whole byte must be zero; lengths that
    // leave a partial character (1, 3, 6 mod 8) cannot come from any byte string.
    let unused_bits = match unpadded.len() % 8 {
        0 => 0,
        2 => 2,
        4 => 4,
        5 => 1,
        7 => 3,
        _ => return Err(OtpauthError::BadSecret),
    };
    if last & ((1u8 << unused_bits) - 1) != 0 {
        return Err(OtpauthError::BadSecret);
    }
    Ok(out)
}

fn decimal(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 10 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Parse an `otpauth://totp/` link (see the module doc for the exact rules).
pub fn parse_otpauth(uri: &str) -> Result<OtpauthLink, OtpauthError> {
    if uri.len() > MAX_URI_LEN {
        return Err(OtpauthError::TooLong);
    }
    const SCHEME: &str = "otpauth://";
    let rest = match uri.get(..SCHEME.len()) {
        Some(prefix) if prefix.eq_ignore_ascii_case(SCHEME) => &uri[SCHEME.len()..],
        _ => return Err(OtpauthError::WrongScheme),
    };
    if rest.contains('#') {
        return Err(OtpauthError::Malformed);
    }
    let (kind, rest) = rest.split_once('/').ok_or(OtpauthError::Malformed)?;
    if !kind.eq_ignore_ascii_case("totp") {
        return Err(OtpauthError::NotTotp);
    }
    let (label, query) = rest.split_once('?').unwrap_or((rest, ""));
    let label = decode_text(label)?;
    let (label_issuer, account_name) = match label.split_once(':') {
        Some((issuer, account)) => (Some(issuer.to_owned()), account.trim_start_matches(' ')),
        None => (None, label.as_str()),
    };
    let mut secret: Option<&str> = None;
    let mut issuer: Option<&str> = None;
    let mut algorithm: Option<&str> = None;
    let mut digits: Option<&str> = None;
    let mut period: Option<&str> = None;
    for piece in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = piece.split_once('=').ok_or(OtpauthError::Malformed)?;
        let slot = match name {
            "secret" => &mut secret,
            "issuer" => &mut issuer,
            "algorithm" => &mut algorithm,
            "digits" => &mut digits,
            "period" => &mut period,
            _ => continue,
        };
        if slot.replace(value).is_some() {
            return Err(OtpauthError::DuplicateParameter);
        }
    }
    let secret = secret.ok_or(OtpauthError::MissingSecret)?;
    let secret = percent_decode(secret).ok_or(OtpauthError::BadSecret)?;
    let secret = normalise_secret(&secret)?;
    let issuer = match issuer {
        Some(i) => Some(decode_text(i)?),
        None => label_issuer,
    };
    let algorithm = match algorithm {
        None => TotpAlgorithm::Sha1,
        Some(a) => percent_decode(a)
            .and_then(|a| TotpAlgorithm::parse(&a))
            .ok_or(OtpauthError::BadAlgorithm)?,
    };
    let digits = match digits {
        None => 6,
        Some(d) => decimal(d)
            .filter(|d| (6..=8).contains(d))
            .ok_or(OtpauthError::BadDigits)? as u32,
    };
    let period = match period {
        None => 30,
        Some(p) => decimal(p)
            .filter(|p| (1..=3600).contains(p))
            .ok_or(OtpauthError::BadPeriod)?,
    };
    Ok(OtpauthLink {
        secret,
        issuer,
        account_name: account_name.to_owned(),
        algorithm,
        digits,
        period,
    })
}

/// Rewrites `/v1/store` token data that carries a `totpUri`: the link is removed, its seed becomes
/// `totpSecret` (so it is sealed like every sensitive field), its descriptors become plain fields
/// (and so meta), and `tokenType` becomes `TOTP` unless a non-empty one was given. Returns whether a
/// link was found. On error the token data must not be stored.
pub fn expand_totp_uri(token_data: &mut Map<String, Value>) -> Result<bool, OtpauthError> {
    let Some(value) = token_data.remove(TOTP_URI_FIELD) else {
        return Ok(false);
    };
    let mut value = value;
    let result = match (&value, token_data.contains_key("totpSecret")) {
        (Value::String(uri), false) => parse_otpauth(uri),
        _ => Err(OtpauthError::Conflict),
    };
    if let Value::String(s) = &mut value {
        zeroize::Zeroize::zeroize(s);
    }
    let link = result?;
    token_data.insert("totpSecret".into(), json!(link.secret()));
    for (name, descriptor) in link.descriptors() {
        token_data.insert(name, descriptor);
    }
    let has_type = token_data
        .get("tokenType")
        .and_then(Value::as_str)
        .is_some_and(|t| !t.is_empty());
    if !has_type {
        token_data.insert("tokenType".into(), json!("TOTP"));
    }
    Ok(true)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_link() {
        let link = parse_otpauth(
            "otpauth://totp/ACME%20Co:john%40example.com?secret=jbswy3dpehpk3pxp&issuer=ACME%20Co&algorithm=sha256&digits=8&period=60&image=x",
        )
        .unwrap();
        assert_eq!(link.secret(), "JBSWY3DPEHPK3PXP");
        assert_eq!(link.issuer.as_deref(), Some("ACME Co"));
        assert_eq!(link.account_name, "john@example.com");
        assert_eq!(link.algorithm, TotpAlgorithm::Sha256);
        assert_eq!((link.digits, link.period), (8, 60));
        assert!(!format!("{link:?}").contains("JBSW"));
    }

    #[test]
    fn refusals() {
        let cases = [
            ("https://totp/a?secret=JBSWY3DP", OtpauthError::WrongScheme),
            (
                "otpauth://hotp/a?secret=JBSWY3DP&counter=1",
                OtpauthError::NotTotp,
            ),
            ("otpauth://totp/a?secret=JBSW1!", OtpauthError::BadSecret),
            ("otpauth://totp/a?secret=A", OtpauthError::BadSecret),
            ("otpauth://totp/a?secret=AB", OtpauthError::BadSecret),
            (
                "otpauth://totp/a?secret=JBSWY3DP&digits=5",
                OtpauthError::BadDigits,
            ),
            (
                "otpauth://totp/a?secret=JBSWY3DP&digits=9",
                OtpauthError::BadDigits,
            ),
            (
                "otpauth://totp/a?secret=JBSWY3DP&period=0",
                OtpauthError::BadPeriod,
            ),
            (
                "otpauth://totp/a?secret=JBSWY3DP&period=3601",
                OtpauthError::BadPeriod,
            ),
            (
                "otpauth://totp/a?secret=JBSWY3DP&algorithm=MD5",
                OtpauthError::BadAlgorithm,
            ),
            ("otpauth://totp/a", OtpauthError::MissingSecret),
            (
                "otpauth://totp/a?secret=A&secret=B",
                OtpauthError::DuplicateParameter,
            ),
            ("otpauth://totp/a%zz?secret=JBSWY3DP", OtpauthError::BadText),
            ("otpauth://totp", OtpauthError::Malformed),
        ];
        for (uri, want) in cases {
            assert_eq!(parse_otpauth(uri).err(), Some(want), "{uri}");
        }
        let long = format!(
            "otpauth://totp/a?secret=JBSWY3DP&x={}",
            "a".repeat(MAX_URI_LEN)
        );
        assert_eq!(parse_otpauth(&long).err(), Some(OtpauthError::TooLong));
    }

    #[test]
    fn expands_token_data() {
        let mut data: Map<String, Value> = serde_json::from_value(json!({
            "totpUri": "otpauth://totp/GitHub:me?secret=JBSWY3DPEHPK3PXP",
            "note": "n"
        }))
        .unwrap();
        assert_eq!(expand_totp_uri(&mut data), Ok(true));
        assert_eq!(
            Value::Object(data),
            json!({
                "note": "n",
                "totpSecret": "JBSWY3DPEHPK3PXP",
                "totpIssuer": "GitHub",
                "totpAccountName": "me",
                "totpAlgorithm": "SHA1",
                "totpDigits": 6,
                "totpPeriod": 30,
                "tokenType": "TOTP"
            })
        );
        let mut both: Map<String, Value> = serde_json::from_value(
            json!({"totpUri": "otpauth://totp/a?secret=AA", "totpSecret": "AA"}),
        )
        .unwrap();
        assert_eq!(expand_totp_uri(&mut both), Err(OtpauthError::Conflict));
        let mut none = Map::new();
        assert_eq!(expand_totp_uri(&mut none), Ok(false));
    }
}
