//! The adapters the server knows, by name: where each is, what it is, and an LRU of the loaded
//! ones (`--max-adapters`); an adapter pushed out of the LRU is loaded again from its path when
//! next asked for.

use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use adapterkit::adapter_set::{AdapterInfo, AdapterSet, ServedAdapter};
use lru::LruCache;

pub struct Registry {
    pub set: Arc<AdapterSet>,
    /// `--adapter-dir`, canonical: the only place `PUT` may load from.
    pub adapter_dir: Option<PathBuf>,
    inner: Mutex<Inner>,
}

struct Inner {
    known: BTreeMap<String, AdapterInfo>,
    loaded: LruCache<String, Arc<ServedAdapter>>,
}

/// Why an adapter could not be had.
pub enum Missing {
    Unknown,
    /// Known, but loading it again failed (its files changed or went away).
    Failed(String),
}

impl Registry {
    /// `capacity`: adapters kept loaded at most (`None`: all).
    pub fn new(
        set: Arc<AdapterSet>,
        adapter_dir: Option<PathBuf>,
        capacity: Option<usize>,
    ) -> Self {
        let loaded = match capacity.and_then(NonZeroUsize::new) {
            Some(n) => LruCache::new(n),
            None => LruCache::unbounded(),
        };
        Self {
            set,
            adapter_dir,
            inner: Mutex::new(Inner {
                known: BTreeMap::new(),
                loaded,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere cannot leave the maps half-changed: every change is one call.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Loads `dir` as `name` (replacing an adapter of that name) and returns what it is.
    pub fn load(&self, name: &str, dir: &Path) -> adapterkit::Result<AdapterInfo> {
        let served = self.set.load_adapter(name, dir)?;
        let info = served.info.clone();
        let mut inner = self.lock();
        inner.known.insert(name.into(), info.clone());
        inner.loaded.put(name.into(), Arc::new(served));
        Ok(info)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.lock().known.contains_key(name)
    }

    pub fn info(&self, name: &str) -> Option<AdapterInfo> {
        self.lock().known.get(name).cloned()
    }

    /// The adapter `name`, loaded again from its path if the LRU had let it go.
    pub fn get(&self, name: &str) -> Result<Arc<ServedAdapter>, Missing> {
        let path = {
            let mut inner = self.lock();
            if let Some(served) = inner.loaded.get(name) {
                return Ok(served.clone());
            }
            inner.known.get(name).ok_or(Missing::Unknown)?.path.clone()
        };
        let served = self
            .set
            .load_adapter(name, &path)
            .map_err(|e| Missing::Failed(e.to_string()))?;
        let served = Arc::new(served);
        let mut inner = self.lock();
        // Deleted or replaced meanwhile: the request still gets what it asked for.
        if inner.known.get(name).is_some_and(|i| i.path == path) {
            inner.loaded.put(name.into(), served.clone());
        }
        Ok(served)
    }

    pub fn remove(&self, name: &str) -> bool {
        let mut inner = self.lock();
        inner.loaded.pop(name);
        inner.known.remove(name).is_some()
    }

    /// Every known adapter, and whether it is loaded now.
    pub fn list(&self) -> Vec<(AdapterInfo, bool)> {
        let inner = self.lock();
        (inner.known.values())
            .map(|i| (i.clone(), inner.loaded.contains(&i.name)))
            .collect()
    }

    pub fn loaded_count(&self) -> usize {
        self.lock().loaded.len()
    }
}
