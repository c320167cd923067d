//! PostgreSQL storage for several replicas sharing one database (`--database-url postgres://...`).
//!
//! One pool of connections per replica (tokio-postgres behind deadpool-postgres, TLS through openssl);
//! schema migrations applied at start under an advisory lock; replay marks accepted once across all
//! replicas by the database itself (see [`replay`]); owner changes announced with NOTIFY (see
//! [`notify`]); one audit chain per replica (see [`audit`]); housekeeping on whichever replica holds
//! an advisory lock (see [`housekeeping`]).
//!
//! Every session runs with `synchronous_commit = on`: a COMMIT returns only once the write is
//! flushed to the server's WAL, so nothing is acknowledged before it is durable.

pub mod audit;
pub mod engine;
pub mod housekeeping;
pub mod migrate;
pub mod notify;
pub mod replay;
pub mod schema;
mod stores;
pub mod testing;

use std::path::{Path, PathBuf};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
use postgres_openssl::MakeTlsConnector;
use zeroize::Zeroizing;

pub use engine::PostgresStorage;

/// Connections kept per replica.
pub const POOL_SIZE: usize = 16;
/// How long a request waits for a connection (or for one to be opened) before it is answered 503.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest a group commit (replay marks, credential stores) may take before its requests are
/// answered `503 storage_unavailable`: a database lost without a reset (a black-holed host) would
/// otherwise hold every queued request until TCP gives up, many minutes later.
pub const BATCH_TIMEOUT: Duration = Duration::from_secs(5);

/// PostgreSQL failures. The text is for the server log only; clients get `storage_unavailable`.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// The database cannot be reached (refused, timed out, connection lost, pool exhausted).
    #[error("PostgreSQL unavailable: {0}")]
    Unavailable(String),
    /// PostgreSQL answered with an error.
    #[error("PostgreSQL error: {0}")]
    Db(String),
    /// A stored value could not be decoded.
    #[error("corrupt stored value: {0}")]
    Corrupt(String),
    /// The `--database-url` (or its password file) is unusable.
    #[error("database URL: {0}")]
    Config(String),
}

impl From<tokio_postgres::Error> for PgError {
    fn from(err: tokio_postgres::Error) -> Self {
        // Errors without a SQLSTATE are transport failures; class 08 is a connection exception,
        // 57P0x an administrator shutdown or a server that cannot take connections yet, 53 a lack
        // of resources: all of them pass once the database is back.
        let unavailable = match err.code() {
            None => true,
            Some(code) => {
                let code = code.code();
                code.starts_with("08") || code.starts_with("57P") || code.starts_with("53")
            }
        };
        let text = match err.as_db_error() {
            Some(db) => format!("{} ({})", db.message(), db.code().code()),
            None => err.to_string(),
        };
        if unavailable {
            PgError::Unavailable(text)
        } else {
            PgError::Db(text)
        }
    }
}

impl From<deadpool_postgres::PoolError> for PgError {
    fn from(err: deadpool_postgres::PoolError) -> Self {
        match err {
            deadpool_postgres::PoolError::Backend(e) => PgError::from(e),
            other => PgError::Unavailable(other.to_string()),
        }
    }
}

/// How the server checks PostgreSQL's certificate (libpq's `sslmode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plain TCP (or a Unix socket).
    Disable,
    /// TLS when the server offers it, unverified (libpq's default).
    Prefer,
    /// TLS required, certificate not verified.
    Require,
    /// TLS required, certificate chain verified (`sslrootcert` or the system roots).
    VerifyCa,
    /// TLS required, chain and host name verified.
    VerifyFull,
}

/// A parsed `--database-url`: the driver's configuration plus the TLS settings it does not parse.
#[derive(Clone)]
pub struct PgTarget {
    config: tokio_postgres::Config,
    ssl_mode: SslMode,
    root_cert: Option<PathBuf>,
    /// The URL without its password, for logs and messages.
    display: String,
}

impl std::fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.display)
    }
}

/// Whether `text` names a PostgreSQL database (`postgres://` or `postgresql://`).
pub fn is_postgres_url(text: &str) -> bool {
    let lower = text.trim_start().to_ascii_lowercase();
    lower.starts_with("postgres://") || lower.starts_with("postgresql://")
}

