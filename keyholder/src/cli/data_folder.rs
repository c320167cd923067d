//! The flags every command that only needs the data folder and its master key takes (the folder is
//! opened by [`super::session`]).

use clap::Args;

use crate::config::DataArgs;

/// Flags of commands that only need the data folder and its master key.
#[derive(Debug, Clone, Args)]
pub struct OwnerArgs {
    /// Data folder and master key.
    #[command(flatten)]
    pub data: DataArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}
