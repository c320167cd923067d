//! Keyholder: a self-hosted key-custody server for Token Vault's Webhook Mode. The binary in
//! `main.rs` parses the CLI; this library holds the server so tests can run it in process.
#![warn(missing_docs)]

pub mod app;
pub mod audit;
pub mod build_info;
pub mod cli;
pub mod clock;
pub mod config;
pub mod http;
pub mod metrics;
pub mod policy;
pub mod state;
pub mod storage;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod upstream;
pub mod vault;

pub use app::{start, RunningServer};
pub use config::Config;
pub use state::AppState;
