//! Models and data sets that earlier jobs of this process loaded, kept for the next job that
//! asks for the same one.
//!
//! Why: a sweep of many short certify jobs spent more time loading the same test set and
//! weights again than certifying. Each entry is keyed by what identifies its contents — the job
//! parameters that name it (a weights file or a data split by its SHA-256, a trained model by its
//! training job's content-addressed id), and for a model its precision and device — so a hit is
//! what a fresh load would give. Jobs only read them (the fused paths' scratch space is
//! thread-local), so concurrent jobs share one.

use std::sync::{Arc, Mutex};

use super::certify_job::set_precision;
use super::common::DataRef;
use super::source::ModelSource;
use crate::data::Images;
use crate::models::{Classifier, Precision};
use crate::sched::{DeviceSpec, JobError};

/// What a worker keeps loaded between jobs.
pub struct Loaded {
    pub models: LoadCache<dyn Classifier>,
    pub data: LoadCache<dyn Images>,
}

impl Loaded {
    /// Keeps up to `models` models and `data` data sets.
    pub fn new(models: usize, data: usize) -> Self {
        Self {
            models: LoadCache::new(models),
            data: LoadCache::new(data),
        }
    }

    /// The model `source` names, in `precision` on `device`; `load` builds it (in f32) only
    /// when no earlier job did.
    pub fn model(
        &self,
        source: &ModelSource,
        precision: Precision,
        spec: DeviceSpec,
        device: &candle_core::Device,
        load: impl FnOnce() -> Result<Box<dyn Classifier>, JobError>,
    ) -> Result<Arc<dyn Classifier>, JobError> {
        let key = model_key(source, precision.as_str(), &spec.to_string());
        self.models.get_or_load(&key, || {
            let mut model = load()?;
            set_precision(model.as_mut(), precision, device)?;
            Ok(Arc::from(model))
        })
    }

    /// The data split `data` names, opened (see [`DataRef::open`]) only when no earlier job did.
    pub fn data(&self, data: &DataRef) -> Result<Arc<dyn Images>, JobError> {
        self.data
            .get_or_load(&data_key(data), || data.open().map(Arc::from))
    }
}

/// A small least-recently-used set of loaded things.
pub struct LoadCache<T: ?Sized> {
    capacity: usize,
    /// Oldest first.
    entries: Mutex<Vec<(String, Arc<T>)>>,
}

impl<T: ?Sized> LoadCache<T> {
    /// Keeps at most `capacity` models (0 keeps none).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            entries: Mutex::new(Vec::new()),
        }
    }

    /// The model under `key`, loading it with `load` on a miss. The lock is not held while
    /// loading: two jobs missing at once both load, and the second insert replaces the first.
    pub fn get_or_load(
        &self,
        key: &str,
        load: impl FnOnce() -> Result<Arc<T>, JobError>,
    ) -> Result<Arc<T>, JobError> {
        if let Some(hit) = self.take_hit(key) {
            return Ok(hit);
        }
        let model = load()?;
        if self.capacity > 0 {
            let mut entries = self.lock();
            entries.retain(|(k, _)| k != key);
            entries.push((key.to_string(), model.clone()));
            let excess = entries.len().saturating_sub(self.capacity);
            entries.drain(..excess);
        }
        Ok(model)
    }

    fn take_hit(&self, key: &str) -> Option<Arc<T>> {
        let mut entries = self.lock();
        let at = entries.iter().position(|(k, _)| k == key)?;
        // Most recently used goes last.
        let entry = entries.remove(at);
        let model = entry.1.clone();
        entries.push(entry);
        Some(model)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(String, Arc<T>)>> {
        // The vector stays consistent even if a holder panicked: every change is one call.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many are kept now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The cache key of a data split: the canonical JSON of what names it (its content hash
/// included).
fn data_key(data: &impl serde::Serialize) -> String {
    crate::util::canonical_json(&serde_json::to_value(data).unwrap_or_default())
}

/// The cache key of a model: the canonical JSON of what names it, with its precision and device.
fn model_key(source: &impl serde::Serialize, precision: &str, device: &str) -> String {
    let source = serde_json::to_value(source).unwrap_or_default();
    crate::util::canonical_json(&serde_json::json!({
        "source": source,
        "precision": precision,
        "device": device,
    }))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::models::{LinearClassifier, Normalize};

    fn linear() -> Arc<dyn Classifier> {
        let vm = candle_nn::VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(
            &vm,
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        );
        Arc::new(LinearClassifier::new(2, Normalize::IDENTITY, vb).expect("linear"))
    }

    #[test]
    fn a_hit_skips_the_load_and_the_oldest_model_goes_first() {
        let cache: LoadCache<dyn Classifier> = LoadCache::new(2);
        let loads = AtomicUsize::new(0);
        let load = || {
            loads.fetch_add(1, Ordering::SeqCst);
            Ok(linear())
        };
        let a1 = cache.get_or_load("a", load).expect("a");
        let a2 = cache.get_or_load("a", load).expect("a again");
        assert!(Arc::ptr_eq(&a1, &a2), "the same model is shared");
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        cache.get_or_load("b", load).expect("b");
        // "a" was used after "b" was not: touching "a" makes "b" the oldest.
        cache.get_or_load("a", load).expect("a touched");
        cache.get_or_load("c", load).expect("c");
        assert_eq!(cache.len(), 2);
        assert_eq!(loads.load(Ordering::SeqCst), 3);
        cache.get_or_load("a", load).expect("a kept");
        assert_eq!(loads.load(Ordering::SeqCst), 3, "a stayed");
        cache.get_or_load("b", load).expect("b evicted");
        assert_eq!(loads.load(Ordering::SeqCst), 4, "b had been evicted");
    }

    #[test]
    fn a_failed_load_is_not_cached_and_keys_separate_precision_and_device() {
        let cache: LoadCache<dyn Classifier> = LoadCache::new(4);
        let err = cache.get_or_load("x", || Err(JobError::fatal("no such file")));
        assert!(err.is_err());
        assert!(cache.is_empty());
        let src = serde_json::json!({ "weights_sha256": "ab" });
        assert_ne!(
            model_key(&src, "f32", "cpu"),
            model_key(&src, "bf16", "cpu")
        );
        assert_ne!(
            model_key(&src, "f32", "cpu"),
            model_key(&src, "f32", "cuda:0")
        );
        assert_eq!(
            model_key(&src, "f32", "cpu"),
            model_key(&src.clone(), "f32", "cpu")
        );
    }
}
