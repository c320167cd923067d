//! Decrypt-and-sign for keys that are not bearer tokens (issue 24): AWS SigV4 ([`aws`]),
//! client-certificate TLS (`upstream::mtls`) and JWT assertions ([`jwt`]), all applied on the
//! proxy path to the request the keyholder itself sends to an origin the egress policy allowed.
//! Nothing here signs caller-supplied bytes.
//!
//! What a credential signs with is read from its sealed fields' names (a `kh1` field cannot be
//! renamed or moved): `secretAccessKey` makes it an AWS key, `certificateData` with
//! `privateKeyData` a client certificate, and `privateKeyData` with the owner's JWT template a JWT
//! signer. Region, signing service, STS role, JWT claims and token URL come only from the owner's
//! [`config::SignConfig`]; a bearer credential (none of these fields) costs nothing here.

pub mod aws;
pub mod config;
pub mod jwt;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use keyholder_protocol::document::OpenedToken;
use serde_json::{Map, Value};
use zeroize::Zeroizing;

use url::Url;

use self::aws::AwsKey;
use self::config::{JwtTemplate, SignConfig};
use super::catalogue;
use super::credentials::OpenedCredential;
use super::egress::EgressService;
use super::VaultError;
use crate::storage::SharedStorage;
use crate::upstream::mtls::{check_identity, ClientIdentity};
use crate::upstream::{OutboundRequest, Upstream};

/// The signing state of a running server: the owner's configurations read so far (cleared with
/// every owner change), assumed-role sessions and exchanged JWT access tokens.
#[derive(Default)]
pub struct SigningState {
    configs: Mutex<HashMap<String, Option<Arc<SignConfig>>>>,
    /// Assumed-role sessions.
    pub sessions: aws::SessionCache,
    /// Access tokens from RFC 7523 exchanges.
    pub exchanged: jwt::ExchangedTokens,
}

impl SigningState {
    /// Forgets the cached configurations (the owner changed something).
    pub fn clear(&self) {
        if let Ok(mut configs) = self.configs.lock() {
            configs.clear();
        }
    }
}

/// How one proxied call is signed (no Debug: it holds keys).
pub(crate) struct Signing {
    /// The AWS key to sign with (SigV4).
    pub aws: Option<AwsKey>,
    /// The TLS client identity to present.
    pub tls: Option<ClientIdentity>,
    /// The JWT template and the key that signs it.
    pub jwt: Option<(JwtTemplate, Zeroizing<String>)>,
    /// The owner's configuration.
    pub config: Arc<SignConfig>,
    /// Leaf certificate fingerprint (for the audit trail).
    pub certificate: Option<String>,
}

impl Signing {
    /// The audit note: which key signs what kind of request (never a signature or a key).
    pub fn note(&self, aws_key_id: Option<&str>, aws_scope: Option<&(String, String)>) -> String {
        let mut parts = Vec::new();
        if let Some(key_id) = aws_key_id {
            let scope = aws_scope
                .map(|(service, region)| format!(" scope={region}/{service}"))
                .unwrap_or_default();
            let role = if self
                .config
                .aws
                .as_ref()
                .and_then(|a| a.role_arn.as_ref())
                .is_some()
            {
                " via=sts-assume-role"
            } else {
                ""
            };
            parts.push(format!("signed=aws-sigv4 key={key_id}{scope}{role}"));
        }
        if let Some(fp) = &self.certificate {
            parts.push(format!(
                "signed=tls-client-cert cert=sha256:{}",
                &fp[..fp.len().min(16)]
            ));
        }
        if let Some((template, _)) = &self.jwt {
            let how = if template.token_url.is_some() {
                "rfc7523-exchange"
            } else {
                "header"
            };
            parts.push(format!(
                "signed=jwt-{} iss={} use={how}",
                template.alg.as_str(),
                template.iss
            ));
        }
        parts.join(" ")
    }
}

