//! `keyholder bind`: a one-time bind code and the registration link that connects the platform.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::platform_key::read_platform_key;
use super::session::{block, Owner};
use crate::config::{validate_url, DataArgs};
use crate::storage::Setting;
use crate::vault::binding::{issue_bind_code, IssuedCode};
use crate::vault::VaultError;

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

/// Runs `keyholder bind` and prints the code and links (or one JSON object).
pub fn execute(args: &BindArgs) -> anyhow::Result<ExitCode> {
    let issued = bind(args)?;
    if args.json {
        println!("{}", serde_json::to_string(&issued)?);
    } else {
        println!("Bind code:        {}", issued.code);
        println!("Valid for:        {} seconds, once", issued.expires_in);
        println!("Registration URL: {}", issued.registration_url);
        println!("Bind page:        {}", issued.bind_page_url);
        println!();
        println!(
            "Open the registration URL while logged in to the platform to connect this keyholder."
        );
        if let Some(key_id) = &issued.platform_key_id {
            println!(
                "Asymmetric binding to platform key {key_id}: the exchange hands out no secret."
            );
        }
        if issued.rebind {
            println!("This is a re-bind: when the platform exchanges it, the current binding (and its HMAC secret) stops working.");
        }
    }
    Ok(ExitCode::SUCCESS)
}
