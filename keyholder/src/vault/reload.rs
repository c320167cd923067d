//! How a running server follows the owner's commands without a restart. Every command that
//! changes keys, binding or the seal bumps the `owner_generation` setting in its transaction; the
//! server polls that one value (a primary-key lookup every 250 ms) and, when it moves, reloads the
//! key ring, the binding and the sealed flag from the database.
//!
//! After `rotate-master-key` the ring on disk is wrapped by a key the server does not hold. The
//! server then keeps serving with the keys already unwrapped in memory (it never needs the master key
//! per request) and re-reads its configured master key source whenever that file changes: once the
//! owner puts the new key (or passphrase) where the server was told to look, it switches over. Until
//! then it cannot pick up further key changes, and it never wraps anything with the old key (every
//! server-side wrap first checks the master key against the database in the same transaction).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::collections::StorageService;
use super::egress::EgressService;
use super::key_handle::KeyHandle;
use super::keyring::{self, KeyRing};
use super::master::{self, MasterKey, MasterKeySource, DEFAULT_MASTER_KEY_FILE};
use super::platform_keys::{self, PlatformScheme};
use super::signing::SigningService;
use super::{BindingState, VaultError};
use crate::policy::PolicyEngine;
use crate::storage::{ChangeSet, KeyRingSnapshot, Setting, SharedStorage, Write};
use keyholder_protocol::{HmacSecret, PlatformPublicKey};

/// What the server last saw on disk.
pub struct FollowState {
    generation: u64,
    master_stale: bool,
    tried_source: Option<[u8; 32]>,
}

impl FollowState {
    /// State right after start.
    pub fn new(generation: u64) -> FollowState {
        FollowState {
            generation,
            master_stale: false,
            tried_source: None,
        }
    }
}

/// The owner generation a snapshot was taken at.
pub fn owner_generation(snapshot: &KeyRingSnapshot) -> u64 {
    snapshot
        .setting(Setting::OwnerGeneration)
        .and_then(|g| g.parse().ok())
        .unwrap_or(0)
}

/// Whether the keyholder is sealed.
pub fn read_sealed(snapshot: &KeyRingSnapshot) -> bool {
    snapshot.setting(Setting::Sealed) == Some("true")
}

/// The owner change that seals or unseals.
pub fn write_sealed(sealed: bool) -> ChangeSet {
    ChangeSet::owner().write(Write::PutSetting(
        Setting::Sealed,
        if sealed { "true" } else { "false" }.into(),
    ))
}

fn source_path(data_dir: &Path, source: &MasterKeySource) -> Option<PathBuf> {
    match source {
        MasterKeySource::File(p) | MasterKeySource::Passphrase(p) => Some(p.clone()),
        MasterKeySource::DataFolder => Some(data_dir.join(DEFAULT_MASTER_KEY_FILE)),
        // The token is asked once, at start: a running server keeps the keys it holds.
        MasterKeySource::Pkcs11(_) => None,
    }
}

/// SHA-256 of the master key source file, to retry a changed source only once per change.
fn source_fingerprint(data_dir: &Path, source: &MasterKeySource) -> Option<[u8; 32]> {
    let bytes = zeroize::Zeroizing::new(std::fs::read(source_path(data_dir, source)?).ok()?);
    Some(Sha256::digest(bytes.as_slice()).into())
}

struct Reloaded {
    generation: u64,
    sealed: bool,
    bound: bool,
    platform: (PlatformScheme, Vec<PlatformPublicKey>),
    keys: Option<(KeyRing, keyholder_protocol::HmacSecret, String)>,
    new_master: Option<MasterKey>,
    master_stale: bool,
}

/// Follows the owner's changes on disk: reloads the key ring handle and drops what the caches hold.
pub struct ReloadService {
    storage: SharedStorage,
    keys: Arc<KeyHandle>,
    documents: Arc<StorageService>,
    egress: Arc<EgressService>,
    signing: Arc<SigningService>,
    policy: Arc<PolicyEngine>,
    /// Where the master key came from (re-read after an owner's master key rotation).
    data_dir: PathBuf,
    source: MasterKeySource,
    /// State of following the owner's changes on disk.
    follow: Mutex<FollowState>,
    /// When a request last made this replica catch up at once ([`ReloadService::catch_up`]).
    last_catch_up: tokio::sync::Mutex<Option<Instant>>,
}

/// How often refused requests may make a replica read the owner generation at once.
const CATCH_UP_INTERVAL: Duration = Duration::from_millis(100);

