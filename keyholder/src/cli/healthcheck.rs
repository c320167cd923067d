//! `keyholder healthcheck`: exit 0 only if the local server answers healthy (for container health
//! checks).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

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

/// Runs `keyholder healthcheck`: exit code 0 when healthy, else 1 with the reason on stderr.
pub fn execute(args: &HealthcheckArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let healthy = runtime.block_on(healthcheck(args));
    match healthy {
        Ok(true) => Ok(ExitCode::SUCCESS),
        Ok(false) => {
            eprintln!("keyholder: the server answered, but not healthy");
            Ok(ExitCode::from(1))
        }
        Err(err) => {
            eprintln!("keyholder: health check failed: {err:#}");
            Ok(ExitCode::from(1))
        }
    }
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
