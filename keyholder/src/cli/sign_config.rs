//! `keyholder sign-config ...`: the owner's signing configuration per service (issue 24): AWS
//! region, signing service and STS role; the JWT assertion template; a CA for client-certificate
//! upstreams. Each change is one transaction with an owner entry in the audit trail and an
//! owner-generation bump, so a running server applies it within a quarter second.

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};
use serde_json::json;

use super::session::{block, Owner};
use crate::config::DataArgs;
use crate::storage::{ChangeSet, Storage, Write};
use crate::vault::collections::validate_key;
use crate::vault::signing::config::{
    JwtAlg, JwtTemplate, SignConfig, DEFAULT_JWT_LIFETIME, MAX_CA_PEM,
};

/// `keyholder sign-config`.
#[derive(Debug, Clone, Args)]
pub struct SignConfigArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: SignConfigAction,
}

/// The flags of `sign-config set` (each given flag replaces its value; others are kept).
#[derive(Debug, Clone, Default, Args)]
pub struct SetFlags {
    /// AWS: signing region (else taken from the host `<service>.<region>.amazonaws.com`); also
    /// limits the credential to that region's AWS hosts.
    #[arg(long, value_name = "R")]
    pub aws_region: Option<String>,
    /// AWS: signing service name, e.g. s3, bedrock (else taken from the host).
    #[arg(long, value_name = "S")]
    pub aws_service: Option<String>,
    /// AWS: sign S3 requests with UNSIGNED-PAYLOAD instead of the body's SHA-256 (S3 only).
    #[arg(long)]
    pub aws_unsigned_payload: bool,
    /// AWS: role to assume with STS AssumeRole; requests are signed with its session credentials.
    #[arg(long, value_name = "ARN")]
    pub aws_role_arn: Option<String>,
    /// AWS: ExternalId of the AssumeRole call.
    #[arg(long, value_name = "ID")]
    pub aws_external_id: Option<String>,
    /// AWS: STS endpoint (default https://sts.<region>.amazonaws.com/).
    #[arg(long, value_name = "URL")]
    pub aws_sts_url: Option<String>,
    /// JWT: issuer claim.
    #[arg(long, value_name = "I")]
    pub iss: Option<String>,
    /// JWT: subject claim.
    #[arg(long, value_name = "S")]
    pub sub: Option<String>,
    /// JWT: audience claim.
    #[arg(long, value_name = "A")]
    pub aud: Option<String>,
    /// JWT: lifetime in seconds (default 300, at most 3600).
    #[arg(long, value_name = "SECS")]
    pub lifetime: Option<u64>,
    /// JWT: signature algorithm (default RS256).
    #[arg(long, value_name = "RS256|ES256|EdDSA")]
    pub alg: Option<String>,
    /// JWT: RFC 7523 token endpoint; the assertion is exchanged there and the access token is
    /// injected as ${TOKEN} (without it the assertion itself is injected as ${JWT}).
    #[arg(long, value_name = "URL")]
    pub token_url: Option<String>,
    /// JWT: `kid` header.
    #[arg(long, value_name = "KID")]
    pub kid: Option<String>,
    /// JWT: `scope` of the token request (with --token-url).
    #[arg(long, value_name = "SCOPE")]
    pub scope: Option<String>,
    /// Client-certificate TLS: PEM file of CA certificates to trust for this service's upstream.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
}

/// One part of a configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Part {
    /// The AWS settings.
    Aws,
    /// The JWT template.
    Jwt,
    /// The upstream CA.
    Tls,
}