/// Whether a credential carries anything this module signs with (cheap: three field lookups, no
/// allocation; a bearer credential answers false and skips the rest).
pub(crate) fn has_material(token: &OpenedToken) -> bool {
    token.secret("secretAccessKey").is_some()
        || token.secret("certificateData").is_some()
        || token.secret("privateKeyData").is_some()
}

fn text<'a>(data: &'a Map<String, Value>, name: &str) -> Option<&'a str> {
    data.get(name).and_then(Value::as_str)
}

/// Store-time checks of signing key material (before anything is sealed): an AWS credential
/// (`tokenType: "aws"` or a `secretAccessKey`) needs a well-formed key; a certificate with a
/// private key must parse as a TLS client identity.
pub fn validate_material(token_data: &Map<String, Value>) -> Result<(), VaultError> {
    // A lone `sessionToken` (another kind of credential may use the name) is sealed, not checked.
    let aws = text(token_data, "tokenType").is_some_and(|t| t.eq_ignore_ascii_case("aws"))
        || token_data.contains_key("secretAccessKey");
    if aws {
        let field = |name: &str| -> Result<Option<&str>, VaultError> {
            match token_data.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.as_str())),
                Some(_) => Err(VaultError::Invalid(format!(
                    "AWS credential: '{name}' must be a string"
                ))),
            }
        };
        aws::validate_key(
            field("accessKeyId")?,
            field("secretAccessKey")?,
            field("sessionToken")?,
        )?;
    }
    if let (Some(Value::String(cert)), Some(Value::String(key))) = (
        token_data.get("certificateData"),
        token_data.get("privateKeyData"),
    ) {
        let chain = text(token_data, "certificateChain");
        let mut pem = Zeroizing::new(String::new());
        for part in [Some(cert.as_str()), chain, Some(key.as_str())]
            .into_iter()
            .flatten()
        {
            pem.push_str(part.trim());
            pem.push('\n');
        }
        check_identity(pem.as_bytes()).map_err(VaultError::Invalid)?;
    }
    Ok(())
}

/// The signing service: the owner's signing configurations, assumed-role sessions and exchanged
/// JWT tokens (issue 24), and the outbound signature itself.
pub struct SigningService {
    storage: SharedStorage,
    pub(crate) state: SigningState,
    egress: Arc<EgressService>,
}

impl SigningService {
    /// The service over `storage`, checking token endpoints with `egress`.
    pub fn new(storage: SharedStorage, egress: Arc<EgressService>) -> SigningService {
        SigningService {
            storage,
            state: SigningState::default(),
            egress,
        }
    }

    fn storage(&self) -> &SharedStorage {
        &self.storage
    }

    /// Forgets the cached configurations, sessions and tokens (the owner may have changed them).
    pub(crate) fn clear_cache(&self) {
        self.state.clear();
    }

    /// The owner's signing configuration of `service` (cached until the next owner change).
    pub async fn sign_config(&self, service: &str) -> Result<Option<Arc<SignConfig>>, VaultError> {
        if let Some(hit) = self
            .state
            .configs
            .lock()
            .ok()
            .and_then(|c| c.get(service).cloned())
        {
            return Ok(hit);
        }
        let text = self.storage().sign_config(service).await?;
        let config = match text {
            Some(text) => Some(Arc::new(SignConfig::from_stored(&text)?)),
            None => None,
        };
        if let Ok(mut configs) = self.state.configs.lock() {
            if configs.len() >= 10_000 {
                configs.clear();
            }
            configs.insert(service.to_string(), config.clone());
        }
        Ok(config)
    }

