//! A database of its own for each test (random name, dropped afterwards), on the PostgreSQL that
//! `KEYHOLDER_TEST_DATABASE_URL` names (a role allowed to create databases), by default
//! `postgres://keyholder:keyholder@127.0.0.1:5432/postgres`. When that variable is unset and no
//! PostgreSQL answers at the default, tests skip with a message; when it is set, an unreachable
//! server fails them.

use super::{PgError, PgTarget};

/// Environment variable naming the test server.
pub const TEST_URL_VAR: &str = "KEYHOLDER_TEST_DATABASE_URL";
/// Used when [`TEST_URL_VAR`] is unset.
pub const DEFAULT_TEST_URL: &str = "postgres://keyholder:keyholder@127.0.0.1:5432/postgres";

/// A freshly created, empty database, dropped (with its connections) when this is dropped.
pub struct TestDatabase {
    /// The server's URL the database was made on.
    base: String,
    admin: PgTarget,
    target: PgTarget,
    name: String,
}

impl TestDatabase {
    /// Creates one, or returns `None` (after printing why) when no PostgreSQL is reachable and
    /// none was asked for explicitly.
    ///
    /// # Panics
    /// When [`TEST_URL_VAR`] is set but the server cannot be used: a configured test database
    /// that is down must fail the run, not skip it.
    #[allow(clippy::panic)]
    pub async fn create() -> Option<TestDatabase> {
        let explicit = std::env::var(TEST_URL_VAR).ok().filter(|v| !v.is_empty());
        let url = explicit.clone().unwrap_or_else(|| DEFAULT_TEST_URL.into());
        match Self::try_create(&url).await {
            Ok(db) => Some(db),
            Err(err) if explicit.is_none() => {
                eprintln!(
                    "SKIPPED: no PostgreSQL reachable at {DEFAULT_TEST_URL} ({err}); set {TEST_URL_VAR} to run the PostgreSQL tests"
                );
                None
            }
            Err(err) => panic!("{TEST_URL_VAR} is set but unusable: {err}"),
        }
    }

    /// Creates one on the server `url` names (a role allowed to create databases), whatever
    /// [`TEST_URL_VAR`] says (`keyholder-bench --database-url`).
    pub async fn create_on(url: &str) -> Result<TestDatabase, PgError> {
        Self::try_create(url).await
    }

    async fn try_create(url: &str) -> Result<TestDatabase, PgError> {
        let admin = PgTarget::parse(url, None)?;
        let name = format!("kh_test_{}", uuid::Uuid::new_v4().simple());
        let client = admin.connect().await?;
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await?;
        let target = admin.with_database(&name);
        Ok(TestDatabase {
            base: url.to_string(),
            admin,
            target,
            name,
        })
    }

    /// The test database.
    pub fn target(&self) -> &PgTarget {
        &self.target
    }

    /// Its URL (with the password, if the test server's URL has one).
    pub fn url(&self) -> String {
        match url::Url::parse(&self.base) {
            Ok(mut url) => {
                url.set_path(&self.name);
                url.to_string()
            }
            Err(_) => self.base.clone(),
        }
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let admin = self.admin.clone();
        let name = self.name.clone();
        // Drop runs inside the test's runtime: a thread of its own with its own runtime.
        let dropped = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                if let Ok(client) = admin.connect().await {
                    let _ = client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            });
        });
        let _ = dropped.join();
    }
}
