//! `keyholder retire-key`: removes a data-key version (or the imported `platform-v1` key) that no
//! stored credential uses any more.

use std::process::ExitCode;

use clap::Args;

use super::session::{block, Owner};
use crate::config::DataArgs;
use crate::vault::rotation;

/// Flags of `keyholder retire-key`.
#[derive(Debug, Clone, Args)]
pub struct RetireKeyArgs {
    /// Data folder and master key.
    #[command(flatten)]
    pub data: DataArgs,
    /// The data-key version to remove, or `platform-v1` for the reference webhook's key (kept by
    /// `import-reference`).
    #[arg(value_name = "VERSION|platform-v1", value_parser = parse_retired_key)]
    pub key: RetiredKey,
}

/// A key `keyholder retire-key` can remove.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetiredKey {
    /// A data-key version.
    Data(u32),
    /// The reference webhook's key, for platform v1 ciphertexts.
    PlatformV1,
}

impl std::fmt::Display for RetiredKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RetiredKey::Data(version) => write!(f, "data key v{version}"),
            RetiredKey::PlatformV1 => f.write_str("reference key platform-v1"),
        }
    }
}

fn parse_retired_key(text: &str) -> Result<RetiredKey, String> {
    if text == "platform-v1" {
        return Ok(RetiredKey::PlatformV1);
    }
    text.strip_prefix('v')
        .unwrap_or(text)
        .parse()
        .map(RetiredKey::Data)
        .map_err(|_| "expected a data-key version (a number) or `platform-v1`".to_string())
}

/// `keyholder retire-key VERSION|platform-v1`.
pub fn retire_key(args: &RetireKeyArgs) -> anyhow::Result<()> {
    block(async {
        let owner = Owner::open(&args.data).await?;
        let key = args.key;
        let change = match key {
            RetiredKey::Data(version) => {
                rotation::retire_data_key(owner.storage(), version).await?
            }
            RetiredKey::PlatformV1 => {
                rotation::retire_platform_v1_key(owner.storage(), &owner.master).await?
            }
        };
        owner.commit("retire-key", &key.to_string(), change).await?;
        Ok(())
    })
}

/// Runs `keyholder retire-key` and says which key went.
pub fn execute(args: &RetireKeyArgs) -> anyhow::Result<ExitCode> {
    retire_key(args)?;
    let key = args.key.to_string();
    println!("{}{} removed.", key[..1].to_uppercase(), &key[1..]);
    Ok(ExitCode::SUCCESS)
}
