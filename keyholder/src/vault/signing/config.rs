//! The owner's signing configuration of a service (`keyholder sign-config set`): the AWS region and
//! signing service (and an optional STS role), the JWT assertion template, and a CA to trust for a
//! client-certificate upstream. It comes only from the owner's CLI (the `sign_configs` table); the
//! platform cannot read or write it, and nothing in a stored document overrides it.

use serde::{Deserialize, Serialize};

use crate::vault::VaultError;

/// Longest JWT lifetime the owner may set (seconds).
pub const MAX_JWT_LIFETIME: u64 = 3600;
/// JWT lifetime when the owner sets none (seconds).
pub const DEFAULT_JWT_LIFETIME: u64 = 300;
/// Largest CA bundle accepted for `--tls-ca`.
pub const MAX_CA_PEM: usize = 64 * 1024;

/// One service's signing configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SignConfig {
    /// AWS Signature Version 4 settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws: Option<AwsConfig>,
    /// The JWT assertion template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<JwtTemplate>,
    /// PEM CA certificates trusted for this service's upstream (client-certificate TLS to an API
    /// with a private CA), besides the system roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca_pem: Option<String>,
}

/// AWS signing settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AwsConfig {
    /// Signing region (else from the host `<service>.<region>.amazonaws.com`). Also scopes the
    /// catalogue's AWS origins to this region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Signing service name (else from the host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Sign `UNSIGNED-PAYLOAD` instead of the body's hash (S3 allows it; the owner opts in).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unsigned_payload: bool,
    /// Role to assume with STS before signing (session credentials cached until near expiry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role_arn: Option<String>,
    /// `ExternalId` of the AssumeRole call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_id: Option<String>,
    /// STS endpoint (default `https://sts.<region>.amazonaws.com`, or the global one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sts_url: Option<String>,
}

/// JWT signature algorithms.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum JwtAlg {
    /// RSA PKCS#1 v1.5 with SHA-256.
    #[default]
    RS256,
    /// ECDSA P-256 with SHA-256.
    ES256,
    /// Ed25519.
    EdDSA,
}

impl JwtAlg {
    /// Parses `RS256`, `ES256` or `EdDSA`.
    pub fn parse(text: &str) -> Result<JwtAlg, VaultError> {
        match text {
            "RS256" => Ok(JwtAlg::RS256),
            "ES256" => Ok(JwtAlg::ES256),
            "EdDSA" => Ok(JwtAlg::EdDSA),
            other => Err(VaultError::Invalid(format!(
                "--alg '{other}': expected RS256, ES256 or EdDSA"
            ))),
        }
    }

    /// The JOSE name.
    pub fn as_str(self) -> &'static str {
        match self {
            JwtAlg::RS256 => "RS256",
            JwtAlg::ES256 => "ES256",
            JwtAlg::EdDSA => "EdDSA",
        }
    }
}

/// The owner-declared JWT assertion: `iss`, `sub`, `aud` fixed; `iat`, `exp` and `jti` added
/// at signing time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtTemplate {
    /// Issuer.
    pub iss: String,
    /// Subject.
    pub sub: String,
    /// Audience.
    pub aud: String,
    /// Lifetime in seconds.
    pub lifetime: u64,
    /// Algorithm.
    pub alg: JwtAlg,
    /// RFC 7523 token endpoint: the assertion is exchanged there and the access token injected
    /// as `${TOKEN}`. Without it, the assertion itself is injected as `${JWT}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_url: Option<String>,
    /// `kid` header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    /// `scope` of the token request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
}

fn check_label(flag: &str, value: &str, max: usize) -> Result<(), VaultError> {
    let ok = !value.is_empty()
        && value.len() <= max
        && value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(VaultError::Invalid(format!(
            "{flag} '{value}': lower-case letters, digits and '-', at most {max} characters"
        )))
    }
}

fn check_text(flag: &str, value: &str, max: usize) -> Result<(), VaultError> {
    if value.is_empty() || value.len() > max || value.chars().any(char::is_control) {
        return Err(VaultError::Invalid(format!(
            "{flag}: 1 to {max} characters, no control characters"
        )));
    }
    Ok(())
}

fn check_url(flag: &str, value: &str) -> Result<(), VaultError> {
    let url = url::Url::parse(value)
        .map_err(|_| VaultError::Invalid(format!("{flag} '{value}' is not an absolute URL")))?;
    if !matches!(url.scheme(), "https" | "http") || url.host_str().is_none() {
        return Err(VaultError::Invalid(format!(
            "{flag} '{value}' must be an http(s) URL"
        )));
    }
    if value.len() > 2048 || !url.username().is_empty() || url.password().is_some() {
        return Err(VaultError::Invalid(format!(
            "{flag}: at most 2048 characters and no user information"
        )));
    }
    Ok(())
}

