//! Change sets: checks, writes, audit entries and the generation bump in one write job (one
//! savepoint in the group commit, so all or none).

use async_trait::async_trait;
use rusqlite::{params, Connection};

use super::{bump_generation, setting, SqliteStorage};
use crate::storage::{Applied, ChangeSet, ChangeSets, Check, StorageResult, Write};

fn check(conn: &Connection, check: &Check) -> StorageResult<bool> {
    Ok(match check {
        Check::SettingIs(which, value) => setting(conn, *which)? == *value,
        Check::DocumentAbsent(collection, key) => {
            super::documents::get(conn, *collection, key)?.is_none()
        }
        Check::DocumentIs(collection, key, text) => {
            super::documents::get(conn, *collection, key)?.as_deref() == Some(text.as_str())
        }
        Check::LatestKeyVersion(kind, version) => {
            super::keyring::latest_version(conn, kind)? == *version
        }
        Check::PolicyExists(name, exists) => {
            let found: bool = conn.query_row(
                "SELECT EXISTS(SELECT 1 FROM policies WHERE name = ?1)",
                [name],
                |r| r.get(0),
            )?;
            found == *exists
        }
        Check::AttachmentIs(policy, kind, target, exists) => {
            let found: bool = conn.query_row(
                "SELECT EXISTS(SELECT 1 FROM policy_attachments
                               WHERE policy = ?1 AND kind = ?2 AND target = ?3)",
                params![policy, kind, target],
                |r| r.get(0),
            )?;
            found == *exists
        }
        Check::PlatformKeysAre(ids) => {
            let mut stored: Vec<String> = super::binding::platform_keys(conn)?
                .into_iter()
                .map(|k| k.key_id)
                .collect();
            let mut wanted = ids.clone();
            stored.sort();
            wanted.sort();
            stored == wanted
        }
        Check::ApprovalPending(id, now) => super::policies::is_pending(conn, id, *now)?,
    })
}

