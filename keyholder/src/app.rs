//! Assembles the server: opens the store and the vault, builds the shared state, binds the
//! listener (plain or TLS) and runs actix-web, plus the optional metrics listener; returns a
//! handle so tests can run several servers in one process.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::ServerHandle;
use actix_web::http::header;
use actix_web::middleware::from_fn;
use actix_web::web::{self, Data};
use actix_web::{App, HttpResponse, HttpServer};
use anyhow::Context;

use crate::audit::AuditRecorder;
use crate::config::Config;
use crate::http::{self, network::NetworkRules};
use crate::metrics::Metrics;
use crate::storage::sqlite::SqliteStorage;
use crate::storage::{Setting, SharedStorage};
use crate::tls::{CertReloader, TlsError};
use crate::upstream::{EgressGuard, Upstream, UpstreamSettings};
use crate::vault::{Vault, VaultSettings};

/// State shared by every worker.
pub struct AppState {
    /// The domain layer.
    pub vault: Vault,
    /// Who may call what, by address.
    pub network: NetworkRules,
    /// Prometheus metrics (counted always, served only with `--metrics-listen`).
    pub metrics: Arc<Metrics>,
    /// The shared outbound client behind the SSRF guard (built once at start).
    pub upstream: Upstream,
    /// The configuration the server was started with.
    pub config: Arc<Config>,
    /// The audit trail's appender (off the request path).
    pub audit: AuditRecorder,
    /// Notifications to the owner (custody-policy approvals and refusals).
    pub notifier: crate::policy::notify::Notifier,
    /// The owner's country database (`serve --geoip-db`), for `--geo` rules.
    pub geoip: Option<maxminddb::Reader<Vec<u8>>>,
    /// The per-client-address request limit (`--rate-limit-per-ip`), when configured.
    pub rate_limit: Option<crate::http::rate_limit::RateLimiter>,
}

/// A started server.
pub struct RunningServer {
    /// The address actually bound (useful with port 0).
    pub addr: SocketAddr,
    /// Shared state (tests look inside).
    pub state: Data<AppState>,
    /// The metrics listener's address, when metrics are served.
    pub metrics_addr: Option<SocketAddr>,
    handle: ServerHandle,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    metrics_server: Option<(ServerHandle, tokio::task::JoinHandle<std::io::Result<()>>)>,
    tls: Option<Arc<CertReloader>>,
    background: Vec<tokio::task::JoinHandle<()>>,
}

/// How often the server looks for the owner's changes (seal, keys, binding) in the database.
pub const FOLLOW_INTERVAL: Duration = Duration::from_millis(250);
/// How often `--audit-retention-days` is applied.
pub const AUDIT_RETENTION_INTERVAL: Duration = Duration::from_secs(3600);

impl RunningServer {
    /// Stops the server (gracefully: in-flight requests finish) and closes the store.
    pub async fn stop(mut self) {
        self.handle.stop(true).await;
        let _ = (&mut self.task).await;
        self.finish().await;
    }

    /// Runs until the server stops (SIGTERM/SIGINT when signals are handled).
    pub async fn wait(mut self) -> std::io::Result<()> {
        let result = match (&mut self.task).await {
            Ok(r) => r,
            Err(e) => Err(std::io::Error::other(e)),
        };
        self.finish().await;
        result
    }

    async fn finish(mut self) {
        if let Some((handle, task)) = self.metrics_server.take() {
            handle.stop(true).await;
            let _ = task.await;
        }
        // Queued audit entries are written before the appender stops.
        self.state.audit.flush().await;
        for task in &self.background {
            task.abort();
        }
        self.state.vault.storage().close();
    }

    /// Base URL of the server, `http://addr` or `https://addr`.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// URL of the metrics page, when metrics are served.
    pub fn metrics_url(&self) -> Option<String> {
        self.metrics_addr.map(|a| format!("http://{a}/metrics"))
    }

    /// Reloads the TLS certificate and key from their files (what SIGHUP does); new connections
    /// use them, open ones are not dropped. On error the certificate in use stays.
    pub fn reload_tls(&self) -> Result<String, TlsError> {
        match &self.tls {
            Some(tls) => tls.reload(),
            None => Ok(String::new()),
        }
    }
}

