//! What this binary is: the package version, the git commit it was built from (see `build.rs`:
//! `unknown` when neither a checkout, a packaged crate's VCS info nor `KEYHOLDER_GIT_COMMIT` named
//! one) and the protocol version it speaks.

use std::sync::LazyLock;

use keyholder_protocol::paths::PROTOCOL_VERSION;

/// The keyholder package version (also `keyholderVersion` in `/v1/health`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The git commit the binary was built from, or `unknown`.
pub const GIT_COMMIT: &str = env!("KEYHOLDER_GIT_COMMIT");

static LONG_VERSION: LazyLock<String> =
    LazyLock::new(|| format!("{VERSION} (commit {GIT_COMMIT}, protocol {PROTOCOL_VERSION})"));

/// `keyholder --version` after the name: `0.1.0 (commit <hex>, protocol 2.2.0)`.
pub fn long_version() -> &'static str {
    LONG_VERSION.as_str()
}
