//! Matrix products on slices, for the fused ops: strided views (a head of attention, a
//! transposed weight) read in place by the `gemm` crate, the one candle uses.

use std::mem::MaybeUninit;

use crate::kernels::parallel::map_parallel;

/// A matrix inside a slice: element `(r, c)` at `data[r * row_stride + c * col_stride]`.
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> View<'a> {
    /// Panics if the matrix reaches past the end of `data` (the bound that makes `matmul_into`
    /// sound).
    pub fn new(
        data: &'a [f32],
        rows: usize,
        cols: usize,
        row_stride: usize,
        col_stride: usize,
    ) -> Self {
        let last = (rows.max(1) - 1) * row_stride + (cols.max(1) - 1) * col_stride;
        assert!(
            rows == 0 || cols == 0 || last < data.len(),
            "matrix view out of bounds"
        );
        Self {
            data,
            rows,
            cols,
            row_stride,
            col_stride,
        }
    }

    /// A dense row-major matrix.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::new(data, rows, cols, cols, 1)
    }

    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// Rows `first..first + count`.
    fn row_block(self, first: usize, count: usize) -> Self {
        let data = if count == 0 {
            &self.data[..0]
        } else {
            &self.data[first * self.row_stride..]
        };
        Self::new(data, count, self.cols, self.row_stride, self.col_stride)
    }
}

/// `dst = lhs rhs`, or `dst += lhs rhs` when `accumulate`; `dst` is `lhs.rows x rhs.cols`
/// with row stride `dst_row_stride`. `gemm` (the crate candle uses) on blocks of rows, one per
/// thread of candle's pool: `gemm`'s own threading left a thread idle on narrow products (an adapter's 24-column
/// down-projection), and was no faster on wide ones (`docs/BENCHMARKS.md`).
pub(crate) fn matmul_into(
    dst: &mut [f32],
    dst_row_stride: usize,
    lhs: View,
    rhs: View,
    accumulate: bool,
    threads: usize,
) {
    for_row_blocks(
        dst,
        dst_row_stride,
        lhs.rows,
        threads,
        |block, first, count| {
            matmul_block(
                block,
                dst_row_stride,
                lhs.row_block(first, count),
                rhs,
                accumulate,
            )
        },
    );
}

/// `lhs rhs + bias`, the row `bias` added to every row, as a new dense matrix. Each thread
/// writes the bias into its rows just before its product adds onto them, in one parallel
/// region, with no zero-fill before (measured no faster than a zero-filled, bias-filled buffer
/// and a second region: the new memory's store bandwidth is the cost either way).
pub(crate) fn matmul_onto_bias(lhs: View, rhs: View, bias: &[f32], threads: usize) -> Vec<f32> {
    let (m, n) = (lhs.rows, rhs.cols);
    assert_eq!(bias.len(), n, "matmul_onto_bias: bias length");
    let mut out: Vec<f32> = Vec::with_capacity(m * n);
    for_row_blocks(
        &mut out.spare_capacity_mut()[..m * n],
        n,
        m,
        threads,
        |block, first, count| {
            for row in block.chunks_exact_mut(n.max(1)) {
                for (d, b) in row.iter_mut().zip(bias) {
                    d.write(*b);
                }
            }
            // SAFETY: every element of `block` was written just above, and
            // `MaybeUninit<f32>` has the layout of `f32`.
            let block = unsafe { &mut *(block as *mut [MaybeUninit<f32>] as *mut [f32]) };
            matmul_block(block, n, lhs.row_block(first, count), rhs, true)
        },
    );
    // SAFETY: the row blocks cover all `m * n` elements, each written above.
    unsafe { out.set_len(m * n) };
    out
}

/// f32's Linear: `x W^T + b` for the `rows` rows of `x`, `W` `[n, k]` row-major, as a new
/// matrix (the bf16 and int8 fallbacks run it on their rounded or dequantised factors).
pub(crate) fn linear_forward(
    x: &[f32],
    rows: usize,
    w: &[f32],
    b: &[f32],
    (n, k): (usize, usize),
) -> Vec<f32> {
    let (x, w) = (View::rows(x, rows, k), View::rows(w, n, k));
    matmul_onto_bias(x, w.t(), b, crate::kernels::parallel::threads())
}

/// Runs `f(block, first_row, rows)` on consecutive blocks of the `m` rows of `dst` (row stride
/// `row_stride`; the last block takes the rest of `dst`), one block per thread, at least 16
/// rows each.
fn for_row_blocks<T: Send>(
    dst: &mut [T],
    row_stride: usize,
    m: usize,
    threads: usize,
    f: impl Fn(&mut [T], usize, usize) + Sync,
) {
    let threads = threads.clamp(1, m.div_ceil(16).max(1));
    if threads == 1 {
        return f(dst, 0, m);
    }
    let per_thread = m.div_ceil(threads);
    let mut blocks = Vec::with_capacity(threads);
    let mut rest = dst;
    for first in (0..m).step_by(per_thread) {
        let count = per_thread.min(m - first);
        let take = if first + count < m {
            count * row_stride
        } else {
            rest.len()
        };
        let (block, tail) = std::mem::take(&mut rest).split_at_mut(take);
        rest = tail;
        blocks.push((block, first, count));
    }
    map_parallel(blocks, |_, (block, first, count)| f(block, first, count));
}

fn matmul_block(dst: &mut [f32], dst_row_stride: usize, lhs: View, rhs: View, accumulate: bool) {
    let (m, n, k) = (lhs.rows, rhs.cols, lhs.cols);
    assert_eq!(k, rhs.rows, "matmul_into: inner dimensions differ");
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        (m - 1) * dst_row_stride + n <= dst.len(),
        "matmul_into: dst too small"
    );
    // SAFETY: the three views were checked to lie within their slices (`View::new` and the
    // assert above), `dst` is borrowed mutably so it aliases neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_row_stride as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}