impl PgTarget {
    /// Parses a `postgres://user@host:port/db?sslmode=...&sslrootcert=...` URL. The password
    /// comes from `password_file` when given (first line, trailing newline removed); a password
    /// both in the URL and in a file is refused.
    pub fn parse(url: &str, password_file: Option<&Path>) -> Result<PgTarget, PgError> {
        if !is_postgres_url(url) {
            return Err(PgError::Config(
                "expected postgres://user@host:port/database".into(),
            ));
        }
        let mut parsed =
            url::Url::parse(url.trim()).map_err(|e| PgError::Config(format!("not a URL: {e}")))?;
        let mut ssl_mode = SslMode::Prefer;
        let mut root_cert = None;
        let mut kept: Vec<(String, String)> = Vec::new();
        for (name, value) in parsed.query_pairs() {
            match name.as_ref() {
                "sslmode" => {
                    ssl_mode = match value.as_ref() {
                        "disable" => SslMode::Disable,
                        "allow" | "prefer" => SslMode::Prefer,
                        "require" => SslMode::Require,
                        "verify-ca" => SslMode::VerifyCa,
                        "verify-full" => SslMode::VerifyFull,
                        other => {
                            return Err(PgError::Config(format!(
                                "sslmode {other:?}: expected disable, prefer, require, verify-ca or verify-full"
                            )))
                        }
                    }
                }
                "sslrootcert" => root_cert = Some(PathBuf::from(value.as_ref())),
                _ => kept.push((name.into_owned(), value.into_owned())),
            }
        }
        if kept.is_empty() {
            parsed.set_query(None);
        } else {
            parsed.query_pairs_mut().clear().extend_pairs(kept);
        }
        let has_password = parsed.password().is_some();
        let mut display = parsed.clone();
        let _ = display.set_password(None);
        let mut config: tokio_postgres::Config = parsed
            .as_str()
            .parse()
            .map_err(|e: tokio_postgres::Error| PgError::Config(e.to_string()))?;
        if let Some(file) = password_file {
            if has_password {
                return Err(PgError::Config(
                    "a password both in the URL and in --database-password-file".into(),
                ));
            }
            let text =
                Zeroizing::new(std::fs::read_to_string(file).map_err(|e| {
                    PgError::Config(format!("password file {}: {e}", file.display()))
                })?);
            let password = text.lines().next().unwrap_or("");
            if password.is_empty() {
                return Err(PgError::Config(format!(
                    "password file {} is empty",
                    file.display()
                )));
            }
            config.password(password.as_bytes());
        }
        config.ssl_mode(match ssl_mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
        config.connect_timeout(CONNECT_TIMEOUT);
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(30));
        // Durable before acknowledged, whatever the server's default is.
        config.options("-c synchronous_commit=on");
        if config.get_application_name().is_none() {
            config.application_name("keyholder");
        }
        Ok(PgTarget {
            config,
            ssl_mode,
            root_cert,
            display: display.to_string(),
        })
    }

    /// The URL without its password.
    pub fn display(&self) -> &str {
        &self.display
    }

    /// The database name (the user's name when the URL names none, as libpq does).
    pub fn database(&self) -> Option<&str> {
        self.config.get_dbname().or_else(|| self.config.get_user())
    }

    /// The same server and credentials, another database (tests and `migrate-storage`).
    pub fn with_database(&self, name: &str) -> PgTarget {
        let mut next = self.clone();
        next.config.dbname(name);
        if let Ok(mut url) = url::Url::parse(&self.display) {
            url.set_path(name);
            next.display = url.to_string();
        }
        next
    }

    /// The openssl connector for this target's `sslmode`.
    pub fn tls(&self) -> Result<MakeTlsConnector, PgError> {
        let tls_err = |e: openssl::error::ErrorStack| PgError::Config(format!("TLS: {e}"));
        let mut builder = SslConnector::builder(SslMethod::tls_client()).map_err(tls_err)?;
        match self.ssl_mode {
            SslMode::Disable | SslMode::Prefer | SslMode::Require => {
                builder.set_verify(SslVerifyMode::NONE);
            }
            SslMode::VerifyCa | SslMode::VerifyFull => {
                builder.set_verify(SslVerifyMode::PEER);
                if let Some(root) = &self.root_cert {
                    builder.set_ca_file(root).map_err(|e| {
                        PgError::Config(format!("sslrootcert {}: {e}", root.display()))
                    })?;
                }
            }
        }
        let mut connector = MakeTlsConnector::new(builder.build());
        if self.ssl_mode != SslMode::VerifyFull {
            connector.set_callback(|config, _| {
                config.set_verify_hostname(false);
                Ok(())
            });
        }
        Ok(connector)
    }

    /// One connection outside the pool (LISTEN, migrations, administration).
    pub async fn connect(&self) -> Result<tokio_postgres::Client, PgError> {
        let (client, connection) = self.config.connect(self.tls()?).await?;
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(error = %err, "PostgreSQL connection ended");
            }
        });
        Ok(client)
    }

    /// A pool of [`POOL_SIZE`] connections; none is opened until first used.
    pub fn pool(&self) -> Result<Pool, PgError> {
        let manager = Manager::from_config(
            self.config.clone(),
            self.tls()?,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| PgError::Config(e.to_string()))
    }
}

/// A read-only transaction whose statements all see one snapshot of the database.
pub async fn snapshot(
    client: &mut deadpool_postgres::Object,
) -> Result<deadpool_postgres::Transaction<'_>, tokio_postgres::Error> {
    client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
}

