//! The one typed configuration, built from flags and `KEYHOLDER_*` environment variables by clap
//! and validated before anything starts, with errors that name the setting.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use ipnet::IpNet;
use keyholder_protocol::paths::{
    DEFAULT_FRONTEND, DEFAULT_MAX_TICKET_LIFETIME_SECS, PLATFORM_EGRESS_IP,
};

use crate::tls::TlsFiles;
use crate::vault::master::MasterKeySource;

/// Where the data lives and how its keys are unlocked (shared by every command).
#[derive(Debug, Clone, Args)]
pub struct DataArgs {
    /// Data folder: database and (by default) the master key file.
    #[arg(long, env = "KEYHOLDER_DATA_DIR", default_value = "./keyholder-data")]
    pub data_dir: PathBuf,
    /// File holding the 32-byte master key (raw or base64). Keep it outside the data folder.
    #[arg(
        long,
        env = "KEYHOLDER_MASTER_KEY_FILE",
        conflicts_with = "passphrase_file"
    )]
    pub master_key_file: Option<PathBuf>,
    /// File holding a passphrase from which the master key is derived (Argon2id).
    #[arg(long, env = "KEYHOLDER_PASSPHRASE_FILE")]
    pub passphrase_file: Option<PathBuf>,
    /// The master key sealed by a PKCS#11 token (HSM).
    #[command(flatten)]
    pub pkcs11: Pkcs11Args,
    /// The shared database of several replicas (`postgres://user@host:5432/db?sslmode=verify-full`)
    /// instead of the data folder's SQLite file. Keep the password out of it: see
    /// --database-password-file.
    #[arg(long, env = "KEYHOLDER_DATABASE_URL", value_name = "URL")]
    pub database_url: Option<String>,
    /// File holding the PostgreSQL password (first line).
    #[arg(long, env = "KEYHOLDER_DATABASE_PASSWORD_FILE", value_name = "FILE")]
    pub database_password_file: Option<PathBuf>,
    /// This process's node id on a shared database: names its audit chain (default: the host
    /// name for `serve`, `cli` for owner commands).
    #[arg(long, env = "KEYHOLDER_NODE_ID", value_name = "ID")]
    pub node_id: Option<String>,
}

/// The PKCS#11 token that seals the master key (`--master-key-pkcs11`).
#[derive(Debug, Clone, Default, Args)]
pub struct Pkcs11Args {
    /// RFC 7512 URI of a non-extractable AES key in a PKCS#11 token that seals the master key
    /// (`pkcs11:token=<label>;object=<key label>`).
    #[arg(
        long,
        env = "KEYHOLDER_MASTER_KEY_PKCS11",
        value_name = "URI",
        conflicts_with_all = ["master_key_file", "passphrase_file"]
    )]
    pub master_key_pkcs11: Option<String>,
    /// The token's PKCS#11 module (shared library), e.g. /usr/lib/softhsm/libsofthsm2.so.
    #[arg(long, env = "KEYHOLDER_PKCS11_MODULE", value_name = "PATH")]
    pub pkcs11_module: Option<PathBuf>,
    /// File holding the token's user PIN (else `KEYHOLDER_PKCS11_PIN`).
    #[arg(long, env = "KEYHOLDER_PKCS11_PIN_FILE", value_name = "FILE")]
    pub pkcs11_pin_file: Option<PathBuf>,
}

impl Pkcs11Args {
    /// The token configuration for `uri` with these module and PIN settings.
    pub fn config_for(&self, uri: &str) -> crate::vault::pkcs11::Pkcs11Config {
        crate::vault::pkcs11::Pkcs11Config {
            uri: uri.to_string(),
            module: self.pkcs11_module.clone(),
            pin_file: self.pkcs11_pin_file.clone(),
        }
    }
}

