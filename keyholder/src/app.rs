//! Assembles the server: builds the shared state (`state`), spawns the background jobs, binds the
//! listener (plain or TLS) and runs actix-web, plus the optional metrics listener; returns a
//! handle so tests can run several servers in one process.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::ServerHandle;
use actix_web::http::header;
use actix_web::web::{self, Data};
use actix_web::{App, HttpResponse, HttpServer};
use anyhow::Context;

use crate::audit::recorder::AuditQueue;
use crate::config::Config;
use crate::http;
use crate::metrics::Metrics;
use crate::state::AppState;
use crate::tls::{CertReloader, TlsError};

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
        self.state.storage.close();
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

/// Opens everything and starts serving on `config.listen`: builds the state, spawns the
/// background jobs, binds the listeners.
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
    let (state, audit_queue) = AppState::build(config, Arc::clone(&metrics)).await?;
    let config = Arc::clone(&state.config);
    let background = spawn_background(&state, audit_queue, tls.clone())?;
    let listeners = match bind_listeners(&state, tls.as_ref(), &metrics) {
        Ok(listeners) => listeners,
        Err(err) => {
            for task in &background {
                task.abort();
            }
            return Err(err);
        }
    };
    let Listeners {
        addr,
        handle,
        task,
        metrics_addr,
        metrics_server,
    } = listeners;
    let binding = state.keys.binding();
    tracing::info!(
        listen = %addr,
        tls = tls.is_some(),
        certificate_sha256 = %tls.as_ref().map(|t| t.fingerprint()).unwrap_or_default(),
        metrics = %metrics_addr.map(|a| a.to_string()).unwrap_or_else(|| "off".into()),
        bound = binding.bound,
        webhook_id = %binding.webhook_id,
        identity_key = %state.keys.keys().identity().key_id(),
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
        metrics_addr,
        handle,
        task,
        metrics_server,
        tls,
        background,
    })
}

/// The listeners once bound.
struct Listeners {
    addr: SocketAddr,
    handle: ServerHandle,
    task: ServerTask,
    metrics_addr: Option<SocketAddr>,
    metrics_server: Option<(ServerHandle, ServerTask)>,
}

/// The jobs that run beside the listeners: the audit appender, SIGHUP, the replay purge, audit
/// retention and following the owner's changes.
fn spawn_background(
    state: &Data<AppState>,
    audit_queue: AuditQueue,
    tls: Option<Arc<CertReloader>>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let config = Arc::clone(&state.config);
    let ring_state = state.clone();
    let audit_task = audit_queue.spawn(Arc::clone(&state.storage), move || ring_state.keys.keys());
    // Before the listener exists, so no SIGHUP can arrive while it would still end the process.
    let mut background = Vec::new();
    if config.handle_signals {
        background.push(spawn_reload_on_hangup(tls)?);
    }
    let purge_state = state.clone();
    let purge = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tick.tick().await;
            if let Err(err) = purge_state.replay.purge_expired().await {
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
                match crate::vault::retention::prune_audit(
                    prune_state.storage.as_ref(),
                    &prune_state.keys,
                    retention,
                )
                .await
                {
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
        let mut pushed = follow_state.storage.watch_owner_generation();
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
            match follow_state.reload.follow_owner_changes().await {
                Ok(changed) => {
                    if changed {
                        tracing::info!(
                            sealed = follow_state.keys.is_sealed(),
                            data_key = follow_state.keys.keys().current_data_version(),
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
    background.push(purge);
    background.push(follow);
    background.push(audit_task);
    Ok(background)
}

/// Binds the webhook listener (plain or TLS) and, if configured, the metrics listener.
fn bind_listeners(
    state: &Data<AppState>,
    tls: Option<&Arc<CertReloader>>,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<Listeners> {
    let config = Arc::clone(&state.config);
    let app_state = state.clone();
    let mut server = HttpServer::new(move || {
        // Runs once on each worker thread.
        app_state.upstream.warm();
        http::app(app_state.clone())
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
            let (addr, handle, task) = start_metrics_server(listen, Arc::clone(metrics))?;
            (Some(addr), Some((handle, task)))
        }
        None => (None, None),
    };
    Ok(Listeners {
        addr,
        handle,
        task,
        metrics_addr,
        metrics_server,
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