impl AwsConfig {
    /// Checks every value the owner gave.
    pub fn validate(&self) -> Result<(), VaultError> {
        if let Some(region) = &self.region {
            check_label("--aws-region", region, 32)?;
        }
        if let Some(service) = &self.service {
            check_label("--aws-service", service, 64)?;
        }
        if let Some(arn) = &self.role_arn {
            let ok = arn.starts_with("arn:aws")
                && arn.contains(":role/")
                && arn.len() <= 2048
                && arn.chars().all(|c| c.is_ascii_graphic());
            if !ok {
                return Err(VaultError::Invalid(format!(
                    "--aws-role-arn '{arn}' is not an IAM role ARN (arn:aws:iam::ACCOUNT:role/NAME)"
                )));
            }
        }
        if let Some(id) = &self.external_id {
            check_text("--aws-external-id", id, 1224)?;
        }
        if let Some(url) = &self.sts_url {
            check_url("--aws-sts-url", url)?;
        }
        Ok(())
    }
}

impl JwtTemplate {
    /// Checks every value the owner gave.
    pub fn validate(&self) -> Result<(), VaultError> {
        check_text("--iss", &self.iss, 512)?;
        check_text("--sub", &self.sub, 512)?;
        check_text("--aud", &self.aud, 2048)?;
        if self.lifetime == 0 || self.lifetime > MAX_JWT_LIFETIME {
            return Err(VaultError::Invalid(format!(
                "--lifetime: 1 to {MAX_JWT_LIFETIME} seconds"
            )));
        }
        if let Some(url) = &self.token_url {
            check_url("--token-url", url)?;
        }
        if let Some(kid) = &self.kid {
            check_text("--kid", kid, 256)?;
        }
        if let Some(scope) = &self.scope {
            check_text("--scope", scope, 2048)?;
        }
        Ok(())
    }
}

impl SignConfig {
    /// Checks the whole configuration.
    pub fn validate(&self) -> Result<(), VaultError> {
        if let Some(aws) = &self.aws {
            aws.validate()?;
        }
        if let Some(jwt) = &self.jwt {
            jwt.validate()?;
        }
        if let Some(pem) = &self.tls_ca_pem {
            if pem.len() > MAX_CA_PEM {
                return Err(VaultError::Invalid(format!(
                    "--tls-ca: at most {MAX_CA_PEM} bytes"
                )));
            }
            let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes())
                .map_err(|_| VaultError::Invalid("--tls-ca: not PEM certificates".into()))?;
            if certs.is_empty() {
                return Err(VaultError::Invalid(
                    "--tls-ca: no certificate in the file".into(),
                ));
            }
        }
        Ok(())
    }

    /// True when nothing is configured.
    pub fn is_empty(&self) -> bool {
        self.aws.is_none() && self.jwt.is_none() && self.tls_ca_pem.is_none()
    }

    /// Parses a stored row.
    pub fn from_stored(text: &str) -> Result<SignConfig, VaultError> {
        serde_json::from_str(text).map_err(|e| VaultError::Corrupt(format!("sign config: {e}")))
    }

    /// The stored form.
    pub fn to_stored(&self) -> Result<String, VaultError> {
        serde_json::to_string(self).map_err(|e| VaultError::Corrupt(e.to_string()))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn validation_refuses_bad_values() {
        let mut aws = AwsConfig {
            region: Some("us-east-1".into()),
            service: Some("s3".into()),
            ..AwsConfig::default()
        };
        aws.validate().unwrap();
        aws.region = Some("US EAST".into());
        assert!(aws.validate().is_err());
        aws.region = None;
        aws.role_arn = Some("arn:aws:iam::123456789012:role/reader".into());
        aws.validate().unwrap();
        aws.role_arn = Some("not-an-arn".into());
        assert!(aws.validate().is_err());
        let mut jwt = JwtTemplate {
            iss: "i".into(),
            sub: "s".into(),
            aud: "a".into(),
            lifetime: 300,
            alg: JwtAlg::ES256,
            token_url: Some("https://login.example/token".into()),
            kid: None,
            scope: None,
        };
        jwt.validate().unwrap();
        jwt.lifetime = 0;
        assert!(jwt.validate().is_err());
        jwt.lifetime = 60;
        jwt.token_url = Some("file:///etc/passwd".into());
        assert!(jwt.validate().is_err());
        jwt.token_url = None;
        jwt.iss = "a\nb".into();
        assert!(jwt.validate().is_err());
        assert!(JwtAlg::parse("HS256").is_err());
        let config = SignConfig {
            jwt: None,
            aws: Some(AwsConfig::default()),
            tls_ca_pem: None,
        };
        assert_eq!(
            SignConfig::from_stored(&config.to_stored().unwrap()).unwrap(),
            config
        );
        assert!(SignConfig::from_stored(r#"{"aws":{},"extra":1}"#).is_err());
    }
}