impl DataArgs {
    /// The shared database these arguments name, if any; `default_node` is the node id when
    /// `--node-id` is not given.
    pub fn database(&self, default_node: &str) -> Result<Option<DatabaseSettings>, ConfigError> {
        let Some(url) = self
            .database_url
            .as_deref()
            .filter(|u| !u.trim().is_empty())
        else {
            if self.database_password_file.is_some() {
                return Err(invalid(
                    "--database-password-file / KEYHOLDER_DATABASE_PASSWORD_FILE",
                    "needs --database-url",
                ));
            }
            return Ok(None);
        };
        let target =
            crate::storage::postgres::PgTarget::parse(url, self.database_password_file.as_deref())
                .map_err(|e| invalid("--database-url / KEYHOLDER_DATABASE_URL", e.to_string()))?;
        let node_id = self
            .node_id
            .clone()
            .filter(|n| !n.trim().is_empty())
            .unwrap_or_else(|| default_node.to_string());
        if node_id.len() > 128
            || node_id
                .chars()
                .any(|c| c.is_control() || c == ',' || c == '=')
        {
            return Err(invalid(
                "--node-id / KEYHOLDER_NODE_ID",
                "at most 128 characters, no control characters, ',' or '='",
            ));
        }
        Ok(Some(DatabaseSettings { target, node_id }))
    }

    /// The master-key source these arguments select.
    pub fn master_key_source(&self) -> MasterKeySource {
        if let Some(uri) = &self.pkcs11.master_key_pkcs11 {
            return MasterKeySource::Pkcs11(self.pkcs11.config_for(uri));
        }
        match (&self.master_key_file, &self.passphrase_file) {
            (Some(file), _) => MasterKeySource::File(file.clone()),
            (None, Some(file)) => MasterKeySource::Passphrase(file.clone()),
            (None, None) => MasterKeySource::DataFolder,
        }
    }
}

