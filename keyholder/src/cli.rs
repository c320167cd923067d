//! The owner's commands that work on the data folder directly, also while a server runs on it
//! (SQLite WAL; every change is a committed transaction the server reads on its next request),
//! and the container's `healthcheck`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

pub mod doctor;
pub mod migrate_storage;
pub mod owner;
pub mod policy;
pub mod session;
pub mod sign_config;

use clap::Args;
use zeroize::Zeroizing;

use crate::config::{validate_url, DataArgs};
use crate::storage::{Applied, Setting};
use crate::vault::binding::{issue_bind_code, IssuedCode};
use crate::vault::collections::validate_key;
use crate::vault::egress::{self, EgressMode, EgressPolicy};
use crate::vault::oauth::{self, ProviderInfo};
use crate::vault::platform_keys::{self, PlatformKeyInfo};
use crate::vault::VaultError;
use keyholder_protocol::PlatformPublicKey;
use session::{block, Owner};

/// Flags of `keyholder bind`.
#[derive(Debug, Clone, Args)]
pub struct BindArgs {
    /// Data folder and master key.
    #[command(flatten)]
    pub data: DataArgs,
    /// Public URL the platform reaches this keyholder at (remembered from `serve --public-url` if omitted).
    #[arg(long, env = "KEYHOLDER_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Platform frontend that serves the registration page.
    #[arg(long, env = "KEYHOLDER_FRONTEND_URL", default_value = keyholder_protocol::paths::DEFAULT_FRONTEND)]
    pub frontend_url: String,
    /// Issue a code whose exchange replaces the current binding and HMAC secret (the old one stops
    /// working then); with --platform-key it re-binds asymmetrically.
    #[arg(long)]
    pub rebind: bool,
    /// Asymmetric binding: file holding the platform's Ed25519 public key (32 raw bytes, standard
    /// base64, or an identity document). Its exchange hands out no secret; the platform then signs
    /// with Ed25519 request envelopes and `kh2` tickets.
    #[arg(long, value_name = "FILE")]
    pub platform_key: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Issues a bind code (see [`issue_bind_code`]).
pub fn bind(args: &BindArgs) -> anyhow::Result<IssuedCode> {
    let frontend = validate_url("--frontend-url", &args.frontend_url)?;
    let platform_key = args
        .platform_key
        .as_deref()
        .map(read_platform_key)
        .transpose()?;
    block(async {
        let owner = Owner::open_or_create(&args.data).await?;
        let public_url = match &args.public_url {
            Some(url) => validate_url("--public-url / KEYHOLDER_PUBLIC_URL", url)?,
            None => owner.storage().setting(Setting::PublicUrl).await?.ok_or_else(|| {
                anyhow::anyhow!(
                    "no public URL known: pass --public-url https://<host> (the address the platform reaches this keyholder at)"
                )
            })?,
        };
        match issue_bind_code(
            owner.storage(),
            &owner.master,
            args.rebind,
            platform_key.as_ref(),
            &public_url,
            &frontend,
            crate::clock::now_unix(),
        )
        .await
        {
            Ok(issued) => Ok(issued),
            Err(VaultError::AlreadyBound) => anyhow::bail!(
                "this keyholder is already bound; `keyholder bind --rebind` issues a code that replaces the binding"
            ),
            Err(other) => Err(other.into()),
        }
    })
}

/// Reads a platform public key file (32 raw bytes, standard base64, or an identity document).
pub fn read_platform_key(path: &std::path::Path) -> anyhow::Result<PlatformPublicKey> {
    let raw = std::fs::read(path)
        .map_err(|e| anyhow::anyhow!("--platform-key {}: {e}", path.display()))?;
    PlatformPublicKey::parse(&raw)
        .map_err(|e| anyhow::anyhow!("--platform-key {}: {e}", path.display()))
}

/// `keyholder platform-key`: the platform's Ed25519 keys of an asymmetric binding (at most two, so
/// that the platform can rotate: add the new key, switch, remove the old one).
#[derive(Debug, Clone, Args)]
pub struct PlatformKeyArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: PlatformKeyAction,
}