impl ReloadService {
    /// The service over what it reloads; `generation` is the one the key handle was opened at.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        storage: SharedStorage,
        keys: Arc<KeyHandle>,
        documents: Arc<StorageService>,
        egress: Arc<EgressService>,
        signing: Arc<SigningService>,
        policy: Arc<PolicyEngine>,
        data_dir: &Path,
        source: &MasterKeySource,
        generation: u64,
    ) -> ReloadService {
        ReloadService {
            storage,
            keys,
            documents,
            egress,
            signing,
            policy,
            data_dir: data_dir.to_path_buf(),
            source: source.clone(),
            follow: Mutex::new(FollowState::new(generation)),
            last_catch_up: tokio::sync::Mutex::new(None),
        }
    }

    fn storage(&self) -> &SharedStorage {
        &self.storage
    }

    /// Polled by the server: picks up the owner's changes when the generation moved (or, while the
    /// master key is stale, when its source file changed). Returns whether anything was reloaded.
    pub async fn follow_owner_changes(&self) -> Result<bool, VaultError> {
        let generation = self.storage().owner_generation().await?;
        let retry_master = {
            let follow = self
                .follow
                .lock()
                .map_err(|_| VaultError::Corrupt("follow lock".into()))?;
            if follow.generation == generation {
                if !follow.master_stale {
                    return Ok(false);
                }
                let now = source_fingerprint(&self.data_dir, &self.source);
                if now.is_none() || now == follow.tried_source {
                    return Ok(false);
                }
            }
            true
        };
        self.reload_from_disk(retry_master).await?;
        Ok(true)
    }

    /// Follows the owner's changes now rather than at the next notice or poll, for a request that
    /// the binding in memory refuses (not bound, or a platform signature that does not verify):
    /// on a shared database another replica may have bound or rebound a moment ago, and the
    /// platform's next call can reach this one before its notice does. Returns whether the caller
    /// should check again (this call or another one since it arrived caught up). At most one
    /// read per 100 ms, so that forged requests cannot turn into a query each.
    pub async fn catch_up(&self) -> bool {
        let arrived = Instant::now();
        let mut last = self.last_catch_up.lock().await;
        if let Some(at) = *last {
            if at >= arrived {
                return true;
            }
            if arrived.duration_since(at) < CATCH_UP_INTERVAL {
                return false;
            }
        }
        *last = Some(Instant::now());
        // Checked again whatever this finds: the regular follower may have reloaded meanwhile.
        if let Err(e) = self.follow_owner_changes().await {
            tracing::warn!(error = %e, "could not catch up with the owner's changes");
        }
        true
    }

    /// Reloads the sealed flag, the binding and the key ring from the database.
    pub async fn reload_from_disk(&self, try_master_source: bool) -> Result<(), VaultError> {
        let master = self.keys.master();
        let data_dir = self.data_dir.clone();
        let source = self.source.clone();
        let fingerprint = source_fingerprint(&data_dir, &source);
        let snapshot = self.storage().key_ring_snapshot().await?;
        // The generation of the same snapshot: a change committed after it is picked up next time.
        let generation = owner_generation(&snapshot);
        let reloaded = {
            let sealed = read_sealed(&snapshot);
            let bound = snapshot.is_bound();
            let platform = platform_keys::load(&snapshot)?;
            let stored_check = snapshot.setting(Setting::MasterCheck);
            if master.check(stored_check).is_ok() {
                Reloaded {
                    generation,
                    sealed,
                    bound,
                    platform,
                    keys: Some(keyring::load(&snapshot, &master)?),
                    new_master: None,
                    master_stale: false,
                }
            } else {
                // The owner rotated the master key: try the configured source again.
                let candidate = try_master_source
                    .then(|| master::load_master_key(&data_dir, &source, &snapshot).ok())
                    .flatten()
                    .map(|loaded| loaded.key)
                    .filter(|candidate| candidate.check(stored_check).is_ok());
                match candidate {
                    Some(candidate) => Reloaded {
                        generation,
                        sealed,
                        bound,
                        platform,
                        keys: Some(keyring::load(&snapshot, &candidate)?),
                        new_master: Some(candidate),
                        master_stale: false,
                    },
                    None => Reloaded {
                        generation,
                        sealed,
                        bound,
                        platform,
                        keys: None,
                        new_master: None,
                        master_stale: true,
                    },
                }
            }
        };
        // Policies first (list items name them; the cache is cleared after), and before the seal:
        // a change is in force by the time it is reported picked up.
        self.policy.reload(self.storage().as_ref()).await?;
        // Documents may have changed under us (rewrap, import): read them afresh.
        self.documents.documents().forget_all();
        self.egress.clear_cache();
        self.signing.clear_cache();
        // The seal applies whatever happens to the keys.
        self.keys.set_sealed(reloaded.sealed);
        if let Some(new_master) = reloaded.new_master {
            tracing::info!("picked up the rotated master key from its configured source");
            self.keys.set_master(new_master);
        }
        let (scheme, platform_keys) = reloaded.platform;
        if let Some((ring, hmac, webhook_id)) = reloaded.keys {
            self.keys.set_keys(ring);
            self.keys.set_binding(BindingState {
                bound: reloaded.bound,
                webhook_id,
                hmac,
                scheme,
                platform_keys,
            });
        } else {
            // The platform's public keys need no master key: follow them even while it is stale.
            let current = self.keys.binding();
            self.keys.set_binding(BindingState {
                bound: reloaded.bound,
                webhook_id: current.webhook_id.clone(),
                hmac: HmacSecret::from_bytes(*current.hmac.expose()),
                scheme,
                platform_keys,
            });
        }
        let mut follow = self
            .follow
            .lock()
            .map_err(|_| VaultError::Corrupt("follow lock".into()))?;
        if reloaded.master_stale && !follow.master_stale {
            tracing::warn!(
                "the master key was rotated by the owner: serving on with the keys in memory; put the new key \
                 (or passphrase) where this server reads it ({}) or restart it with the new one to pick up \
                 further key changes",
                source_path(&self.data_dir, &self.source)
                    .map_or_else(|| "the PKCS#11 token".to_string(), |p| p.display().to_string())
            );
        }
        follow.master_stale = reloaded.master_stale;
        follow.tried_source = if reloaded.master_stale {
            fingerprint
        } else {
            None
        };
        follow.generation = reloaded.generation;
        Ok(())
    }
}
