//! What the bf16 and int8 kernels share: a frozen weight packed in panels of [`LANES`] output
//! columns (one AVX-512 register of sums each), and the order of a product's register blocks:
//! [`ROWS`] rows by two panels (16 accumulators, enough independent sums to hide the dot
//! instructions' latency), columns in chunks whose weights stay in the L2 cache while every
//! block of rows passes.

use std::ops::Range;

/// Whether `ADAPTERKIT_PORTABLE_KERNELS=1` asks the bf16 and int8 kernels for their portable
/// paths even where the CPU has the instructions (to measure or test the fallbacks anywhere).
/// Read once.
pub(crate) fn portable_forced() -> bool {
    static FORCED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FORCED.get_or_init(|| std::env::var("ADAPTERKIT_PORTABLE_KERNELS").is_ok_and(|v| v == "1"))
}

/// Output columns of a panel.
pub(crate) const LANES: usize = 16;
/// Rows of a register block.
pub(crate) const ROWS: usize = 8;
/// Panels of a column chunk: 128 columns, ~400 KB of bf16 weight at k = 1536.
const CHUNK_PANELS: usize = 8;

/// Calls `block(rows, panel, two)` for every register block of an `m`-row product over
/// `panels` panels: rows `rows` (at most [`ROWS`], starting at a multiple of it) against panel
/// `panel` and, when `two`, the next one too.
pub(crate) fn for_each_block(
    m: usize,
    panels: usize,
    mut block: impl FnMut(Range<usize>, usize, bool),
) {
    for chunk in (0..panels).step_by(CHUNK_PANELS) {
        let chunk_end = (chunk + CHUNK_PANELS).min(panels);
        for first in (0..m).step_by(ROWS) {
            let rows = first..m.min(first + ROWS);
            let mut panel = chunk;
            while panel + 2 <= chunk_end {
                block(rows.clone(), panel, true);
                panel += 2;
            }
            if panel < chunk_end {
                block(rows.clone(), panel, false);
            }
        }
    }
}

/// Which of panel `panel`'s lanes are real columns of an `n`-column output.
pub(crate) fn lane_mask(n: usize, panel: usize) -> u16 {
    let count = LANES.min(n.saturating_sub(panel * LANES));
    if count == LANES {
        !0
    } else {
        (1 << count) - 1
    }
}