/// `keyholder platform-key` subcommands (each takes effect at once, also on a running server).
#[derive(Debug, Clone, clap::Subcommand)]
pub enum PlatformKeyAction {
    /// Add a second active platform key (public key file: 32 raw bytes, base64, or identity document).
    Add {
        /// Data folder and master key.
        #[command(flatten)]
        data: DataArgs,
        /// The public key file.
        file: PathBuf,
    },
    /// Remove an active platform key by key id; its signatures are refused from then on.
    Remove {
        /// Data folder and master key.
        #[command(flatten)]
        data: DataArgs,
        /// The key id (16 hex).
        key_id: String,
    },
    /// List the active platform keys.
    List {
        /// Data folder and master key.
        #[command(flatten)]
        data: DataArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a platform-key subcommand; returns the keys active afterwards.
pub fn platform_key(args: &PlatformKeyArgs) -> anyhow::Result<Vec<PlatformKeyInfo>> {
    let data = match &args.action {
        PlatformKeyAction::Add { data, .. }
        | PlatformKeyAction::Remove { data, .. }
        | PlatformKeyAction::List { data, .. } => data,
    };
    let key = match &args.action {
        PlatformKeyAction::Add { file, .. } => Some(read_platform_key(file)?),
        _ => None,
    };
    block(async {
        let owner = Owner::open_or_create(data).await?;
        let storage = owner.storage();
        let change = match (&args.action, &key) {
            (PlatformKeyAction::Add { .. }, Some(key)) => Some(platform_keys::add_key(
                &storage.key_ring_snapshot().await?,
                key,
                crate::clock::now_unix(),
            )?),
            (PlatformKeyAction::Remove { key_id, .. }, _) => Some(platform_keys::remove_key(
                &storage.key_ring_snapshot().await?,
                key_id.trim(),
            )?),
            _ => None,
        };
        if let Some(change) = change {
            if let Applied::CheckFailed(_) = storage.apply(change).await? {
                anyhow::bail!("the platform keys changed meanwhile; run the command again");
            }
        }
        Ok(platform_keys::list_keys(storage).await?)
    })
}

/// `keyholder egress`: the owner's control over where each credential may be sent.
#[derive(Debug, Clone, Args)]
pub struct EgressArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: EgressAction,
}

/// `keyholder egress` subcommands (each takes effect at once, also on a running server).
#[derive(Debug, Clone, clap::Subcommand)]
pub enum EgressAction {
    /// Show a service's egress policy (mode, pinned origin, allowlist, pinned token URL).
    Show {
        /// Data folder and master key.
        #[command(flatten)]
        data: DataArgs,
        /// The service (credential key).
        service: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Allow origins (`https://host[:port]`) or host patterns (`api.example.com`, `*.example.com`)
    /// for the service's proxied calls and token endpoints (minting, e.g. a GitHub Enterprise
    /// host), in every mode; or `--any` (mode `any`).
    Allow {
        /// Data folder and master key.
        #[command(flatten)]
        data: DataArgs,
        /// The service (credential key).
        service: String,
        /// Origins or host patterns to add.
        entries: Vec<String>,
        /// Allow any destination the SSRF guard allows (mode `any`).
        #[arg(long, conflicts_with = "entries")]
        any: bool,
    },
    /// Set the mode: `known` (default: the built-in catalogue for the credential's shape plus
    /// allowed entries), `pinned` (the first call with a credential pins its origin), `allowlist`
    /// (allowed entries only) or `any`.
    Set {
        /// Data folder and master key.
        #[command(flatten)]
        data: DataArgs,
        /// The service (credential key).
        service: String,
        /// The mode.
        #[arg(long)]
        mode: EgressMode,
    },
    /// Back to the default: `known`, no allowed entries, no pin, no pinned OAuth token URL.
    Reset {
        /// Data folder and master key.
        #[command(flatten)]
        data: DataArgs,
        /// The service (credential key).
        service: String,
    },
    /// List refused (service, origin) pairs, with how often and when last, to allow with
    /// `keyholder egress allow SERVICE ORIGIN`.
    Pending {
        /// Data folder and master key.
        #[command(flatten)]
        data: DataArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `keyholder egress pending`: the refusals recorded so far.
pub fn egress_pending(data: &DataArgs) -> anyhow::Result<Vec<egress::PendingEgress>> {
    block(async {
        let owner = Owner::open_or_create(data).await?;
        Ok(egress::list_pending(owner.storage()).await?)
    })
}

/// Runs an egress subcommand; returns the policy in force afterwards and whether to print JSON.
pub fn egress(args: &EgressArgs) -> anyhow::Result<(EgressPolicy, bool)> {
    let (data, service) = match &args.action {
        EgressAction::Show { data, service, .. }
        | EgressAction::Allow { data, service, .. }
        | EgressAction::Set { data, service, .. }
        | EgressAction::Reset { data, service } => (data, service),
        EgressAction::Pending { .. } => {
            anyhow::bail!("`egress pending` lists refusals: use cli::egress_pending")
        }
    };
    validate_key(service)?;
    block(async {
        let owner = Owner::open_or_create(data).await?;
        let storage = owner.storage();
        // Every change bumps the owner generation: a running server drops its cached policy on
        // its next look (within a quarter second).
        let (change, policy, json) = match &args.action {
            EgressAction::Show { json, .. } => {
                (None, egress::load_policy(storage, service).await?, *json)
            }
            EgressAction::Allow { entries, any, .. } => {
                let (change, policy) = egress::allow(storage, service, entries, *any).await?;
                (Some(change), policy, false)
            }
            EgressAction::Set { mode, .. } => {
                let (change, policy) = egress::set_mode(storage, service, *mode).await?;
                (Some(change), policy, false)
            }
            EgressAction::Reset { .. } => {
                let (change, policy) = egress::reset(service);
                (Some(change), policy, false)
            }
            EgressAction::Pending { .. } => anyhow::bail!("not a policy change"),
        };
        if let Some(change) = change {
            storage.apply(change).await?;
        }
        Ok((policy, json))
    })
}

/// `keyholder oauth`: the owner's OAuth clients, used by `/v1/refresh-notify`.
#[derive(Debug, Clone, Args)]
pub struct OAuthArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: OAuthAction,
}

/// `keyholder oauth` subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum OAuthAction {
    /// Configure (or replace) the OAuth client of a provider.
    Set {
        /// Data folder and master key.
        #[command(flatten)]
        data: DataArgs,
        /// Provider name (matches the credential's meta `provider`, else the platform's hint, else
        /// the service name).
        provider: String,
        /// The provider's token endpoint.
        #[arg(long)]
        token_url: String,
        /// OAuth client id.
        #[arg(long)]
        client_id: String,
        /// File holding the client secret (stored wrapped by the master key; omit for a public client).
        #[arg(long)]
        client_secret_file: Option<PathBuf>,
    },
    /// List configured providers (never the secret).
    List {
        /// Data folder and master key.
        #[command(flatten)]
        data: DataArgs,
    },
    /// Remove a provider's client.
    Remove {
        /// Data folder and master key.
        #[command(flatten)]
        data: DataArgs,
        /// Provider name.
        provider: String,
    },
}

/// What an oauth subcommand did, for printing.
pub enum OAuthOutcome {
    /// A client was stored.
    Set(String),
    /// The configured providers.
    List(Vec<ProviderInfo>),
    /// A client was removed (or did not exist).
    Removed(String, bool),
}

/// Runs an oauth subcommand.
pub fn oauth(args: &OAuthArgs) -> anyhow::Result<OAuthOutcome> {
    match &args.action {
        OAuthAction::Set {
            data,
            provider,
            token_url,
            client_id,
            client_secret_file,
        } => {
            oauth::validate_provider_name(provider)?;
            let url = url::Url::parse(token_url)
                .map_err(|e| anyhow::anyhow!("invalid setting --token-url: {e}"))?;
            if !matches!(url.scheme(), "https" | "http") || url.host().is_none() {
                anyhow::bail!("invalid setting --token-url: must be an absolute http(s) URL");
            }
            if client_id.trim().is_empty() {
                anyhow::bail!("invalid setting --client-id: must not be empty");
            }
            let secret = match client_secret_file {
                Some(path) => {
                    let raw = Zeroizing::new(std::fs::read(path).map_err(|e| {
                        anyhow::anyhow!("--client-secret-file {}: {e}", path.display())
                    })?);
                    let end = raw
                        .iter()
                        .rposition(|b| !matches!(b, b'\r' | b'\n'))
                        .map_or(0, |i| i + 1);
                    Zeroizing::new(raw[..end].to_vec())
                }
                None => Zeroizing::new(Vec::new()),
            };
            block(async {
                let owner = Owner::open_or_create(data).await?;
                let mut change = oauth::set_provider(
                    &owner.master,
                    provider,
                    url.as_str(),
                    client_id.trim(),
                    &secret,
                )?;
                // Read per call by the server: nothing to reload.
                change.bump_generation = false;
                owner.storage().apply(change).await?;
                Ok(OAuthOutcome::Set(provider.clone()))
            })
        }
        OAuthAction::List { data } => block(async {
            let owner = Owner::open_or_create(data).await?;
            Ok(OAuthOutcome::List(
                oauth::list_providers(owner.storage()).await?,
            ))
        }),
        OAuthAction::Remove { data, provider } => block(async {
            let owner = Owner::open_or_create(data).await?;
            let mut change = oauth::remove_provider(provider);
            change.bump_generation = false;
            let removed = matches!(
                owner.storage().apply(change).await?,
                Applied::Done { changed } if changed.first() == Some(&true)
            );
            Ok(OAuthOutcome::Removed(provider.clone(), removed))
        }),
    }
}

/// Flags of `keyholder healthcheck`. Without `--url` it reads the server's own settings
/// (`KEYHOLDER_LISTEN`, `KEYHOLDER_TLS_CERT`), so a container's `HEALTHCHECK` needs no arguments.
#[derive(Debug, Clone, Args)]
pub struct HealthcheckArgs {
    /// Health URL to query (default: derived from --listen and --tls-cert, on loopback).
    #[arg(long, env = "KEYHOLDER_HEALTHCHECK_URL")]
    pub url: Option<String>,
    /// Accept any certificate for an explicit https --url (a self-signed one on loopback).
    #[arg(long)]
    pub insecure: bool,
    /// The server's listen address (as `serve --listen`).
    #[arg(long, env = "KEYHOLDER_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// The server's certificate (as `serve --tls-cert`): its presence means https.
    #[arg(long, env = "KEYHOLDER_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
}

/// The loopback health URL of a server listening on `listen` (an unspecified address such as
/// `0.0.0.0` is reached on loopback).
pub fn local_health_url(listen: SocketAddr, tls: bool) -> String {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    let scheme = if tls { "https" } else { "http" };
    format!(
        "{scheme}://{}{}",
        SocketAddr::new(ip, listen.port()),
        keyholder_protocol::paths::PATH_HEALTH
    )
}

/// Asks the server whether it is healthy: `Ok(true)` only for a 2xx answer whose `status` is
/// `healthy`. A URL derived from the server's own settings is on loopback and reached by address,
/// where no certificate name can match: certificate checks are skipped there (nothing secret is
/// sent, and only the answer's status is read). An explicit https `--url` is verified unless
/// `--insecure` is given.
pub async fn healthcheck(args: &HealthcheckArgs) -> anyhow::Result<bool> {
    let (url, accept_any_certificate) = match &args.url {
        Some(url) => (url.clone(), args.insecure),
        None => {
            let listen: SocketAddr = args.listen.parse().map_err(|_| {
                anyhow::anyhow!(
                    "invalid setting --listen / KEYHOLDER_LISTEN: '{}' is not an address like 127.0.0.1:8080",
                    args.listen
                )
            })?;
            (local_health_url(listen, args.tls_cert.is_some()), true)
        }
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .danger_accept_invalid_certs(accept_any_certificate)
        .build()?;
    let response = client.get(&url).send().await?;
    if !response.status().is_success() {
        return Ok(false);
    }
    let body = response.json::<serde_json::Value>().await?;
    Ok(body.get("status").and_then(|s| s.as_str()) == Some("healthy"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test: a bad literal should fail loudly
mod tests {
    use super::*;

    #[test]
    fn health_url_is_on_loopback() {
        let url = |s: &str, tls| local_health_url(s.parse().unwrap(), tls);
        assert_eq!(
            url("0.0.0.0:8080", false),
            "http://127.0.0.1:8080/v1/health"
        );
        assert_eq!(url("[::]:8443", true), "https://[::1]:8443/v1/health");
        assert_eq!(
            url("127.0.0.2:9000", true),
            "https://127.0.0.2:9000/v1/health"
        );
    }
}