/// Flags of `keyholder serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Data folder and master key.
    #[command(flatten)]
    pub data: DataArgs,
    /// Address to listen on.
    #[arg(long, env = "KEYHOLDER_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Public https URL the platform reaches this keyholder at (used in bind links).
    #[arg(long, env = "KEYHOLDER_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Platform egress address refused on agent and browser endpoints (repeatable).
    #[arg(long = "platform-ip", env = "KEYHOLDER_PLATFORM_IP", value_delimiter = ',', default_value = PLATFORM_EGRESS_IP)]
    pub platform_ips: Vec<String>,
    /// Proxy (CIDR) whose X-Forwarded-For is believed (repeatable; default loopback).
    #[arg(
        long = "trusted-proxy",
        env = "KEYHOLDER_TRUSTED_PROXY",
        value_delimiter = ',',
        default_value = "127.0.0.0/8,::1/128"
    )]
    pub trusted_proxies: Vec<String>,
    /// Longest ticket lifetime (exp - iat) accepted, in seconds.
    #[arg(long, env = "KEYHOLDER_MAX_TICKET_LIFETIME", default_value_t = DEFAULT_MAX_TICKET_LIFETIME_SECS)]
    pub max_ticket_lifetime: i64,
    /// Platform frontend used in bind links.
    #[arg(long, env = "KEYHOLDER_FRONTEND_URL", default_value = DEFAULT_FRONTEND)]
    pub frontend_url: String,
    /// HTTP worker threads (default: one per core).
    #[arg(long, env = "KEYHOLDER_WORKERS")]
    pub workers: Option<usize>,
    /// PEM certificate chain: serve https with it (needs --tls-key; reloaded on SIGHUP).
    #[arg(long, env = "KEYHOLDER_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "KEYHOLDER_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Serve Prometheus metrics at http://<address>/metrics (default: off; loopback only unless --metrics-public).
    #[arg(long, env = "KEYHOLDER_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Allow --metrics-listen on a non-loopback address (e.g. 0.0.0.0:9090 inside a container).
    #[arg(long, env = "KEYHOLDER_METRICS_PUBLIC")]
    pub metrics_public: bool,
    /// Log filter (tracing EnvFilter syntax, e.g. `info` or `keyholder=debug`).
    #[arg(long, env = "KEYHOLDER_LOG", default_value = "info")]
    pub log: String,
    /// Send OpenTelemetry traces to this OTLP/HTTP collector (e.g. http://127.0.0.1:4318; spans go
    /// to `<URL>/v1/traces` as protobuf, or JSON with `OTEL_EXPORTER_OTLP_PROTOCOL=http/json`).
    /// Off by default. `OTEL_SERVICE_NAME` sets `service.name`.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// Log format: `text` or `json`.
    #[arg(long, env = "KEYHOLDER_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
    /// Let outbound calls use plain http and private addresses (tests, home labs). Cloud metadata,
    /// link-local, multicast and unspecified addresses stay refused.
    #[arg(long, env = "KEYHOLDER_EGRESS_ALLOW_PRIVATE", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub egress_allow_private: bool,
    /// Offer `/v1/refresh` (capability `tv-refresh`), which hands refresh tokens to the platform.
    #[arg(long, env = "KEYHOLDER_ENABLE_TV_REFRESH", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub enable_tv_refresh: bool,
    /// Use the platform's refreshHint client secret and token URL when no local OAuth client is
    /// configured (the token URL is then pinned per service).
    #[arg(long, env = "KEYHOLDER_OAUTH_TRUST_PLATFORM_SECRET", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub oauth_trust_platform_secret: bool,
    /// Older single limit of proxied calls, in seconds: still accepted, it now sets the head and
    /// idle timeouts below where they are not given.
    #[arg(long, env = "KEYHOLDER_UPSTREAM_TIMEOUT")]
    pub upstream_timeout: Option<u64>,
    /// Time to open the upstream connection (TCP and TLS), in seconds.
    #[arg(long, env = "KEYHOLDER_UPSTREAM_CONNECT_TIMEOUT", default_value_t = 5)]
    pub upstream_connect_timeout: u64,
    /// Time from sending a proxied request until the upstream's status and headers, in seconds
    /// (default 30). Past it: `504 upstream_timeout`.
    #[arg(long, env = "KEYHOLDER_UPSTREAM_HEAD_TIMEOUT")]
    pub upstream_head_timeout: Option<u64>,
    /// Longest pause between two chunks of a proxied answer's body, in seconds (default 60); a
    /// stream that keeps delivering has no total limit but `--upstream-max-stream`.
    #[arg(long, env = "KEYHOLDER_UPSTREAM_IDLE_TIMEOUT")]
    pub upstream_idle_timeout: Option<u64>,
    /// Longest proxied answer, head and body, in seconds; 0 = no limit.
    #[arg(long, env = "KEYHOLDER_UPSTREAM_MAX_STREAM", default_value_t = 3600)]
    pub upstream_max_stream: u64,
    /// Limit every route to N requests per minute per client address (`N/min`; answered with
    /// `429 rate_limited` and `Retry-After`). Default: no limit.
    #[arg(long, env = "KEYHOLDER_RATE_LIMIT_PER_IP", value_name = "N/min")]
    pub rate_limit_per_ip: Option<String>,
    /// Remove audit entries older than this many days (checked hourly; the chain is verified first
    /// and a signed prune entry is appended). Default: keep every entry.
    #[arg(long, env = "KEYHOLDER_AUDIT_RETENTION_DAYS", value_parser = clap::value_parser!(u32).range(1..=36_500))]
    pub audit_retention_days: Option<u32>,
    /// POST an ntfy-compatible JSON notification here for each use held for approval (with a
    /// one-time link to this keyholder's approval page) and, per --notify-on, for refusals.
    #[arg(long, env = "KEYHOLDER_NOTIFY_URL", value_name = "URL")]
    pub notify_url: Option<String>,
    /// TOML file declaring custody policies and attachments (applied at start; see the README).
    #[arg(long, env = "KEYHOLDER_POLICY_FILE", value_name = "FILE")]
    pub policy_file: Option<PathBuf>,
    /// MaxMind-format country database (e.g. GeoLite2-Country.mmdb) for custody policies' --geo.
    #[arg(long, env = "KEYHOLDER_GEOIP_DB", value_name = "FILE")]
    pub geoip_db: Option<PathBuf>,
    /// What is notified: approvals (default), refusals or all (rate-limited).
    #[arg(long, env = "KEYHOLDER_NOTIFY_ON", default_value = "approvals", value_parser = ["approvals", "refusals", "all"])]
    pub notify_on: String,
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Data folder.
    pub data_dir: PathBuf,
    /// Master key source.
    pub master_key: MasterKeySource,
    /// Listen address (port 0 picks a free port).
    pub listen: SocketAddr,
    /// Public URL, if known.
    pub public_url: Option<String>,
    /// Platform egress addresses.
    pub platform_ips: Vec<IpAddr>,
    /// Trusted reverse proxies.
    pub trusted_proxies: Vec<IpNet>,
    /// Ticket lifetime cap, seconds.
    pub max_ticket_lifetime: i64,
    /// Platform frontend for bind links.
    pub frontend_url: String,
    /// Worker threads.
    pub workers: Option<usize>,
    /// Let actix handle SIGTERM/SIGINT, and SIGHUP reload the certificate (off for in-process tests).
    pub handle_signals: bool,
    /// Outbound calls may use plain http and private addresses (the SSRF guard stays on for
    /// forbidden ones). Off by default.
    pub egress_allow_private: bool,
    /// `/v1/refresh` and the `tv-refresh` capability.
    pub enable_tv_refresh: bool,
    /// Trust the platform's OAuth client secret and token URL in `refreshHint`.
    pub oauth_trust_platform_secret: bool,
    /// Connect timeout of proxied calls.
    pub upstream_connect_timeout: Duration,
    /// Time until a proxied answer's head (`504 upstream_timeout` past it).
    pub upstream_timeout: Duration,
    /// Longest pause between two body chunks of a proxied answer.
    pub upstream_idle_timeout: Duration,
    /// Longest proxied answer, if limited.
    pub upstream_max_stream: Option<Duration>,
    /// Total time for one OAuth or token-minting call.
    pub provider_timeout: Duration,
    /// Serve https with this certificate and key.
    pub tls: Option<TlsFiles>,
    /// Prometheus metrics listener (off when `None`).
    pub metrics_listen: Option<SocketAddr>,
    /// Audit entries older than this are pruned (kept forever when `None`).
    pub audit_retention: Option<Duration>,
    /// Requests per minute per client address (no limit when `None`).
    pub rate_limit_per_ip: Option<u32>,
    /// The owner's notification endpoint (custody-policy approvals and refusals).
    pub notify_url: Option<String>,
    /// What is notified.
    pub notify_on: crate::policy::notify::NotifyOn,
    /// The country database for `--geo` rules.
    pub geoip_db: Option<PathBuf>,
    /// Policies declared in TOML.
    pub policy_file: Option<PathBuf>,
    /// The shared PostgreSQL database (`--database-url`), instead of the data folder's SQLite.
    pub database: Option<DatabaseSettings>,
}

