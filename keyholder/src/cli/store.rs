//! `keyholder store`: a credential stored from a file or standard input, without the platform's
//! pages or scripts.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use serde::Serialize;
use serde_json::Value;

use super::session::{block, Owner};
use crate::config::DataArgs;

/// Flags of `keyholder store`.
#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// Data folder and master key.
    #[command(flatten)]
    pub data: DataArgs,
    /// The service (credential key) to store the credential under; an existing one is replaced.
    pub service: String,
    /// The credential's `tokenType` (default `oauth`).
    #[arg(long = "type", value_name = "T")]
    pub token_type: Option<String>,
    /// A non-secret meta field, `key=value` (repeatable); never a sensitive field name.
    #[arg(long = "meta", value_name = "KEY=VALUE")]
    pub meta: Vec<String>,
    /// File holding the secret, or `-` for standard input (the secret is never an argument).
    /// Trailing line breaks are dropped.
    #[arg(long, value_name = "FILE|-")]
    pub secret_file: PathBuf,
    /// The sensitive field the secret is stored as.
    #[arg(long, default_value = "accessToken")]
    pub field: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Longest secret `keyholder store` reads (the `/v1/store` body limit).
pub const MAX_STORED_SECRET: usize = 64 * 1024;

/// Meta keys `keyholder store --meta` refuses: sensitive fields (they would put a secret on the
/// command line) and `totpUri` (an `otpauth://` link holds the TOTP seed).
fn check_meta_key(key: &str) -> anyhow::Result<()> {
    if key.is_empty() || key.len() > 128 || key.chars().any(char::is_control) {
        anyhow::bail!("--meta: a key must be 1-128 characters without control characters");
    }
    if keyholder_protocol::document::is_sensitive(key) || key == "totpUri" {
        anyhow::bail!(
            "--meta {key}=...: '{key}' holds a secret; pass it with --field {key} --secret-file FILE|- instead"
        );
    }
    Ok(())
}

/// Reads the secret from a file or (`-`) from `stdin`: at most [`MAX_STORED_SECRET`] bytes of
/// UTF-8, trailing CR/LF dropped, held in zeroizing memory.
fn read_secret(
    path: &Path,
    stdin: &mut dyn std::io::Read,
) -> anyhow::Result<zeroize::Zeroizing<String>> {
    use std::io::Read as _;
    let mut raw = zeroize::Zeroizing::new(Vec::new());
    let limit = (MAX_STORED_SECRET + 1) as u64;
    if path == Path::new("-") {
        stdin.take(limit).read_to_end(&mut raw)?;
    } else {
        std::fs::File::open(path)
            .with_context(|| format!("--secret-file {}", path.display()))?
            .take(limit)
            .read_to_end(&mut raw)
            .with_context(|| format!("--secret-file {}", path.display()))?;
    }
    if raw.len() > MAX_STORED_SECRET {
        anyhow::bail!("--secret-file: the secret is longer than {MAX_STORED_SECRET} bytes");
    }
    let end = raw
        .iter()
        .rposition(|b| !matches!(b, b'\r' | b'\n'))
        .map_or(0, |i| i + 1);
    raw.truncate(end);
    if raw.is_empty() {
        anyhow::bail!("--secret-file: the secret is empty");
    }
    let text = std::str::from_utf8(&raw)
        .map_err(|_| anyhow::anyhow!("--secret-file: the secret is not UTF-8 text"))?;
    Ok(zeroize::Zeroizing::new(text.to_owned()))
}

/// What `keyholder store` stored (never the secret).
#[derive(Debug, Clone, Serialize)]
pub struct StoreReport {
    /// Always `stored`.
    pub status: &'static str,
    /// The service.
    pub service: String,
    /// The credential's meta, as `/v1/store` answers it.
    pub meta: serde_json::Map<String, Value>,
}

/// `keyholder store SERVICE --secret-file FILE|-`: seals the secret (and the meta) as the
/// service's credential in the data folder, with an `owner:store` audit entry; a running server
/// serves it within a quarter second. `stdin` is read for `--secret-file -`.
pub fn store(args: &StoreArgs, stdin: &mut dyn std::io::Read) -> anyhow::Result<StoreReport> {
    crate::vault::collections::validate_key(&args.service)?;
    if !keyholder_protocol::document::is_sensitive(&args.field) {
        anyhow::bail!(
            "--field {}: must be one of {}",
            args.field,
            keyholder_protocol::document::SENSITIVE_FIELDS.join(", ")
        );
    }
    let mut token_data = serde_json::Map::new();
    for entry in &args.meta {
        let (key, value) = entry
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--meta {entry}: expected KEY=VALUE"))?;
        check_meta_key(key)?;
        token_data.insert(key.to_owned(), Value::String(value.to_owned()));
    }
    if let Some(token_type) = &args.token_type {
        if token_type.is_empty() || token_type.len() > 128 {
            anyhow::bail!("--type: must be 1-128 characters");
        }
        token_data.insert("tokenType".into(), Value::String(token_type.clone()));
    }
    let secret = read_secret(&args.secret_file, stdin)?;
    token_data.insert(
        args.field.clone(),
        Value::String(secret.as_str().to_owned()),
    );
    drop(secret);
    let service = args.service.clone();
    let result = block(async {
        let owner = Owner::open(&args.data).await?;
        let ring = owner.ring().await?;
        let existing = owner
            .storage()
            .document(keyholder_protocol::wire::Collection::Tokens, &service)
            .await?;
        let (change, meta) = crate::vault::credentials::store_on_disk(
            &ring,
            &service,
            &mut token_data,
            existing.as_deref(),
            crate::clock::now_unix(),
        )?;
        owner.commit("store", &service, change).await?;
        Ok(meta)
    });
    token_data
        .values_mut()
        .for_each(crate::vault::credentials::scrub);
    Ok(StoreReport {
        status: "stored",
        service: args.service.clone(),
        meta: result?,
    })
}

/// Runs `keyholder store` (the secret from `--secret-file` or standard input) and says what it
/// stored (never the secret).
pub fn execute(args: &StoreArgs) -> anyhow::Result<ExitCode> {
    let report = store(args, &mut std::io::stdin().lock())?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "Stored the credential of '{}' ({} sealed; meta: {}).",
            report.service,
            args.field,
            serde_json::to_string(&report.meta)?
        );
    }
    Ok(ExitCode::SUCCESS)
}
