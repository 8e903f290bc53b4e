//! Multi-head scaled dot-product attention as one CPU op with a hand-written backward pass.
//!
//! Composed from candle ops, attention is about fifteen graph nodes per layer (splitting heads,
//! transposing keys, two products, scale, mask, softmax, dropout, merging heads), and candle's
//! backward pass allocates, zero-fills and adds a gradient for every one of them, several of
//! them `[batch, heads, queries, keys]`. Here queries, keys and values stay in the projections'
//! `[batch, seq, hidden]` layout (a head is a strided view, read in place by `gemm`), and only
//! they and a bit mask of the dropout are kept for the backward pass, which recomputes the
//! attention probabilities (one extra `queries x keys` product per head, ~3% of a layer's work).

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use crate::kernels::dropout::DropoutMask;
use crate::kernels::fused::{contiguous_all, with_all_values};
use crate::kernels::matmul::{matmul_into, View};
use crate::kernels::parallel::{map_parallel, par_zeros, threads};
use crate::kernels::simd::{dot, softmax_in_place, with_wide_simd};

/// `dropout(softmax(q k^T * scale + bias)) v` per head; arguments `q` `[batch, queries,
/// hidden]`, `k` and `v` `[batch, keys, hidden]`, output `[batch, queries, hidden]`.
pub struct AttentionOp {
    pub heads: usize,
    pub scale: f32,
    /// `[batch, keys]`: the additive mask of each sequence's keys.
    pub bias: Vec<f32>,
    /// Dropout of the probabilities, `[batch, heads, queries, keys]`; `None` without dropout.
    pub dropout: Option<DropoutMask>,
}

/// The sizes of one call.
#[derive(Clone, Copy)]
pub(super) struct Dims {
    pub(super) queries: usize,
    pub(super) keys: usize,
    pub(super) hidden: usize,
    head_dim: usize,
}

/// `softmax(x * scale + bias)` over each row of `p` (rows as long as `bias`), in place.
#[inline(always)]
fn softmax_rows_kernel(p: &mut [f32], bias: &[f32], scale: f32) {
    for row in p.chunks_exact_mut(bias.len()) {
        for (x, b) in row.iter_mut().zip(bias) {
            *x = *x * scale + b;
        }
        softmax_in_place(row);
    }
}

with_wide_simd!(softmax_rows => softmax_rows_kernel(p: &mut [f32], bias: &[f32], scale: f32));

/// One sequence's tensors, `[seq, hidden]` each.
struct Sequence<'a> {
    index: usize,
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
}

impl<'a> Sequence<'a> {
    /// Sequence `index` of the batch (its mask and dropout), the `local`-th of `q`, `k`, `v`.
    fn of(index: usize, local: usize, d: Dims, q: &'a [f32], k: &'a [f32], v: &'a [f32]) -> Self {
        let (q_len, kv_len) = (d.queries * d.hidden, d.keys * d.hidden);
        Self {
            index,
            q: &q[local * q_len..][..q_len],
            k: &k[local * kv_len..][..kv_len],
            v: &v[local * kv_len..][..kv_len],
        }
    }
}

impl AttentionOp {
    /// The op for `heads` heads over `hidden`, with the padding mask `bias` `[batch, 1, 1,
    /// keys]` and a dropout mask over `[batch, heads, queries, keys]`.
    pub fn new(
        heads: usize,
        hidden: usize,
        bias: &Tensor,
        dropout: Option<DropoutMask>,
    ) -> Result<Self> {
        Ok(Self {
            heads,
            scale: (1.0 / ((hidden / heads.max(1)) as f64).sqrt()) as f32,
            bias: bias.flatten_all()?.to_vec1()?,
            dropout,
        })
    }

    fn dims(&self, q: &Layout, k: &Layout) -> Result<(usize, Dims)> {
        let (batch, queries, hidden) = q.shape().dims3()?;
        let keys = k.shape().dims3()?.1;
        Ok((batch, self.checked_dims(batch, queries, keys, hidden)?))
    }