/// Applies one write; whether it changed a row.
fn write(conn: &Connection, write: &Write) -> StorageResult<bool> {
    let n = match write {
        Write::PutSetting(which, value) => {
            super::put_setting(conn, *which, value)?;
            1
        }
        Write::DeleteSetting(which) => {
            conn.execute("DELETE FROM settings WHERE name = ?1", [which.name()])?
        }
        Write::PutDocument {
            collection,
            key,
            doc,
            now,
        } => {
            super::documents::put(conn, *collection, key, doc, *now)?;
            1
        }
        Write::RewriteDocument(collection, key, doc) => conn.execute(
            "UPDATE documents SET doc = ?3 WHERE collection = ?1 AND key = ?2",
            params![collection.as_str(), key, doc],
        )?,
        Write::DeleteDocument(collection, key) => super::documents::delete(conn, *collection, key)?,
        Write::MarkLegacyMinting(service) => conn.execute(
            "INSERT INTO legacy_minting (service) VALUES (?1) ON CONFLICT(service) DO NOTHING",
            [service],
        )?,
        Write::ClearLegacyMinting(service) => {
            conn.execute("DELETE FROM legacy_minting WHERE service = ?1", [service])?
        }
        Write::PutKey(key) => {
            super::keyring::put_key(conn, key)?;
            1
        }
        Write::DeleteKey(kind, version) => conn.execute(
            "DELETE FROM keyring WHERE kind = ?1 AND version = ?2",
            params![kind, version],
        )?,
        Write::DeleteKeysBelow(kind, version) => conn.execute(
            "DELETE FROM keyring WHERE kind = ?1 AND version < ?2",
            params![kind, version],
        )?,
        Write::DeleteKeysOfKind(kind) => {
            conn.execute("DELETE FROM keyring WHERE kind = ?1", [kind])?
        }
        Write::RecordImportedField(field) => conn.execute(
            "INSERT OR IGNORE INTO imported_v1_fields(digest, service, field) VALUES (?1, ?2, ?3)",
            params![field.digest.as_slice(), field.service, field.field],
        )?,
        Write::ClearImportedFields => conn.execute("DELETE FROM imported_v1_fields", [])?,
        Write::PutPendingSecret(hash, wrapped) => conn.execute(
            "UPDATE bind_codes SET pending_secret = ?1 WHERE code_hash = ?2",
            params![wrapped, hash],
        )?,
        Write::DeleteBindCodes => conn.execute("DELETE FROM bind_codes", [])?,
        Write::AddPlatformKey(key) => {
            super::binding::insert_platform_key(conn, key)?;
            1
        }
        Write::RemovePlatformKey(key_id) => {
            conn.execute("DELETE FROM platform_keys WHERE key_id = ?1", [key_id])?
        }
        Write::PutOAuthClient(row) => conn.execute(
            "INSERT INTO oauth_providers(name, token_url, client_id, wrapped_secret, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(name) DO UPDATE SET token_url = excluded.token_url,
               client_id = excluded.client_id, wrapped_secret = excluded.wrapped_secret,
               updated_at = excluded.updated_at",
            params![
                row.name,
                row.token_url,
                row.client_id,
                row.wrapped_secret,
                row.updated_at
            ],
        )?,
        Write::RemoveOAuthClient(name) => {
            conn.execute("DELETE FROM oauth_providers WHERE name = ?1", [name])?
        }
        Write::PutSignConfig(service, config, now) => {
            super::sign_configs::put(conn, service, config, *now)?
        }
        Write::DeleteSignConfig(service) => super::sign_configs::delete(conn, service)?,
        Write::PutEgressPolicy(row, now) => {
            super::egress::put_policy(conn, row, *now)?;
            1
        }
        Write::DeleteEgressPolicy(service) => {
            conn.execute("DELETE FROM egress_policies WHERE service = ?1", [service])?
        }
        Write::DeleteEgressPins(service) => {
            conn.execute("DELETE FROM egress_pins WHERE service = ?1", [service])?
        }
        Write::DeleteRefusal(service, origin) => conn.execute(
            "DELETE FROM egress_refusals WHERE service = ?1 AND origin = ?2",
            params![service, origin],
        )?,
        Write::PutPolicy(row, now) => conn.execute(
            "INSERT INTO policies (name, rules, source, updated_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(name) DO UPDATE SET rules = ?2, source = ?3, updated_at = ?4",
            params![row.name, row.rules, row.source, now],
        )?,
        Write::DeletePolicy(name) => {
            let n = conn.execute("DELETE FROM policies WHERE name = ?1", [name])?;
            conn.execute("DELETE FROM policy_attachments WHERE policy = ?1", [name])?;
            conn.execute("DELETE FROM policy_usage WHERE policy = ?1", [name])?;
            n
        }
        Write::Attach(row) => conn.execute(
            "INSERT OR IGNORE INTO policy_attachments (policy, kind, target, source)
             VALUES (?1, ?2, ?3, ?4)",
            params![row.policy, row.kind, row.target, row.source],
        )?,
        Write::ReplaceAttachment(row) => conn.execute(
            "INSERT OR REPLACE INTO policy_attachments (policy, kind, target, source)
             VALUES (?1, ?2, ?3, ?4)",
            params![row.policy, row.kind, row.target, row.source],
        )?,
        Write::Detach(policy, kind, target) => conn.execute(
            "DELETE FROM policy_attachments WHERE policy = ?1 AND kind = ?2 AND target = ?3",
            params![policy, kind, target],
        )?,
        Write::DeleteAttachmentsOf(source) => {
            conn.execute("DELETE FROM policy_attachments WHERE source = ?1", [source])?
        }
        Write::DecideApproval { id, approve, now } => {
            usize::from(super::policies::decide(conn, id, *approve, *now)?)
        }
    };
    Ok(n > 0)
}

/// Applies a change set inside the caller's transaction (a failed check writes nothing).
pub(super) fn apply(conn: &Connection, changes: &ChangeSet) -> StorageResult<Applied> {
    for (i, c) in changes.checks.iter().enumerate() {
        if !check(conn, c)? {
            return Ok(Applied::CheckFailed(i));
        }
    }
    let changed = changes
        .writes
        .iter()
        .map(|w| write(conn, w))
        .collect::<StorageResult<Vec<bool>>>()?;
    if let Some((events, signer)) = &changes.audit {
        super::audit::append_events(conn, signer.as_ref(), events.iter().cloned())?;
    }
    if changes.bump_generation {
        bump_generation(conn)?;
    }
    Ok(Applied::Done { changed })
}

#[async_trait]
impl ChangeSets for SqliteStorage {
    async fn apply(&self, changes: ChangeSet) -> StorageResult<Applied> {
        self.db.write(move |conn| apply(conn, &changes)).await
    }
}