/// Where a shared PostgreSQL database is (`--database-url`), and this process's node id in it.
#[derive(Clone)]
pub struct DatabaseSettings {
    /// The parsed URL (TLS settings included, password from the file if given).
    pub target: crate::storage::postgres::PgTarget,
    /// Names this process's audit chain.
    pub node_id: String,
}

impl std::fmt::Debug for DatabaseSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The target prints without its password.
        write!(f, "{:?} (node {})", self.target, self.node_id)
    }
}

/// The machine's host name, the default node id of `serve` on a shared database.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "keyholder".into())
}

/// Parses `--rate-limit-per-ip`: `N/min` with N in 1-1000000 (`N` alone means the same).
pub fn parse_rate_limit(value: &str) -> Result<u32, ConfigError> {
    const SETTING: &str = "--rate-limit-per-ip / KEYHOLDER_RATE_LIMIT_PER_IP";
    let value = value.trim();
    let number = value.strip_suffix("/min").unwrap_or(value);
    number
        .parse::<u32>()
        .ok()
        .filter(|n| (1..=1_000_000).contains(n))
        .ok_or_else(|| {
            invalid(
                SETTING,
                format!("'{value}' is not a rate like 120/min (1-1000000 requests per minute)"),
            )
        })
}

/// Default time until a proxied answer's head.
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);
/// Default longest pause between two body chunks of a proxied answer.
pub const DEFAULT_UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default longest proxied answer.
pub const DEFAULT_UPSTREAM_MAX_STREAM: Duration = Duration::from_secs(3600);
/// Default total time of an OAuth or token-minting call.
pub const DEFAULT_PROVIDER_TIMEOUT: Duration = Duration::from_secs(10);

