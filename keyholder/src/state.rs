//! The state every worker shares, and how it is built from the configuration: storage, the
//! domain services on it, the outbound client, the network rules and the owner's extras.

use std::sync::Arc;

use actix_web::web::Data;
use anyhow::Context;

use crate::audit::{recorder::AuditQueue, AuditRecorder};
use crate::config::Config;
use crate::http::network::NetworkRules;
use crate::metrics::Metrics;
use crate::policy::PolicyEngine;
use crate::storage::sqlite::SqliteStorage;
use crate::storage::{Setting, SharedStorage};
use crate::upstream::{EgressGuard, Upstream, UpstreamSettings};
use crate::vault::binding::BindingService;
use crate::vault::collections::StorageService;
use crate::vault::credentials::CredentialsService;
use crate::vault::egress::{EgressService, ProxyService};
use crate::vault::key_handle::{KeyHandle, Opened};
use crate::vault::minting::MintingService;
use crate::vault::refresh::RefreshService;
use crate::vault::reload::ReloadService;
use crate::vault::replay::ReplayGuard;
use crate::vault::signing::SigningService;
use crate::vault::VaultSettings;

/// State shared by every worker.
pub struct AppState {
    /// The repositories (one engine behind every storage trait).
    pub storage: SharedStorage,
    /// The key ring handle: master key, key ring, binding and seal in force.
    pub keys: Arc<KeyHandle>,
    /// Replay memory for request ids and ticket nonces.
    pub replay: ReplayGuard,
    /// The owner's custody policies (reloaded with every owner change).
    pub policy: Arc<PolicyEngine>,
    /// `/v1/storage`: the platform's documents through their cache.
    pub documents: Arc<StorageService>,
    /// `/v1/store`, `/v1/credential`, TOTP codes: credentials sealed and opened.
    pub credentials: Arc<CredentialsService>,
    /// `/v1/proxy`.
    pub proxy: ProxyService,
    /// `/v1/refresh`.
    pub refresh: RefreshService,
    /// `/v1/exchange` and the `/bind` page.
    pub binding: BindingService,
    /// Follows the owner's changes on disk (polled by a background task).
    pub reload: Arc<ReloadService>,
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

impl AppState {
    /// Opens the storage and the vault on it and builds everything the workers share. Returns
    /// the state and the audit queue, whose appending task the caller spawns.
    pub async fn build(
        config: Config,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<(Data<AppState>, AuditQueue)> {
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
            let declared = crate::policy::file::read(&path).with_context(|| {
                format!("--policy-file / KEYHOLDER_POLICY_FILE {}", path.display())
            })?;
            let count = declared.len();
            let applied = async {
                let change = crate::policy::file::apply(storage.as_ref(), &declared).await?;
                match storage.apply(change).await? {
                    crate::storage::Applied::Done { .. } => Ok(()),
                    crate::storage::Applied::CheckFailed(_) => {
                        Err(crate::vault::VaultError::Invalid(
                            "the policies changed while the file was applied; start again".into(),
                        ))
                    }
                }
            };
            applied.await.with_context(|| {
                format!("--policy-file / KEYHOLDER_POLICY_FILE {}", path.display())
            })?;
            tracing::info!(policies = count, file = %path.display(), "applied the policy file");
        }
        let settings = VaultSettings {
            max_ticket_lifetime: config.max_ticket_lifetime,
            capabilities: keyholder_protocol::paths::capabilities(config.enable_tv_refresh),
        };
        let opened = async {
            let Opened {
                keys,
                report,
                generation,
            } = KeyHandle::open(
                storage.as_ref(),
                &config.data_dir,
                &config.master_key,
                settings,
            )
            .await?;
            let replay = ReplayGuard::load(Arc::clone(&storage)).await?;
            let policy = Arc::new(PolicyEngine::default());
            policy.reload(storage.as_ref()).await?;
            Ok::<_, crate::vault::VaultError>((Arc::new(keys), report, generation, replay, policy))
        };
        let (keys, report, generation, replay, policy) =
            opened.await.context("cannot open the key ring")?;
        // The services, each over what it needs (see `vault`).
        let documents = Arc::new(StorageService::new(
            Arc::clone(&storage),
            Arc::clone(&keys),
            Arc::clone(&policy),
        ));
        let egress = Arc::new(EgressService::new(Arc::clone(&storage)));
        let signing = Arc::new(SigningService::new(
            Arc::clone(&storage),
            Arc::clone(&egress),
        ));
        let minting = Arc::new(MintingService::new(
            Arc::clone(&storage),
            Arc::clone(&egress),
        ));
        let reload = Arc::new(ReloadService::new(
            Arc::clone(&storage),
            Arc::clone(&keys),
            Arc::clone(&documents),
            Arc::clone(&egress),
            Arc::clone(&signing),
            Arc::clone(&policy),
            &config.data_dir,
            &config.master_key,
            generation,
        ));
        let credentials = Arc::new(CredentialsService::new(
            Arc::clone(&keys),
            Arc::clone(&documents),
            Arc::clone(&minting),
            Arc::clone(&reload),
        ));
        let proxy = ProxyService::new(
            Arc::clone(&keys),
            Arc::clone(&egress),
            Arc::clone(&credentials),
            signing,
            minting,
        );
        let refresh = RefreshService::new(
            Arc::clone(&storage),
            Arc::clone(&keys),
            Arc::clone(&documents),
            egress,
        );
        let binding = BindingService::new(Arc::clone(&storage), Arc::clone(&keys));
        // Protocol 2.4.0: links kept by earlier versions are sealed before anything is served.
        match documents.migrate_totp_links().await {
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
        .context("cannot build the outbound HTTP client")?
        .observed(Arc::clone(&metrics));
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
            storage,
            keys,
            replay,
            policy,
            documents,
            credentials,
            proxy,
            refresh,
            binding,
            reload,
            network,
            metrics: Arc::clone(&metrics),
            upstream,
            config: Arc::clone(&config),
            audit,
            geoip,
            notifier: crate::policy::notify::Notifier::new(
                config.notify_url.clone(),
                config.notify_on,
            ),
            rate_limit: config
                .rate_limit_per_ip
                .map(crate::http::rate_limit::RateLimiter::new),
        });

        Ok((state, audit_queue))
    }
}