/// `keyholder sign-config` subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum SignConfigAction {
    /// Create or change a service's signing configuration.
    Set {
        /// Data folder and master key.
        #[command(flatten)]
        data: DataArgs,
        /// The service (credential key).
        service: String,
        /// What to set.
        #[command(flatten)]
        flags: Box<SetFlags>,
    },
    /// Every service's signing configuration.
    List {
        /// Data folder and master key.
        #[command(flatten)]
        data: DataArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// One service's signing configuration.
    Show {
        /// Data folder and master key.
        #[command(flatten)]
        data: DataArgs,
        /// The service.
        service: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a service's signing configuration (or one part of it).
    Remove {
        /// Data folder and master key.
        #[command(flatten)]
        data: DataArgs,
        /// The service.
        service: String,
        /// Only this part.
        #[arg(long, value_enum)]
        part: Option<Part>,
    },
}

async fn load(storage: &dyn Storage, service: &str) -> anyhow::Result<Option<SignConfig>> {
    Ok(match storage.sign_config(service).await? {
        Some(text) => Some(SignConfig::from_stored(&text)?),
        None => None,
    })
}

/// Lays the given flags over `base`.
fn apply(mut base: SignConfig, flags: &SetFlags) -> anyhow::Result<SignConfig> {
    let aws_given = flags.aws_region.is_some()
        || flags.aws_service.is_some()
        || flags.aws_unsigned_payload
        || flags.aws_role_arn.is_some()
        || flags.aws_external_id.is_some()
        || flags.aws_sts_url.is_some();
    if aws_given {
        let mut aws = base.aws.take().unwrap_or_default();
        if let Some(v) = &flags.aws_region {
            aws.region = Some(v.clone());
        }
        if let Some(v) = &flags.aws_service {
            aws.service = Some(v.clone());
        }
        if flags.aws_unsigned_payload {
            aws.unsigned_payload = true;
        }
        if let Some(v) = &flags.aws_role_arn {
            aws.role_arn = Some(v.clone());
        }
        if let Some(v) = &flags.aws_external_id {
            aws.external_id = Some(v.clone());
        }
        if let Some(v) = &flags.aws_sts_url {
            aws.sts_url = Some(v.clone());
        }
        if aws.unsigned_payload && aws.service.as_deref().is_some_and(|s| s != "s3") {
            anyhow::bail!("--aws-unsigned-payload applies to S3 only (--aws-service s3)");
        }
        base.aws = Some(aws);
    }
    let jwt_given = flags.iss.is_some()
        || flags.sub.is_some()
        || flags.aud.is_some()
        || flags.lifetime.is_some()
        || flags.alg.is_some()
        || flags.token_url.is_some()
        || flags.kid.is_some()
        || flags.scope.is_some();
    if jwt_given {
        let mut jwt = match base.jwt.take() {
            Some(jwt) => jwt,
            None => match (&flags.iss, &flags.sub, &flags.aud) {
                (Some(iss), Some(sub), Some(aud)) => JwtTemplate {
                    iss: iss.clone(),
                    sub: sub.clone(),
                    aud: aud.clone(),
                    lifetime: DEFAULT_JWT_LIFETIME,
                    alg: JwtAlg::default(),
                    token_url: None,
                    kid: None,
                    scope: None,
                },
                _ => anyhow::bail!("a new JWT template needs --iss, --sub and --aud"),
            },
        };
        if let Some(v) = &flags.iss {
            jwt.iss = v.clone();
        }
        if let Some(v) = &flags.sub {
            jwt.sub = v.clone();
        }
        if let Some(v) = &flags.aud {
            jwt.aud = v.clone();
        }
        if let Some(v) = flags.lifetime {
            jwt.lifetime = v;
        }
        if let Some(v) = &flags.alg {
            jwt.alg = JwtAlg::parse(v)?;
        }
        if let Some(v) = &flags.token_url {
            jwt.token_url = Some(v.clone());
        }
        if let Some(v) = &flags.kid {
            jwt.kid = Some(v.clone());
        }
        if let Some(v) = &flags.scope {
            jwt.scope = Some(v.clone());
        }
        base.jwt = Some(jwt);
    }
    if let Some(path) = &flags.tls_ca {
        let meta = std::fs::metadata(path)
            .map_err(|e| anyhow::anyhow!("--tls-ca {}: {e}", path.display()))?;
        if meta.len() > MAX_CA_PEM as u64 {
            anyhow::bail!(
                "--tls-ca {}: larger than {MAX_CA_PEM} bytes",
                path.display()
            );
        }
        let pem = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("--tls-ca {}: {e}", path.display()))?;
        base.tls_ca_pem = Some(pem);
    }
    if !aws_given && !jwt_given && flags.tls_ca.is_none() {
        anyhow::bail!(
            "nothing to set: give AWS flags (--aws-region, --aws-service, ...), a JWT template \
             (--iss, --sub, --aud, ...) or --tls-ca"
        );
    }
    base.validate()?;
    Ok(base)
}

