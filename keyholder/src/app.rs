//! Assembles the server: opens the store and the vault, builds the shared state, binds the
//! listener and runs actix-web; returns a handle so tests can run several servers in one process.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::ServerHandle;
use actix_web::middleware::from_fn;
use actix_web::web::{self, Data};
use actix_web::{App, HttpServer};
use anyhow::Context;

use crate::audit::AuditRecorder;
use crate::config::Config;
use crate::http::{self, network::NetworkRules};
use crate::metrics::Metrics;
use crate::store::{put_setting, Store};
use crate::upstream::{EgressGuard, Upstream, UpstreamSettings};
use crate::vault::{Vault, VaultSettings};

/// State shared by every worker.
pub struct AppState {
    /// The domain layer.
    pub vault: Vault,
    /// Who may call what, by address.
    pub network: NetworkRules,
    /// Counters.
    pub metrics: Metrics,
    /// The shared outbound client behind the SSRF guard (built once at start).
    pub upstream: Upstream,
    /// The configuration the server was started with.
    pub config: Arc<Config>,
    /// The audit trail's appender (off the request path).
    pub audit: AuditRecorder,
}

/// A started server.
pub struct RunningServer {
    /// The address actually bound (useful with port 0).
    pub addr: SocketAddr,
    /// Shared state (tests look inside).
    pub state: Data<AppState>,
    handle: ServerHandle,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    purge: tokio::task::JoinHandle<()>,
    follow: tokio::task::JoinHandle<()>,
    audit_task: tokio::task::JoinHandle<()>,
}

/// How often the server looks for the owner's changes (seal, keys, binding) in the database.
pub const FOLLOW_INTERVAL: Duration = Duration::from_millis(250);

impl RunningServer {
    /// Stops the server (gracefully: in-flight requests finish) and closes the store.
    pub async fn stop(mut self) {
        self.handle.stop(true).await;
        let _ = (&mut self.task).await;
        self.finish().await;
    }

    /// Stops the background tasks, writes the queued audit entries and closes the store.
    async fn finish(&self) {
        self.purge.abort();
        self.follow.abort();
        self.state.audit.flush().await;
        self.audit_task.abort();
        self.state.vault.store().close();
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

    /// Base URL of the server, `http://addr`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
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
    prepare_data_dir(&config)?;
    let store = Store::open(&config.data_dir)
        .with_context(|| format!("cannot open the database in {}", config.data_dir.display()))?;
    let settings = VaultSettings {
        max_ticket_lifetime: config.max_ticket_lifetime,
        capabilities: keyholder_protocol::paths::capabilities(config.enable_tv_refresh),
    };
    let (vault, report) = Vault::open(
        store.clone(),
        &config.data_dir,
        &config.master_key,
        settings,
    )
    .await
    .context("cannot open the key ring")?;
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
        store
            .write(move |conn| put_setting(conn, "public_url", &public_url))
            .await?;
    }
    let upstream = Upstream::new(UpstreamSettings {
        guard: EgressGuard {
            allow_private: config.egress_allow_private,
        },
        proxy_timeout: config.upstream_timeout,
        provider_timeout: config.provider_timeout,
        max_response: config.upstream_max_response,
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
    let config = Arc::new(config);
    let (audit, audit_queue) = AuditRecorder::new();
    let state = Data::new(AppState {
        vault,
        network,
        metrics: Metrics::default(),
        upstream,
        config: Arc::clone(&config),
        audit,
    });

    let ring_state = state.clone();
    let audit_task = audit_queue.spawn(store.clone(), move || ring_state.vault.keys());

    let app_state = state.clone();
    let mut server = HttpServer::new(move || {
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
    let server = server
        .bind(config.listen)
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = server
        .addrs()
        .first()
        .copied()
        .context("no listening address")?;
    let server = server.run();
    let handle = server.handle();
    let task = tokio::spawn(server);

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

    // Follow the owner's CLI (seal, key rotation, import) without a restart.
    let follow_state = state.clone();
    let follow = tokio::spawn(async move {
        let mut tick = tokio::time::interval(FOLLOW_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tick.tick().await;
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
    Ok(RunningServer {
        addr,
        state,
        handle,
        task,
        purge,
        follow,
        audit_task,
    })
}
