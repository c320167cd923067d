//! `keyholder oauth`: the owner's OAuth clients, used to refresh tokens.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use zeroize::Zeroizing;

use super::session::{block, Owner};
use crate::config::DataArgs;
use crate::storage::Applied;
use crate::vault::oauth::{self, ProviderInfo};

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

/// Runs `keyholder oauth` and prints what it did.
pub fn execute(args: &OAuthArgs) -> anyhow::Result<ExitCode> {
    match oauth(args)? {
        OAuthOutcome::Set(name) => {
            println!("OAuth client for '{name}' stored (secret wrapped by the master key).")
        }
        OAuthOutcome::List(providers) => {
            if providers.is_empty() {
                println!("No OAuth clients configured.");
            }
            for p in providers {
                println!("{}\t{}\tclient_id={}", p.name, p.token_url, p.client_id);
            }
        }
        OAuthOutcome::Removed(name, true) => println!("OAuth client for '{name}' removed."),
        OAuthOutcome::Removed(name, false) => println!("No OAuth client for '{name}'."),
    }
    Ok(ExitCode::SUCCESS)
}