    /// The sizes of a call on `batch` sequences, checked against the heads and the bias.
    pub(super) fn checked_dims(
        &self,
        batch: usize,
        queries: usize,
        keys: usize,
        hidden: usize,
    ) -> Result<Dims> {
        if !hidden.is_multiple_of(self.heads) || self.bias.len() != batch * keys {
            candle_core::bail!(
                "fused attention: {hidden} hidden, {} heads, bias of {} for {batch} x {keys} keys",
                self.heads,
                self.bias.len()
            );
        }
        Ok(Dims {
            queries,
            keys,
            hidden,
            head_dim: hidden / self.heads,
        })
    }

    /// Head `h`'s attention probabilities before dropout, `[queries, keys]`, into `p`.
    fn probs(&self, s: &Sequence, h: usize, d: Dims, p: &mut [f32]) {
        let at = h * d.head_dim;
        let q = View::new(&s.q[at..], d.queries, d.head_dim, d.hidden, 1);
        let k = View::new(&s.k[at..], d.keys, d.head_dim, d.hidden, 1);
        matmul_into(p, d.keys, q, k.t(), false, 1);
        let bias = &self.bias[s.index * d.keys..][..d.keys];
        softmax_rows(p, bias, self.scale);
    }

    /// Applies dropout to head `h`'s probabilities (or their gradient) `p`, `[queries, keys]`.
    fn drop(&self, s: &Sequence, h: usize, p: &mut [f32]) {
        if let Some(mask) = &self.dropout {
            mask.apply((s.index * self.heads + h) * p.len(), p);
        }
    }

    /// The whole batch's output from its `q`, `k` and `v`.
    pub(super) fn forward(
        &self,
        batch: usize,
        d: Dims,
        q: &[f32],
        k: &[f32],
        v: &[f32],
    ) -> Vec<f32> {
        let q_len = d.queries * d.hidden;
        let mut out = par_zeros(batch * q_len);
        par_sequences(batch, [(&mut out, q_len)], |first, [out]| {
            let mut p = vec![0f32; d.queries * d.keys];
            for (i, out) in out.chunks_exact_mut(q_len).enumerate() {
                let s = Sequence::of(first + i, first + i, d, q, k, v);
                self.forward_sequence(&s, d, out, &mut p);
            }
        });
        out
    }

    fn forward_sequence(&self, s: &Sequence, d: Dims, out: &mut [f32], p: &mut [f32]) {
        for h in 0..self.heads {
            self.probs(s, h, d, p);
            self.drop(s, h, p);
            let at = h * d.head_dim;
            let v = View::new(&s.v[at..], d.keys, d.head_dim, d.hidden, 1);
            let probs = View::rows(p, d.queries, d.keys);
            matmul_into(&mut out[at..], d.hidden, probs, v, false, 1);
        }
    }

