//! Bind codes, the exchange, and the platform's public keys over `bind_codes`, `keyring`,
//! `platform_keys` and `settings`.

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};

use super::{put_setting, setting, SqliteStorage};
use crate::storage::{
    BindCode, Binding, Exchange, ExchangeInstall, ExchangeOutcome, Setting, StorageResult,
    StoredPlatformKey, WrappedKey,
};

fn code(conn: &Connection, code_hash: &str) -> StorageResult<Option<BindCode>> {
    Ok(conn
        .query_row(
            "SELECT code_hash, created_at, expires_at, used_at, rebind, hmac_hash, pending_secret,
                    platform_key FROM bind_codes WHERE code_hash = ?1",
            [code_hash],
            |r| {
                Ok(BindCode {
                    code_hash: r.get(0)?,
                    created_at: r.get(1)?,
                    expires_at: r.get(2)?,
                    used_at: r.get(3)?,
                    rebind: r.get(4)?,
                    hmac_hash: r.get(5)?,
                    pending_secret: r.get(6)?,
                    platform_key: r.get(7)?,
                })
            },
        )
        .optional()?)
}

pub(super) fn platform_keys(conn: &Connection) -> StorageResult<Vec<StoredPlatformKey>> {
    let mut stmt = conn.prepare_cached(
        "SELECT key_id, public_key, added_at FROM platform_keys ORDER BY added_at, key_id",
    )?;
    let rows = stmt
        .query_map([], |r| {
            Ok(StoredPlatformKey {
                key_id: r.get(0)?,
                public_key: r.get(1)?,
                added_at: r.get(2)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

pub(super) fn insert_platform_key(conn: &Connection, key: &StoredPlatformKey) -> StorageResult<()> {
    conn.execute(
        "INSERT INTO platform_keys(key_id, public_key, added_at) VALUES (?1, ?2, ?3)",
        params![key.key_id, key.public_key, key.added_at],
    )?;
    Ok(())
}

/// Installs `key` as the current HMAC secret and drops every older version.
fn install_hmac(conn: &Connection, key: &WrappedKey, hash: &str) -> StorageResult<()> {
    super::keyring::put_key(conn, key)?;
    conn.execute(
        "DELETE FROM keyring WHERE kind = ?1 AND version < ?2",
        params![key.kind, key.version],
    )?;
    put_setting(conn, Setting::HmacVersion, &key.version.to_string())?;
    put_setting(conn, Setting::HmacHash, hash)?;
    Ok(())
}

fn exchange(conn: &Connection, ex: &Exchange) -> StorageResult<ExchangeOutcome> {
    let Some(code) = code(conn, &ex.code_hash)? else {
        return Ok(ExchangeOutcome::Expired);
    };
    if code.used_at.is_some() {
        return Ok(ExchangeOutcome::Used);
    }
    if code.expires_at < ex.now {
        return Ok(ExchangeOutcome::Expired);
    }
    let use_code = || -> StorageResult<bool> {
        // Conditional: of two exchanges of one code, one finds it unused.
        Ok(conn.execute(
            "UPDATE bind_codes SET used_at = ?1 WHERE code_hash = ?2 AND used_at IS NULL",
            params![ex.now, ex.code_hash],
        )? > 0)
    };
    let bound = setting(conn, Setting::Bound)?.as_deref() == Some("true");
    if (bound || ex.bound_in_memory) && !code.rebind {
        // A refused plain code is used up all the same.
        return Ok(if use_code()? {
            ExchangeOutcome::AlreadyBound
        } else {
            ExchangeOutcome::Used
        });
    }
    // Refusals below write nothing: the code stays usable.
    if setting(conn, Setting::MasterCheck)?.as_deref() != Some(ex.master_check.as_str()) {
        return Ok(ExchangeOutcome::MasterKeyChanged);
    }
    let fresh_version = |key: &WrappedKey| -> StorageResult<bool> {
        Ok(super::keyring::latest_version(conn, &key.kind)? + 1 == key.version)
    };
    match &ex.install {
        ExchangeInstall::NewHmac { key, .. } | ExchangeInstall::Ed25519 { key, .. }
            if !fresh_version(key)? =>
        {
            return Ok(ExchangeOutcome::KeyRingChanged);
        }
        _ => {}
    }
    if !use_code()? {
        return Ok(ExchangeOutcome::Used);
    }
    match &ex.install {
        ExchangeInstall::KeepHmac => {
            conn.execute("DELETE FROM platform_keys", [])?;
            put_setting(conn, Setting::PlatformScheme, "hmac")?;
        }
        ExchangeInstall::NewHmac { key, hash } => {
            conn.execute("DELETE FROM platform_keys", [])?;
            put_setting(conn, Setting::PlatformScheme, "hmac")?;
            install_hmac(conn, key, hash)?;
            conn.execute(
                "UPDATE bind_codes SET pending_secret = NULL WHERE code_hash = ?1",
                [&ex.code_hash],
            )?;
        }
        ExchangeInstall::Ed25519 {
            platform_key,
            key,
            hash,
        } => {
            install_hmac(conn, key, hash)?;
            conn.execute("DELETE FROM platform_keys", [])?;
            insert_platform_key(conn, platform_key)?;
            put_setting(conn, Setting::PlatformScheme, "ed25519")?;
        }
    }
    put_setting(conn, Setting::Bound, "true")?;
    put_setting(conn, Setting::BoundAt, &ex.now.to_string())?;
    Ok(ExchangeOutcome::Exchanged)
}

#[async_trait]
impl Binding for SqliteStorage {
    async fn insert_bind_code(
        &self,
        code: BindCode,
        forget_before: i64,
        public_url: &str,
        frontend_url: &str,
    ) -> StorageResult<()> {
        let (public_url, frontend_url) = (public_url.to_string(), frontend_url.to_string());
        self.db
            .write(move |conn| {
                conn.execute(
                    "INSERT INTO bind_codes(code_hash, created_at, expires_at, used_at, rebind,
                                            hmac_hash, pending_secret, platform_key)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                    params![
                        code.code_hash,
                        code.created_at,
                        code.expires_at,
                        code.used_at,
                        code.rebind,
                        code.hmac_hash,
                        code.pending_secret,
                        code.platform_key
                    ],
                )?;
                // Forget long-dead codes so the table stays small.
                conn.execute(
                    "DELETE FROM bind_codes WHERE expires_at < ?1",
                    [forget_before],
                )?;
                put_setting(conn, Setting::PublicUrl, &public_url)?;
                put_setting(conn, Setting::FrontendUrl, &frontend_url)?;
                Ok(())
            })
            .await
    }

    async fn bind_code(&self, code_hash: &str) -> StorageResult<Option<BindCode>> {
        let code_hash = code_hash.to_string();
        self.db.read(move |conn| code(conn, &code_hash)).await
    }

    async fn exchange(&self, ex: Exchange) -> StorageResult<ExchangeOutcome> {
        self.db.write(move |conn| exchange(conn, &ex)).await
    }

    async fn pending_secrets(&self) -> StorageResult<Vec<(String, Vec<u8>)>> {
        self.db
            .read(|conn| {
                let mut stmt = conn.prepare(
                    "SELECT code_hash, pending_secret FROM bind_codes
                     WHERE pending_secret IS NOT NULL",
                )?;
                let rows = stmt
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(rows)
            })
            .await
    }

    async fn platform_keys(&self) -> StorageResult<Vec<StoredPlatformKey>> {
        self.db.read(platform_keys).await
    }
}