/// A setting that cannot be used, named.
#[derive(Debug, thiserror::Error)]
#[error("invalid setting {setting}: {reason}")]
pub struct ConfigError {
    /// Flag and env var.
    pub setting: &'static str,
    /// What is wrong.
    pub reason: String,
}

fn invalid(setting: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        setting,
        reason: reason.into(),
    }
}

/// Checks a public or frontend URL: absolute http(s), no query or fragment.
pub fn validate_url(setting: &'static str, value: &str) -> Result<String, ConfigError> {
    let url = url::Url::parse(value).map_err(|e| invalid(setting, e.to_string()))?;
    if !matches!(url.scheme(), "https" | "http") || url.host().is_none() {
        return Err(invalid(setting, "must be an absolute http(s) URL"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid(setting, "must not have a query or fragment"));
    }
    Ok(value.trim_end_matches('/').to_string())
}

/// Checks `--notify-url`: an absolute http(s) URL (a query is allowed: some relays need one).
pub fn validate_notify_url(value: &str) -> Result<String, ConfigError> {
    const SETTING: &str = "--notify-url / KEYHOLDER_NOTIFY_URL";
    let url = url::Url::parse(value).map_err(|e| invalid(SETTING, e.to_string()))?;
    if !matches!(url.scheme(), "https" | "http") || url.host().is_none() {
        return Err(invalid(SETTING, "must be an absolute http(s) URL"));
    }
    Ok(value.to_string())
}

/// Parses the metrics address. Metrics carry no secret but show traffic, so a non-loopback
/// address needs the explicit `--metrics-public`.
pub fn validate_metrics_listen(value: &str, public: bool) -> Result<SocketAddr, ConfigError> {
    const SETTING: &str = "--metrics-listen / KEYHOLDER_METRICS_LISTEN";
    let addr: SocketAddr = value.parse().map_err(|_| {
        invalid(
            SETTING,
            format!("'{value}' is not an address like 127.0.0.1:9090"),
        )
    })?;
    if !addr.ip().is_loopback() && !public {
        return Err(invalid(
            SETTING,
            format!(
                "'{value}' is not a loopback address; add --metrics-public (KEYHOLDER_METRICS_PUBLIC=true) to serve metrics there"
            ),
        ));
    }
    Ok(addr)
}

impl Config {
    /// Defaults for a server on `listen` with its data in `data_dir` (tests, embedding).
    pub fn new(data_dir: PathBuf, listen: SocketAddr) -> Config {
        Config {
            data_dir,
            master_key: MasterKeySource::DataFolder,
            listen,
            public_url: None,
            platform_ips: PLATFORM_EGRESS_IP
                .parse()
                .map(|ip| vec![ip])
                .unwrap_or_default(),
            trusted_proxies: ["127.0.0.0/8", "::1/128"]
                .iter()
                .filter_map(|n| n.parse().ok())
                .collect(),
            max_ticket_lifetime: DEFAULT_MAX_TICKET_LIFETIME_SECS,
            frontend_url: DEFAULT_FRONTEND.to_string(),
            workers: None,
            handle_signals: false,
            egress_allow_private: false,
            enable_tv_refresh: false,
            oauth_trust_platform_secret: false,
            upstream_connect_timeout: crate::upstream::CONNECT_TIMEOUT,
            upstream_timeout: DEFAULT_UPSTREAM_TIMEOUT,
            upstream_idle_timeout: DEFAULT_UPSTREAM_IDLE_TIMEOUT,
            upstream_max_stream: Some(DEFAULT_UPSTREAM_MAX_STREAM),
            provider_timeout: DEFAULT_PROVIDER_TIMEOUT,
            tls: None,
            metrics_listen: None,
            audit_retention: None,
            rate_limit_per_ip: None,
            notify_url: None,
            notify_on: crate::policy::notify::NotifyOn::Approvals,
            geoip_db: None,
            policy_file: None,
            database: None,
        }
    }

    /// Validates `serve` flags into a configuration.
    pub fn from_args(args: &ServeArgs) -> Result<Config, ConfigError> {
        let listen: SocketAddr = args.listen.parse().map_err(|_| {
            invalid(
                "--listen / KEYHOLDER_LISTEN",
                format!("'{}' is not an address like 127.0.0.1:8080", args.listen),
            )
        })?;
        let public_url = args
            .public_url
            .as_deref()
            .map(|u| validate_url("--public-url / KEYHOLDER_PUBLIC_URL", u))
            .transpose()?;
        let platform_ips = args
            .platform_ips
            .iter()
            .filter(|s| !s.trim().is_empty())
            .map(|s| {
                s.trim().parse().map_err(|_| {
                    invalid(
                        "--platform-ip / KEYHOLDER_PLATFORM_IP",
                        format!("'{s}' is not an IP address"),
                    )
                })
            })
            .collect::<Result<Vec<IpAddr>, _>>()?;
        let trusted_proxies = args
            .trusted_proxies
            .iter()
            .filter(|s| !s.trim().is_empty())
            .map(|s| {
                let s = s.trim();
                s.parse::<IpNet>()
                    .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| {
                        invalid(
                            "--trusted-proxy / KEYHOLDER_TRUSTED_PROXY",
                            format!("'{s}' is not a CIDR or address"),
                        )
                    })
            })
            .collect::<Result<Vec<IpNet>, _>>()?;
        if !(1..=86_400).contains(&args.max_ticket_lifetime) {
            return Err(invalid(
                "--max-ticket-lifetime / KEYHOLDER_MAX_TICKET_LIFETIME",
                "must be 1-86400 seconds",
            ));
        }
        let seconds = |name: &'static str, value: u64, max: u64| {
            if (1..=max).contains(&value) {
                Ok(Duration::from_secs(value))
            } else {
                Err(invalid(name, format!("must be 1-{max} seconds")))
            }
        };
        if let Some(legacy) = args.upstream_timeout {
            seconds(
                "--upstream-timeout / KEYHOLDER_UPSTREAM_TIMEOUT",
                legacy,
                600,
            )?;
        }
        let upstream_connect_timeout = seconds(
            "--upstream-connect-timeout / KEYHOLDER_UPSTREAM_CONNECT_TIMEOUT",
            args.upstream_connect_timeout,
            120,
        )?;
        let upstream_head_timeout = seconds(
            "--upstream-head-timeout / KEYHOLDER_UPSTREAM_HEAD_TIMEOUT",
            args.upstream_head_timeout
                .or(args.upstream_timeout)
                .unwrap_or(DEFAULT_UPSTREAM_TIMEOUT.as_secs()),
            3600,
        )?;
        let upstream_idle_timeout = seconds(
            "--upstream-idle-timeout / KEYHOLDER_UPSTREAM_IDLE_TIMEOUT",
            args.upstream_idle_timeout
                .or(args.upstream_timeout)
                .unwrap_or(DEFAULT_UPSTREAM_IDLE_TIMEOUT.as_secs()),
            3600,
        )?;
        let upstream_max_stream = match args.upstream_max_stream {
            0 => None,
            n => Some(seconds(
                "--upstream-max-stream / KEYHOLDER_UPSTREAM_MAX_STREAM",
                n,
                7 * 86_400,
            )?),
        };
        if args.workers == Some(0) {
            return Err(invalid(
                "--workers / KEYHOLDER_WORKERS",
                "must be at least 1",
            ));
        }
        let tls = match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            }),
            (None, None) => None,
            (Some(_), None) => {
                return Err(invalid(
                    "--tls-key / KEYHOLDER_TLS_KEY",
                    "required with --tls-cert",
                ))
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "--tls-cert / KEYHOLDER_TLS_CERT",
                    "required with --tls-key",
                ))
            }
        };
        let metrics_listen = args
            .metrics_listen
            .as_deref()
            .filter(|s| !s.trim().is_empty())
            .map(|s| validate_metrics_listen(s.trim(), args.metrics_public))
            .transpose()?;
        let database = args.data.database(&host_name())?;
        Ok(Config {
            database,
            data_dir: args.data.data_dir.clone(),
            master_key: args.data.master_key_source(),
            listen,
            public_url,
            platform_ips,
            trusted_proxies,
            max_ticket_lifetime: args.max_ticket_lifetime,
            frontend_url: validate_url(
                "--frontend-url / KEYHOLDER_FRONTEND_URL",
                &args.frontend_url,
            )?,
            workers: args.workers,
            handle_signals: true,
            egress_allow_private: args.egress_allow_private,
            enable_tv_refresh: args.enable_tv_refresh,
            oauth_trust_platform_secret: args.oauth_trust_platform_secret,
            upstream_connect_timeout,
            upstream_timeout: upstream_head_timeout,
            upstream_idle_timeout,
            upstream_max_stream,
            provider_timeout: DEFAULT_PROVIDER_TIMEOUT,
            tls,
            metrics_listen,
            audit_retention: args
                .audit_retention_days
                .map(|days| Duration::from_secs(u64::from(days) * 86_400)),
            rate_limit_per_ip: args
                .rate_limit_per_ip
                .as_deref()
                .filter(|s| !s.trim().is_empty())
                .map(parse_rate_limit)
                .transpose()?,
            notify_url: args
                .notify_url
                .as_deref()
                .filter(|s| !s.trim().is_empty())
                .map(|u| validate_notify_url(u.trim()))
                .transpose()?,
            geoip_db: args.geoip_db.clone(),
            policy_file: args.policy_file.clone(),
            notify_on: crate::policy::notify::NotifyOn::parse(&args.notify_on).ok_or_else(
                || {
                    invalid(
                        "--notify-on / KEYHOLDER_NOTIFY_ON",
                        "expected approvals, refusals or all",
                    )
                },
            )?,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use clap::{Args as _, FromArgMatches as _};

    use super::*;

    fn serve(flags: &[&str]) -> Result<Config, ConfigError> {
        let mut argv = vec!["serve", "--data-dir", "/tmp/kh-config-test"];
        argv.extend_from_slice(flags);
        let matches = ServeArgs::augment_args(clap::Command::new("serve"))
            .try_get_matches_from(argv)
            .unwrap();
        Config::from_args(&ServeArgs::from_arg_matches(&matches).unwrap())
    }

    #[test]
    fn stream_time_limits_and_the_older_single_timeout() {
        let c = serve(&[]).unwrap();
        assert_eq!(c.upstream_connect_timeout, Duration::from_secs(5));
        assert_eq!(c.upstream_timeout, DEFAULT_UPSTREAM_TIMEOUT);
        assert_eq!(c.upstream_idle_timeout, DEFAULT_UPSTREAM_IDLE_TIMEOUT);
        assert_eq!(c.upstream_max_stream, Some(DEFAULT_UPSTREAM_MAX_STREAM));
        // The older flag sets head and idle where they are not given.
        let c = serve(&["--upstream-timeout", "7", "--upstream-idle-timeout", "90"]).unwrap();
        assert_eq!(c.upstream_timeout, Duration::from_secs(7));
        assert_eq!(c.upstream_idle_timeout, Duration::from_secs(90));
        let c = serve(&[
            "--upstream-connect-timeout",
            "2",
            "--upstream-head-timeout",
            "40",
            "--upstream-max-stream",
            "0",
        ])
        .unwrap();
        assert_eq!(c.upstream_connect_timeout, Duration::from_secs(2));
        assert_eq!(c.upstream_timeout, Duration::from_secs(40));
        assert_eq!(c.upstream_max_stream, None);
        for bad in [
            ["--upstream-timeout", "0"],
            ["--upstream-connect-timeout", "0"],
            ["--upstream-head-timeout", "100000"],
            ["--upstream-idle-timeout", "0"],
        ] {
            let err = serve(&bad).unwrap_err();
            assert!(err.to_string().contains(bad[0]), "{err}");
        }
    }
}