/// Creates the data folder (owner-only) if needed.
pub fn prepare_data_dir(config: &Config) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data folder {}", config.data_dir.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&config.data_dir, std::fs::Permissions::from_mode(0o700));
    }
    Ok(())
}

/// Opens everything and starts serving on `config.listen`.
pub async fn start(config: Config) -> anyhow::Result<RunningServer> {
    // Certificate problems are configuration errors: report them before touching the data.
    let tls = config
        .tls
        .clone()
        .map(CertReloader::load)
        .transpose()?
        .map(Arc::new);
    prepare_data_dir(&config)?;
    let metrics = Arc::new(Metrics::new());
    let storage: SharedStorage = match &config.database {
        // Several replicas on one PostgreSQL database (`--database-url`).
        Some(db) => Arc::new(
            crate::storage::postgres::PostgresStorage::open(db.target.clone(), &db.node_id)
                .await
                .with_context(|| format!("cannot open the database {}", db.target.display()))?,
        ),
        None => Arc::new(
            SqliteStorage::open_observed(&config.data_dir, Some(metrics.commit_observer()))
                .with_context(|| {
                    format!("cannot open the database in {}", config.data_dir.display())
                })?,
        ),
    };
    // Before the vault opens, so it starts at the owner generation the file's changes bumped
    // (a reload racing the first requests would be needless).
    if let Some(path) = config.policy_file.clone() {
        let declared = crate::policy::file::read(&path)
            .with_context(|| format!("--policy-file / KEYHOLDER_POLICY_FILE {}", path.display()))?;
        let count = declared.len();
        let applied = async {
            let change = crate::policy::file::apply(storage.as_ref(), &declared).await?;
            match storage.apply(change).await? {
                crate::storage::Applied::Done { .. } => Ok(()),
                crate::storage::Applied::CheckFailed(_) => Err(crate::vault::VaultError::Invalid(
                    "the policies changed while the file was applied; start again".into(),
                )),
            }
        };
        applied
            .await
            .with_context(|| format!("--policy-file / KEYHOLDER_POLICY_FILE {}", path.display()))?;
        tracing::info!(policies = count, file = %path.display(), "applied the policy file");
    }
    let settings = VaultSettings {
        max_ticket_lifetime: config.max_ticket_lifetime,
        capabilities: keyholder_protocol::paths::capabilities(config.enable_tv_refresh),
    };
    let (vault, report) = Vault::open(
        Arc::clone(&storage),
        &config.data_dir,
        &config.master_key,
        settings,
    )
    .await
    .context("cannot open the key ring")?;
    // Protocol 2.4.0: links kept by earlier versions are sealed before anything is served.
    match vault.migrate_totp_links().await {
        Ok(report) if report.migrated > 0 || report.failed > 0 => tracing::info!(
            migrated = report.migrated,
            failed = report.failed,
            "sealed stored totpUri links"
        ),
        Ok(_) => {}
        Err(err) => {
            tracing::warn!(error = %err, "stored totpUri links not sealed at start (sealed keyholder?); they are sealed on first read")
        }
    }
    if report.created_master_file {
        tracing::warn!(
            file = %config.data_dir.join(crate::vault::master::DEFAULT_MASTER_KEY_FILE).display(),
            "created a master key file inside the data folder: whoever copies the folder gets the keys. \
             Move it elsewhere and start with --master-key-file (KEYHOLDER_MASTER_KEY_FILE), \
             or use --passphrase-file on a new data folder"
        );
    }
    if report.created_keys {
        tracing::info!("created new keys (data key v1, identity key, HMAC secret)");
    }
    if let Some(public_url) = config.public_url.clone() {
        storage.put_setting(Setting::PublicUrl, &public_url).await?;
    }
    let upstream = Upstream::new(UpstreamSettings {
        guard: EgressGuard {
            allow_private: config.egress_allow_private,
        },
        proxy: crate::upstream::StreamLimits {
            connect: config.upstream_connect_timeout,
            head: config.upstream_timeout,
            idle: config.upstream_idle_timeout,
            max_stream: config.upstream_max_stream,
        },
        provider_timeout: config.provider_timeout,
    })
    .context("cannot build the outbound HTTP client")?;
    if config.egress_allow_private {
        tracing::warn!(
            "EGRESS GUARD RELAXED (--egress-allow-private / KEYHOLDER_EGRESS_ALLOW_PRIVATE): proxied and \
             OAuth calls may use plain http and reach loopback and private networks. Use this only for \
             tests and home labs; cloud metadata, link-local, multicast and unspecified addresses stay refused"
        );
    }
    if config.enable_tv_refresh {
        tracing::warn!(
            "tv-refresh enabled: /v1/refresh hands refresh tokens to the platform when it asks"
        );
    }
    if config.oauth_trust_platform_secret {
        tracing::warn!(
            "trusting the platform's OAuth client secret and token URL where no local client is \
             configured (the token URL is pinned per service on first use)"
        );
    }
    let network = NetworkRules {
        platform_ips: config.platform_ips.clone(),
        trusted_proxies: config.trusted_proxies.clone(),
    };
    let geoip = match &config.geoip_db {
        Some(path) => Some(maxminddb::Reader::open_readfile(path).with_context(|| {
            format!(
                "--geoip-db / KEYHOLDER_GEOIP_DB: cannot read the country database {}",
                path.display()
            )
        })?),
        None => None,
    };
    let config = Arc::new(config);
    let (audit, audit_queue) = AuditRecorder::new();
    let state = Data::new(AppState {
        vault,
        network,
        metrics: Arc::clone(&metrics),
        upstream,
        config: Arc::clone(&config),
        audit,
        geoip,
        notifier: crate::policy::notify::Notifier::new(config.notify_url.clone(), config.notify_on),
        rate_limit: config
            .rate_limit_per_ip
            .map(crate::http::rate_limit::RateLimiter::new),
    });

    let ring_state = state.clone();
    let audit_task = audit_queue.spawn(Arc::clone(&storage), move || ring_state.vault.keys());
    // Before the listener exists, so no SIGHUP can arrive while it would still end the process.
    let mut background = Vec::new();
    if config.handle_signals {
        background.push(spawn_reload_on_hangup(tls.clone())?);
    }

    let app_state = state.clone();
    let mut server = HttpServer::new(move || {
        // Runs once on each worker thread.
        app_state.upstream.warm();
        App::new()
            .app_data(app_state.clone())
            // Extractors read bodies themselves with per-endpoint limits; this caps the rest.
            .app_data(web::PayloadConfig::new(64 * 1024))
            .wrap(from_fn(http::middleware::keyholder_layer))
            .configure(http::configure)
    })
    .client_request_timeout(Duration::from_secs(10))
    .client_disconnect_timeout(Duration::from_secs(2))
    .keep_alive(Duration::from_secs(30))
    .shutdown_timeout(15)
    .max_connection_rate(512)
    .max_connections(10_000);
    if let Some(workers) = config.workers {
        server = server.workers(workers);
    }
    if !config.handle_signals {
        server = server.disable_signals();
    }
    let server = match &tls {
        Some(tls) => server.bind_openssl(config.listen, tls.acceptor()?),
        None => server.bind(config.listen),
    }
    .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = server
        .addrs()
        .first()
        .copied()
        .context("no listening address")?;
    let server = server.run();
    let handle = server.handle();
    let task = tokio::spawn(server);

    let (metrics_addr, metrics_server) = match config.metrics_listen {
        Some(listen) => {
            let (addr, handle, task) = start_metrics_server(listen, Arc::clone(&metrics))?;
            (Some(addr), Some((handle, task)))
        }
        None => (None, None),
    };

    let purge_state = state.clone();
    let purge = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tick.tick().await;
            if let Err(err) = purge_state.vault.replay.purge_expired().await {
                tracing::warn!(error = %err, "replay purge failed");
            }
        }
    });

    if let Some(retention) = config.audit_retention {
        let prune_state = state.clone();
        background.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(AUDIT_RETENTION_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match prune_state.vault.prune_audit(retention).await {
                    Ok(0) => {}
                    Ok(removed) => tracing::info!(removed, "pruned old audit entries"),
                    Err(err) => tracing::error!(error = %err, "audit retention: nothing pruned"),
                }
            }
        }));
    }

    // Follow the owner's CLI (seal, key rotation, import) without a restart.
    let follow_state = state.clone();
    let follow = tokio::spawn(async move {
        let mut tick = tokio::time::interval(FOLLOW_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        // A shared database announces owner changes (PostgreSQL NOTIFY): follow them at once.
        let mut pushed = follow_state.vault.storage().watch_owner_generation();
        loop {
            match pushed.as_mut() {
                Some(watch) => tokio::select! {
                    _ = tick.tick() => {}
                    changed = watch.changed() => {
                        if changed.is_err() {
                            pushed = None;
                        }
                    }
                },
                None => {
                    tick.tick().await;
                }
            }
            match follow_state.vault.follow_owner_changes().await {
                Ok(changed) => {
                    if changed {
                        tracing::info!(
                            sealed = follow_state.vault.is_sealed(),
                            data_key = follow_state.vault.keys().current_data_version(),
                            "picked up the owner's changes"
                        );
                    }
                    failing = false;
                }
                Err(err) if !failing => {
                    failing = true;
                    tracing::warn!(error = %err, "cannot read the owner's changes");
                }
                Err(_) => {}
            }
        }
    });

    let binding = state.vault.binding();
    tracing::info!(
        listen = %addr,
        tls = tls.is_some(),
        certificate_sha256 = %tls.as_ref().map(|t| t.fingerprint()).unwrap_or_default(),
        metrics = %metrics_addr.map(|a| a.to_string()).unwrap_or_else(|| "off".into()),
        bound = binding.bound,
        webhook_id = %binding.webhook_id,
        identity_key = %state.vault.keys().identity().key_id(),
        "keyholder listening"
    );
    if !binding.bound {
        tracing::info!(
            "not bound yet: run `keyholder bind --data-dir {} --public-url https://<your-host>` and open the link it prints",
            config.data_dir.display()
        );
    }
    background.push(purge);
    background.push(follow);
    background.push(audit_task);
    Ok(RunningServer {
        addr,
        state,
        metrics_addr,
        handle,
        task,
        metrics_server,
        tls,
        background,
    })
}