/// A connection of the pool, or [`PgError::Unavailable`].
pub async fn client(pool: &Pool) -> Result<deadpool_postgres::Object, PgError> {
    Ok(pool.get().await?)
}

/// Runs one group commit (`what`, for the log) on a connection of `pool` within
/// [`BATCH_TIMEOUT`]. A commit that times out takes its connection out of the pool and closes it:
/// put back, the next batch would queue behind an answer that may never come.
pub async fn timed_batch<T, E: From<PgError>>(
    pool: &Pool,
    what: &str,
    run: impl AsyncFnOnce(&mut deadpool_postgres::Object) -> Result<T, E>,
) -> Result<T, E> {
    let mut client = client(pool).await?;
    match tokio::time::timeout(BATCH_TIMEOUT, run(&mut client)).await {
        Ok(outcome) => outcome,
        Err(_) => {
            drop(deadpool_postgres::Object::take(client));
            Err(PgError::Unavailable(format!("{what} timed out")).into())
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn urls_parse_with_tls_settings_and_password_files() {
        let t = PgTarget::parse(
            "postgres://kh:secret@db.example:5433/vault?sslmode=verify-full&sslrootcert=/ca.pem&application_name=x",
            None,
        )
        .unwrap();
        assert_eq!(t.ssl_mode, SslMode::VerifyFull);
        assert_eq!(t.root_cert.as_deref(), Some(Path::new("/ca.pem")));
        assert!(!t.display().contains("secret"), "{}", t.display());
        assert_eq!(t.database(), Some("vault"));
        assert_eq!(t.config.get_application_name(), Some("x"));
        assert!(PgTarget::parse("postgres://h/db?sslmode=sometimes", None).is_err());
        assert!(PgTarget::parse("sqlite:///x", None).is_err());

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "from-file\n").unwrap();
        let t = PgTarget::parse("postgres://kh@h/db", Some(&file)).unwrap();
        assert_eq!(t.config.get_password(), Some(&b"from-file"[..]));
        assert!(
            PgTarget::parse("postgres://kh:x@h/db", Some(&file)).is_err(),
            "two passwords"
        );
        std::fs::write(&file, "\n").unwrap();
        assert!(PgTarget::parse("postgres://kh@h/db", Some(&file)).is_err());
        let other = t.with_database("other");
        assert_eq!(other.database(), Some("other"));
        assert!(other.display().ends_with("/other"), "{}", other.display());
    }

    /// `sslmode=require` negotiates TLS through openssl; `verify-full` against a root that did not
    /// sign the server's certificate is refused (nothing is sent unverified).
    #[tokio::test]
    async fn sslmode_require_uses_tls_and_verify_full_checks_the_certificate() {
        let Some(db) = testing::TestDatabase::create().await else {
            return;
        };
        let plain = db.target().connect().await.unwrap();
        let ssl_on: String = plain.query_one("SHOW ssl", &[]).await.unwrap().get(0);
        if ssl_on != "on" {
            eprintln!("SKIPPED: the test PostgreSQL has ssl off");
            return;
        }
        let with_mode = |mode: &str, extra: &str| {
            let mut url = url::Url::parse(&db.url()).unwrap();
            url.query_pairs_mut().append_pair("sslmode", mode);
            let mut text = url.to_string();
            text.push_str(extra);
            PgTarget::parse(&text, None).unwrap()
        };
        let tls = with_mode("require", "").connect().await.unwrap();
        let on: bool = tls
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(on, "not encrypted");
        let disabled = with_mode("disable", "").connect().await.unwrap();
        let off: bool = disabled
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(!off);
        // A CA of our own that signed nothing the server holds.
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let key =
            openssl::pkey::PKey::from_rsa(openssl::rsa::Rsa::generate(2048).unwrap()).unwrap();
        let mut name = openssl::x509::X509NameBuilder::new().unwrap();
        name.append_entry_by_text("CN", "not the server's CA")
            .unwrap();
        let name = name.build();
        let mut cert = openssl::x509::X509Builder::new().unwrap();
        cert.set_subject_name(&name).unwrap();
        cert.set_issuer_name(&name).unwrap();
        cert.set_pubkey(&key).unwrap();
        cert.set_not_before(&openssl::asn1::Asn1Time::days_from_now(0).unwrap())
            .unwrap();
        cert.set_not_after(&openssl::asn1::Asn1Time::days_from_now(1).unwrap())
            .unwrap();
        cert.sign(&key, openssl::hash::MessageDigest::sha256())
            .unwrap();
        std::fs::write(&ca, cert.build().to_pem().unwrap()).unwrap();
        let strict = with_mode("verify-full", &format!("&sslrootcert={}", ca.display()));
        assert!(
            strict.connect().await.is_err(),
            "an unverifiable server was accepted"
        );
    }
}