    /// `dq`, `dk` and `dv` of `batch` sequences of the batch from sequence `offset` on, from
    /// their `q`, `k`, `v` and output gradient `g`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward(
        &self,
        offset: usize,
        batch: usize,
        d: Dims,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        g: &[f32],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (q_len, kv_len) = (d.queries * d.hidden, d.keys * d.hidden);
        let (mut dq, mut dk, mut dv) = (
            par_zeros(batch * q_len),
            par_zeros(batch * kv_len),
            par_zeros(batch * kv_len),
        );
        let outputs = [
            (&mut dq[..], q_len),
            (&mut dk[..], kv_len),
            (&mut dv[..], kv_len),
        ];
        par_sequences(batch, outputs, |first, [dq, dk, dv]| {
            let n = d.queries * d.keys;
            let (mut p, mut dropped, mut dp) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
            let sequences = dq
                .chunks_exact_mut(q_len)
                .zip(dk.chunks_exact_mut(kv_len))
                .zip(dv.chunks_exact_mut(kv_len));
            for (i, ((dq, dk), dv)) in sequences.enumerate() {
                let s = Sequence::of(offset + first + i, first + i, d, q, k, v);
                let g = &g[(first + i) * q_len..][..q_len];
                let grads = (dq, dk, dv);
                self.backward_sequence(&s, g, d, grads, &mut p, &mut dropped, &mut dp);
            }
        });
        (dq, dk, dv)
    }

    /// With `P` the probabilities, `P'` after dropout and `g` the output gradient:
    /// `dv = P'^T g`, `dP = (g v^T) * kept`, `dS = scale * P * (dP - rowsum(dP * P))`,
    /// `dq = dS k`, `dk = dS^T q`.
    #[allow(clippy::too_many_arguments)]
    fn backward_sequence(
        &self,
        s: &Sequence,
        g: &[f32],
        d: Dims,
        (dq, dk, dv): (&mut [f32], &mut [f32], &mut [f32]),
        p: &mut [f32],
        dropped: &mut [f32],
        dp: &mut [f32],
    ) {
        for h in 0..self.heads {
            let at = h * d.head_dim;
            let g_h = View::new(&g[at..], d.queries, d.head_dim, d.hidden, 1);
            self.probs(s, h, d, p);
            dropped.copy_from_slice(p);
            self.drop(s, h, dropped);
            let dropped = View::rows(dropped, d.queries, d.keys);
            matmul_into(&mut dv[at..], d.hidden, dropped.t(), g_h, false, 1);

            let v = View::new(&s.v[at..], d.keys, d.head_dim, d.hidden, 1);
            matmul_into(dp, d.keys, g_h, v.t(), false, 1);
            self.drop(s, h, dp);
            for (dp_row, p_row) in dp.chunks_exact_mut(d.keys).zip(p.chunks_exact(d.keys)) {
                let dot = dot(dp_row, p_row);
                for (x, y) in dp_row.iter_mut().zip(p_row) {
                    *x = self.scale * y * (*x - dot);
                }
            }
            let ds = View::rows(dp, d.queries, d.keys);
            let k = View::new(&s.k[at..], d.keys, d.head_dim, d.hidden, 1);
            let q = View::new(&s.q[at..], d.queries, d.head_dim, d.hidden, 1);
            matmul_into(&mut dq[at..], d.hidden, ds, k, false, 1);
            matmul_into(&mut dk[at..], d.hidden, ds.t(), q, false, 1);
        }
    }
}

/// Splits `0..batch` into one block of consecutive sequences per thread and runs `f(first,
/// count)` on each; `f` gets that block's part of every output.
fn par_sequences<const N: usize>(
    batch: usize,
    outputs: [(&mut [f32], usize); N],
    f: impl Fn(usize, [&mut [f32]; N]) + Sync,
) {
    let threads = threads().clamp(1, batch.max(1));
    let per_thread = batch.div_ceil(threads).max(1);
    let mut blocks: Vec<Vec<&mut [f32]>> = (0..threads).map(|_| Vec::new()).collect();
    for (out, per_sequence) in outputs {
        for (i, block) in out.chunks_mut(per_thread * per_sequence).enumerate() {
            blocks[i].push(block);
        }
    }
    let blocks: Vec<[&mut [f32]; N]> = blocks
        .into_iter()
        .filter_map(|block| block.try_into().ok())
        .collect();
    map_parallel(blocks, |i, block| f(i * per_thread, block));
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (batch, d) = self.dims(l1, l2)?;
        let [q, k, v] = contiguous_all([(s1, l1), (s2, l2), (s3, l3)])?;
        let out = self.forward(batch, d, q, k, v);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (batch, d) = self.dims(q.layout(), k.layout())?;
        let (dq, dk, dv) = with_all_values(&[q, k, v, grad], |t| {
            Ok(self.backward(0, batch, d, t[0], t[1], t[2], t[3]))
        })?;
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ))
    }
}
