//! Work split over threads: candle's persistent worker pool, which its own CPU kernels use.
//!
//! Spawning threads per op cost tens of microseconds a call, and the pool's idle worker spins
//! for a while after each of candle's ops, so a freshly spawned thread had to share a core with
//! it; running our kernels on the same pool avoids both.

use std::sync::Mutex;

/// How many threads work on an op: candle's count (`RAYON_NUM_THREADS`, else the physical
/// cores), read once. candle reads it anew on every call, at a cost that showed in profiles.
pub(crate) fn threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(candle_core::utils::get_num_threads)
}

/// `f(i, item)` for every item, in parallel over candle's worker pool (the calling thread
/// takes part); inline for a single item or a single thread. The results come back in order.
pub(crate) fn map_parallel<T: Send, R: Send>(
    items: Vec<T>,
    f: impl Fn(usize, T) -> R + Sync,
) -> Vec<R> {
    if items.len() <= 1 || threads() <= 1 {
        return items
            .into_iter()
            .enumerate()
            .map(|(i, t)| f(i, t))
            .collect();
    }
    let slots: Vec<Mutex<(Option<T>, Option<R>)>> = items
        .into_iter()
        .map(|t| Mutex::new((Some(t), None)))
        .collect();
    // Each slot is taken by exactly one task, so the locks are never contended.
    let lock = |i: usize| slots[i].lock().unwrap_or_else(|e| e.into_inner());
    candle_core::utils::barrier_pool().execute_chunked(slots.len(), |range| {
        for i in range {
            let item = lock(i).0.take();
            if let Some(item) = item {
                let result = f(i, item);
                lock(i).1 = Some(result);
            }
        }
    });
    slots
        .into_iter()
        .filter_map(|slot| slot.into_inner().unwrap_or_else(|e| e.into_inner()).1)
        .collect()
}