    /// How `credential` signs a proxied call, if it signs at all (see the module doc).
    pub(crate) async fn signing_plan(
        &self,
        service: &str,
        credential: &OpenedCredential,
    ) -> Result<Option<Signing>, VaultError> {
        let token = &credential.token;
        if !has_material(token) {
            return Ok(None);
        }
        let config = self.sign_config(service).await?.unwrap_or_default();
        let aws = match token.secret("secretAccessKey") {
            Some(secret) => {
                let id = token
                    .meta()
                    .get("accessKeyId")
                    .and_then(Value::as_str)
                    .or_else(|| token.secret("accessKeyId"));
                let session = token.secret("sessionToken");
                aws::validate_key(id, Some(secret), session)?;
                Some(AwsKey {
                    access_key_id: id.unwrap_or_default().to_string(),
                    secret_access_key: Zeroizing::new(secret.to_string()),
                    session_token: session.map(|s| Zeroizing::new(s.to_string())),
                })
            }
            None => None,
        };
        let (tls, certificate) = match (
            token.secret("certificateData"),
            token.secret("privateKeyData"),
        ) {
            (Some(cert), Some(key)) => (
                Some(
                    ClientIdentity::new(
                        service,
                        cert,
                        token.secret("certificateChain"),
                        key,
                        config.tls_ca_pem.as_deref(),
                    )
                    .map_err(VaultError::Invalid)?,
                ),
                ClientIdentity::certificate_fingerprint(cert),
            ),
            _ => (None, None),
        };
        let jwt = match (&config.jwt, token.secret("privateKeyData")) {
            (Some(template), Some(key)) => {
                Some((template.clone(), Zeroizing::new(key.to_string())))
            }
            _ => None,
        };
        if aws.is_none() && tls.is_none() && jwt.is_none() {
            return Ok(None);
        }
        Ok(Some(Signing {
            aws,
            tls,
            jwt,
            config,
            certificate,
        }))
    }

    /// The SigV4 scope `(service, region)` of an AWS-signed call to `url` (None for other keys).
    /// The owner's region scopes the AWS origins: a host of another region is refused (and
    /// recorded like any egress refusal) before anything is sent.
    pub(crate) async fn aws_scope(
        &self,
        service: &str,
        signing: &Signing,
        url: &Url,
        origin: &str,
        request_id: &str,
    ) -> Result<Option<(String, String)>, VaultError> {
        if signing.aws.is_none() {
            return Ok(None);
        }
        let config = signing.config.aws.as_ref();
        if let (Some(region), Some((_, host_region))) = (
            config.and_then(|c| c.region.as_deref()),
            url.host_str().and_then(aws::scope_from_host),
        ) {
            if host_region != region {
                let reason = format!(
                    "{origin} is in AWS region {host_region}, outside the region {region} the \
                     owner set for service '{service}' (keyholder sign-config)"
                );
                return Err(self
                    .egress
                    .refuse_egress(service, origin, reason, request_id)
                    .await);
            }
        }
        aws::scope_for(url, config).map(Some)
    }

    /// Signs the outbound request as `signing` says (SigV4, with assumed-role session
    /// credentials when the owner named a role; the TLS identity and JWT act elsewhere), right
    /// before it is sent; returns the audit note.
    pub(crate) async fn sign_outbound(
        &self,
        upstream: &Upstream,
        service: &str,
        signing: &Signing,
        aws_scope: Option<&(String, String)>,
        outbound: &mut OutboundRequest,
        request_id: &str,
    ) -> Result<String, VaultError> {
        let mut key_id = None;
        if let (Some(key), Some((aws_service, region))) = (&signing.aws, aws_scope) {
            let config = signing.config.aws.as_ref();
            let assumed = match config.filter(|c| c.role_arn.is_some()) {
                Some(config) => {
                    let sts = aws::sts_endpoint(config)?;
                    self.egress
                        .check_token_endpoint(
                            upstream,
                            service,
                            &sts,
                            Some(&catalogue::AWS),
                            request_id,
                        )
                        .await?;
                    Some(
                        self.state
                            .sessions
                            .assume_role(upstream, service, key, config, sts)
                            .await?,
                    )
                }
                None => None,
            };
            let used = assumed.as_ref().unwrap_or(key);
            key_id = Some(used.access_key_id.clone());
            aws::sign_request(
                outbound,
                used,
                aws_service,
                region,
                config.is_some_and(|c| c.unsigned_payload),
                std::time::SystemTime::now(),
            )?;
        }
        Ok(signing.note(key_id.as_deref(), aws_scope))
    }
}