type ServerTask = tokio::task::JoinHandle<std::io::Result<()>>;

/// The metrics listener: a second, small actix server with `GET /metrics` only, so that scraping
/// never shares a port (or a firewall rule) with the webhook.
fn start_metrics_server(
    listen: SocketAddr,
    metrics: Arc<Metrics>,
) -> anyhow::Result<(SocketAddr, ServerHandle, ServerTask)> {
    let server = HttpServer::new(move || {
        let metrics = Arc::clone(&metrics);
        App::new()
            .route(
                "/metrics",
                web::get().to(move || {
                    let text = metrics.encode();
                    async move {
                        HttpResponse::Ok()
                            .insert_header((
                                header::CONTENT_TYPE,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            ))
                            .body(text)
                    }
                }),
            )
            .default_service(web::to(HttpResponse::NotFound))
    })
    .workers(1)
    .disable_signals()
    .shutdown_timeout(2)
    .bind(listen)
    .with_context(|| {
        format!("invalid setting --metrics-listen / KEYHOLDER_METRICS_LISTEN: cannot listen on {listen}")
    })?;
    let addr = server
        .addrs()
        .first()
        .copied()
        .context("no metrics listening address")?;
    let server = server.run();
    let handle = server.handle();
    Ok((addr, handle, tokio::spawn(server)))
}

/// SIGHUP reloads the TLS certificate (and is otherwise ignored rather than ending the process).
fn spawn_reload_on_hangup(
    tls: Option<Arc<CertReloader>>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    Ok(tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            match &tls {
                Some(tls) => match tls.reload() {
                    Ok(fingerprint) => tracing::info!(
                        certificate_sha256 = %fingerprint,
                        "SIGHUP: TLS certificate reloaded; new connections use it"
                    ),
                    Err(err) => tracing::error!(
                        error = %err,
                        "SIGHUP: TLS certificate not reloaded; the previous one stays in use"
                    ),
                },
                None => tracing::info!("SIGHUP: no TLS certificate to reload"),
            }
        }
    }))
}
