//! `keyholder-check`: run the conformance matrix of `keyholder_client::check` against a webhook and
//! print one line per check (or a JSON report). Exits non-zero when any check fails.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use keyholder_client::check::{self, CheckAuth, CheckOptions};
use keyholder_client::{IdentityPin, RetryPolicy};
use keyholder_protocol::HmacSecret;
use zeroize::Zeroizing;

/// Check that a Token Vault webhook speaks the protocol and refuses what it must.
#[derive(Debug, Parser)]
#[command(name = "keyholder-check", version)]
struct Args {
    /// The webhook's base URL (https unless --danger-allow-http).
    #[arg(long, env = "KEYHOLDER_CHECK_URL")]
    url: String,
    /// Bind first with this one-time code (from `keyholder bind`).
    #[arg(
        long,
        conflicts_with = "hmac_secret_file",
        required_unless_present = "hmac_secret_file"
    )]
    bind_code: Option<String>,
    /// The webhook is bound already: file holding the HMAC secret (standard base64, or 32 raw bytes).
    #[arg(long)]
    hmac_secret_file: Option<PathBuf>,
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
    let auth = match (&args.bind_code, &args.hmac_secret_file) {
        (Some(code), _) => CheckAuth::BindCode(code.clone()),
        (None, Some(path)) => CheckAuth::Secret(read_secret(path)?),
        (None, None) => anyhow::bail!("give --bind-code or --hmac-secret-file"),
    };
    let mut options = CheckOptions::new(args.url.clone(), auth);
    options.danger_allow_http = args.danger_allow_http;
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
