//! `keyholder-check`: run the conformance matrix of the `keyholder_check` library against a webhook and
//! print one line per check (or a JSON report). Exits non-zero when any check fails.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use keyholder_check::{self as check, CheckAuth, CheckOptions};
use keyholder_client::{IdentityPin, RetryPolicy};
use keyholder_protocol::{HmacSecret, PlatformSigningKey};
use zeroize::Zeroizing;

/// Check that a Token Vault webhook speaks the protocol and refuses what it must.
#[derive(Debug, Parser)]
#[command(name = "keyholder-check", version)]
struct Args {
    /// The webhook's base URL (https unless --danger-allow-http).
    #[arg(long, env = "KEYHOLDER_CHECK_URL")]
    url: String,
    /// Bind first with this one-time code (from `keyholder bind`; with --platform-key-file, from
    /// `keyholder bind --platform-key`).
    #[arg(
        long,
        conflicts_with = "hmac_secret_file",
        required_unless_present_any = ["hmac_secret_file", "platform_key_file"]
    )]
    bind_code: Option<String>,
    /// The webhook is bound already: file holding the HMAC secret (standard base64, or 32 raw bytes).
    #[arg(long, conflicts_with = "platform_key_file")]
    hmac_secret_file: Option<PathBuf>,
    /// Asymmetric binding: file holding the platform's Ed25519 private key seed (32 raw bytes or
    /// standard base64). Runs the matrix with envelopes and kh2 tickets, plus the envelope refusals.
    #[arg(long)]
    platform_key_file: Option<PathBuf>,
    /// Asymmetric binding: seed file of a platform key already removed with `keyholder platform-key
    /// remove`; adds the check that its signatures are refused.
    #[arg(long, requires = "platform_key_file")]
    removed_platform_key_file: Option<PathBuf>,
    /// Pin the webhook's identity: a key id, a base64 public key, or a file holding an identity document.
    #[arg(long)]
    identity: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Allow plain http (loopback tests only).
    #[arg(long)]
    danger_allow_http: bool,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 35)]
    timeout: u64,
    /// A shell command (run with `sh -c`) that restarts the webhook under test: adds the check that a
    /// request id and a ticket nonce used before the restart are refused after it.
    #[arg(long)]
    restart_cmd: Option<String>,
    /// A service whose egress policy lets the webhook call the checker's loopback upstream (the
    /// webhook on this machine with private egress allowed, and `keyholder egress allow NAME
    /// 127.0.0.1`): adds the check of a streamed proxy answer's signature.
    #[arg(long, value_name = "NAME")]
    stream_service: Option<String>,
    /// Do not retry 5xx answers and timeouts.
    #[arg(long)]
    no_retry: bool,
}

fn read_secret(path: &PathBuf) -> anyhow::Result<HmacSecret> {
    let raw =
        Zeroizing::new(std::fs::read(path).with_context(|| format!("reading {}", path.display()))?);
    if raw.len() == 32 {
        return Ok(HmacSecret::from_slice(&raw)?);
    }
    let text =
        std::str::from_utf8(&raw).context("the secret file is neither 32 bytes nor base64")?;
    Ok(HmacSecret::from_base64(text.trim())?)
}

fn read_signing_key(path: &PathBuf) -> anyhow::Result<PlatformSigningKey> {
    let raw =
        Zeroizing::new(std::fs::read(path).with_context(|| format!("reading {}", path.display()))?);
    PlatformSigningKey::from_file_bytes(&raw).with_context(|| format!("{}", path.display()))
}

fn read_pin(text: &str) -> anyhow::Result<IdentityPin> {
    let path = PathBuf::from(text);
    let value = if path.is_file() {
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?
    } else {
        text.to_owned()
    };
    Ok(IdentityPin::parse(&value)?)
}

async fn run(args: Args) -> anyhow::Result<bool> {
    let auth = match (
        &args.bind_code,
        &args.hmac_secret_file,
        &args.platform_key_file,
    ) {
        (code, _, Some(path)) => CheckAuth::PlatformKey {
            key: Box::new(read_signing_key(path)?),
            bind_code: code.clone(),
        },
        (Some(code), _, None) => CheckAuth::BindCode(code.clone()),
        (None, Some(path), None) => CheckAuth::Secret(read_secret(path)?),
        (None, None, None) => {
            anyhow::bail!("give --bind-code, --hmac-secret-file or --platform-key-file")
        }
    };
    let mut options = CheckOptions::new(args.url.clone(), auth);
    if let Some(path) = &args.removed_platform_key_file {
        options.removed_platform_key = Some(read_signing_key(path)?);
    }
    options.danger_allow_http = args.danger_allow_http;
    options.restart_cmd = args.restart_cmd.clone();
    options.stream_service = args.stream_service.clone();
    options.timeout = Duration::from_secs(args.timeout);
    if args.no_retry {
        options.retry = RetryPolicy::none();
    }
    if let Some(pin) = &args.identity {
        options.pin = Some(read_pin(pin)?);
    }
    let report = check::run(options).await;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report.to_json())?);
    } else {
        print!("{}", report.to_text());
    }
    Ok(report.ok())
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("keyholder-check: {e:#}");
            ExitCode::from(2)
        }
    }
}
