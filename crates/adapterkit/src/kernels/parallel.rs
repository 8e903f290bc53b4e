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

/// Element blocks for `par_rows` over element-wise work, which has no rows of its own.
pub(crate) const ROW: usize = 4096;

/// Runs `f(first_row, rows_of_out)` on consecutive blocks of whole rows of `out` (rows of
/// `row_len`), one block per thread (candle's thread count), and returns each block's result.
pub(crate) fn par_rows<T: Send, R: Send>(
    out: &mut [T],
    row_len: usize,
    f: impl Fn(usize, &mut [T]) -> R + Sync,
) -> Vec<R> {
    par_rows_over(threads(), out, row_len, f)
}

/// [`par_rows`] over at most `threads` threads.
pub(crate) fn par_rows_over<T: Send, R: Send>(
    threads: usize,
    out: &mut [T],
    row_len: usize,
    f: impl Fn(usize, &mut [T]) -> R + Sync,
) -> Vec<R> {
    // A last partial row (GELU's element blocks) counts as a row.
    let rows = out.len().div_ceil(row_len.max(1));
    // Below ~64k elements a thread costs more than it saves.
    let threads = threads.min(out.len() / 65536).clamp(1, rows.max(1));
    if threads == 1 {
        return vec![f(0, out)];
    }
    let per_thread = rows.div_ceil(threads);
    let blocks: Vec<&mut [T]> = out.chunks_mut((per_thread * row_len).max(1)).collect();
    map_parallel(blocks, |i, block| f(i * per_thread, block))
}

/// A new vector of `len` values written by `fill(first_row, block)` on blocks of whole rows,
/// as [`par_rows`]. Each thread zeroes its own block just before filling it, so no serial
/// pass over the new memory (a zero-fill or a copy on the calling thread) comes first.
pub(crate) fn par_vec(
    len: usize,
    row_len: usize,
    fill: impl Fn(usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    let mut out: Vec<f32> = Vec::with_capacity(len);
    par_rows(
        &mut out.spare_capacity_mut()[..len],
        row_len,
        |first, block: &mut [std::mem::MaybeUninit<f32>]| {
            block.iter_mut().for_each(|v| {
                v.write(0.0);
            });
            // SAFETY: every element of `block` was initialised just above, and
            // `MaybeUninit<f32>` has the layout of `f32`.
            let block = unsafe { &mut *(block as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) };
            fill(first, block);
        },
    );
    // SAFETY: the blocks cover the first `len` elements, and each was initialised above.
    unsafe { out.set_len(len) };
    out
}

/// `len` zeros, zeroed in parallel (see [`par_vec`]).
pub(crate) fn par_zeros(len: usize) -> Vec<f32> {
    par_vec(len, ROW, |_, _| {})
}