/// One configuration as text lines (no secret is ever in one).
fn describe(service: &str, config: &SignConfig) -> String {
    let mut lines = vec![format!("Service:  {service}")];
    if let Some(aws) = &config.aws {
        let mut parts = vec![
            format!("region={}", aws.region.as_deref().unwrap_or("(from host)")),
            format!(
                "service={}",
                aws.service.as_deref().unwrap_or("(from host)")
            ),
        ];
        if aws.unsigned_payload {
            parts.push("unsigned-payload".into());
        }
        if let Some(arn) = &aws.role_arn {
            parts.push(format!("assume-role={arn}"));
        }
        if aws.external_id.is_some() {
            parts.push("external-id=(set)".into());
        }
        if let Some(url) = &aws.sts_url {
            parts.push(format!("sts={url}"));
        }
        lines.push(format!("AWS:      {}", parts.join(" ")));
    }
    if let Some(jwt) = &config.jwt {
        let mut parts = vec![
            format!("alg={}", jwt.alg.as_str()),
            format!("iss={}", jwt.iss),
            format!("sub={}", jwt.sub),
            format!("aud={}", jwt.aud),
            format!("lifetime={}s", jwt.lifetime),
        ];
        match &jwt.token_url {
            Some(url) => parts.push(format!("token-url={url} (injected as ${{TOKEN}})")),
            None => parts.push("(injected as ${JWT})".into()),
        }
        if let Some(kid) = &jwt.kid {
            parts.push(format!("kid={kid}"));
        }
        if let Some(scope) = &jwt.scope {
            parts.push(format!("scope={scope}"));
        }
        lines.push(format!("JWT:      {}", parts.join(" ")));
    }
    if let Some(pem) = &config.tls_ca_pem {
        let count = pem.matches("-----BEGIN CERTIFICATE-----").count();
        lines.push(format!("TLS CA:   {count} certificate(s)"));
    }
    lines.join("\n")
}

fn as_json(service: &str, config: &SignConfig) -> serde_json::Value {
    let mut value = serde_json::to_value(config).unwrap_or_else(|_| json!({}));
    if let Some(map) = value.as_object_mut() {
        map.insert("service".into(), json!(service));
    }
    value
}

fn put(service: &str, config: &SignConfig) -> anyhow::Result<ChangeSet> {
    Ok(ChangeSet::owner().write(Write::PutSignConfig(
        service.to_string(),
        config.to_stored()?,
        crate::clock::now_unix(),
    )))
}

/// Runs a `sign-config` subcommand; returns what to print.
pub fn run(args: &SignConfigArgs) -> anyhow::Result<String> {
    match &args.action {
        SignConfigAction::Set {
            data,
            service,
            flags,
        } => block(async {
            validate_key(service)?;
            let owner = Owner::open(data).await?;
            let config = apply(
                load(owner.storage(), service).await?.unwrap_or_default(),
                flags,
            )?;
            owner
                .commit(
                    "sign-config-set",
                    &format!("sign-config {service}"),
                    put(service, &config)?,
                )
                .await?;
            Ok(describe(service, &config))
        }),
        SignConfigAction::Show {
            data,
            service,
            json,
        } => block(async {
            validate_key(service)?;
            let owner = Owner::open(data).await?;
            let Some(config) = load(owner.storage(), service).await? else {
                anyhow::bail!("no signing configuration for service '{service}'");
            };
            Ok(if *json {
                as_json(service, &config).to_string()
            } else {
                describe(service, &config)
            })
        }),
        SignConfigAction::List { data, json } => block(async {
            let owner = Owner::open(data).await?;
            let mut all = Vec::new();
            for (service, text) in owner.storage().sign_configs().await? {
                all.push((service, SignConfig::from_stored(&text)?));
            }
            Ok(if *json {
                serde_json::Value::Array(all.iter().map(|(s, c)| as_json(s, c)).collect())
                    .to_string()
            } else if all.is_empty() {
                "No signing configurations.".into()
            } else {
                all.iter()
                    .map(|(s, c)| describe(s, c))
                    .collect::<Vec<_>>()
                    .join("\n\n")
            })
        }),
        SignConfigAction::Remove {
            data,
            service,
            part,
        } => block(async {
            validate_key(service)?;
            let owner = Owner::open(data).await?;
            let Some(mut config) = load(owner.storage(), service).await? else {
                anyhow::bail!("no signing configuration for service '{service}'");
            };
            let (change, line) = match part {
                None => (
                    ChangeSet::owner().write(Write::DeleteSignConfig(service.clone())),
                    format!("removed the signing configuration of '{service}'"),
                ),
                Some(part) => {
                    match part {
                        Part::Aws => config.aws = None,
                        Part::Jwt => config.jwt = None,
                        Part::Tls => config.tls_ca_pem = None,
                    }
                    let change = if config.is_empty() {
                        ChangeSet::owner().write(Write::DeleteSignConfig(service.clone()))
                    } else {
                        put(service, &config)?
                    };
                    (
                        change,
                        format!(
                            "removed the {} part of the signing configuration of '{service}'",
                            format!("{part:?}").to_ascii_lowercase()
                        ),
                    )
                }
            };
            owner
                .commit(
                    "sign-config-remove",
                    &format!("sign-config {service}"),
                    change,
                )
                .await?;
            Ok(line)
        }),
    }
}
