//! The key ring handle: the master key, key ring, binding and seal in force, swapped whole when the
//! owner's changes are picked up ([`super::reload::ReloadService`]). Every service that decrypts,
//! signs or checks the binding holds one `Arc<KeyHandle>`; a request reads it by reference.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use super::keyring::{self, KeyRing};
use super::master::{self, MasterKey, MasterKeySource};
use super::{platform_keys, reload, BindingState, OpenReport, VaultError, VaultSettings};
use crate::storage::Storage;

/// The keys and binding in force, shared by all workers.
pub struct KeyHandle {
    master: RwLock<Arc<MasterKey>>,
    keys: RwLock<Arc<KeyRing>>,
    binding: RwLock<Arc<BindingState>>,
    /// The kill switch, kept fresh from the database by [`super::reload::ReloadService`].
    sealed: AtomicBool,
    settings: VaultSettings,
    started: std::time::Instant,
}

/// What [`KeyHandle::open`] read besides the keys: where the owner's changes stood.
pub struct Opened {
    /// The key ring handle.
    pub keys: KeyHandle,
    /// What opening found, for the start-up log.
    pub report: OpenReport,
    /// The owner generation of the snapshot the handle was loaded from.
    pub generation: u64,
}

impl KeyHandle {
    /// Loads (creating on first start) the master key and key ring from `storage`.
    pub async fn open(
        storage: &dyn Storage,
        data_dir: &Path,
        source: &MasterKeySource,
        settings: VaultSettings,
    ) -> Result<Opened, VaultError> {
        let (master, created_master_file) =
            master::open_master_key(storage, data_dir, source).await?;
        let loaded = keyring::init_or_load(storage, &master).await?;
        let snapshot = storage.key_ring_snapshot().await?;
        let bound = snapshot.is_bound();
        let sealed = reload::read_sealed(&snapshot);
        let generation = reload::owner_generation(&snapshot);
        let (scheme, platform_keys) = platform_keys::load(&snapshot)?;
        let report = OpenReport {
            created_keys: loaded.created,
            created_master_file,
        };
        let keys = KeyHandle {
            master: RwLock::new(Arc::new(master)),
            keys: RwLock::new(Arc::new(loaded.ring)),
            binding: RwLock::new(Arc::new(BindingState {
                bound,
                webhook_id: loaded.webhook_id,
                hmac: loaded.hmac,
                scheme,
                platform_keys,
            })),
            sealed: AtomicBool::new(sealed),
            settings,
            started: std::time::Instant::now(),
        };
        Ok(Opened {
            keys,
            report,
            generation,
        })
    }

    /// The key ring in force.
    pub fn keys(&self) -> Arc<KeyRing> {
        match self.keys.read() {
            Ok(guard) => Arc::clone(&guard),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// The binding in force.
    pub fn binding(&self) -> Arc<BindingState> {
        match self.binding.read() {
            Ok(guard) => Arc::clone(&guard),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// The master key in force (it changes when the owner rotates it and the server picks it up).
    pub fn master(&self) -> Arc<MasterKey> {
        match self.master.read() {
            Ok(guard) => Arc::clone(&guard),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    pub(super) fn set_master(&self, master: MasterKey) {
        let next = Arc::new(master);
        match self.master.write() {
            Ok(mut guard) => *guard = next,
            Err(poisoned) => *poisoned.into_inner() = next,
        }
    }

    pub(super) fn set_keys(&self, ring: KeyRing) {
        let next = Arc::new(ring);
        match self.keys.write() {
            Ok(mut guard) => *guard = next,
            Err(poisoned) => *poisoned.into_inner() = next,
        }
    }

    pub(super) fn set_binding(&self, state: BindingState) {
        let next = Arc::new(state);
        match self.binding.write() {
            Ok(mut guard) => *guard = next,
            Err(poisoned) => *poisoned.into_inner() = next,
        }
    }

    pub(super) fn set_sealed(&self, sealed: bool) {
        self.sealed.store(sealed, Ordering::Release);
    }

    /// Whether the owner has sealed the keyholder (one atomic load: cheap on every request).
    pub fn is_sealed(&self) -> bool {
        self.sealed.load(Ordering::Acquire)
    }

    /// Refuses with [`VaultError::Sealed`] while sealed. Every endpoint that decrypts or stores a
    /// credential calls this before doing anything else (proxy and refresh endpoints included).
    pub fn ensure_unsealed(&self) -> Result<(), VaultError> {
        if self.is_sealed() {
            Err(VaultError::Sealed)
        } else {
            Ok(())
        }
    }

    /// Domain settings.
    pub fn settings(&self) -> &VaultSettings {
        &self.settings
    }

    /// Seconds since the keys were opened.
    pub fn uptime_secs(&self) -> u64 {
        self.started.elapsed().as_secs()
    }
}
