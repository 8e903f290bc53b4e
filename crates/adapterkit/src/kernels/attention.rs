//! Multi-head scaled dot-product attention as one CPU op with a hand-written backward pass.
//!
//! Composed from candle ops, attention is about fifteen graph nodes per layer (splitting heads,
//! transposing keys, two products, scale, mask, softmax, dropout, merging heads), and candle's
//! backward pass allocates, zero-fills and adds a gradient for every one of them, several of
//! them `[batch, heads, queries, keys]`. Here queries, keys and values stay in the projections'
//! `[batch, seq, hidden]` layout (a head is a strided view, read in place by `gemm`), and only
//! they and a byte mask of the dropout are kept for the backward pass, which recomputes the
//! attention probabilities (one extra `queries x keys` product per head, ~3% of a layer's work).

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};

use crate::kernels::dropout::{self, DropoutMask};
use crate::kernels::fused::{
    contiguous, contiguous_all, with_all_values, with_values, FrozenLinear, Kept,
};
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
struct Dims {
    queries: usize,
    keys: usize,
    hidden: usize,
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
    /// Sequence `index` of the whole batch's `q`, `k` and `v`.
    fn of(index: usize, d: Dims, q: &'a [f32], k: &'a [f32], v: &'a [f32]) -> Self {
        let (q_len, kv_len) = (d.queries * d.hidden, d.keys * d.hidden);
        Self {
            index,
            q: &q[index * q_len..][..q_len],
            k: &k[index * kv_len..][..kv_len],
            v: &v[index * kv_len..][..kv_len],
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
    fn checked_dims(
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
    fn forward(&self, batch: usize, d: Dims, q: &[f32], k: &[f32], v: &[f32]) -> Vec<f32> {
        let q_len = d.queries * d.hidden;
        let mut out = par_zeros(batch * q_len);
        par_sequences(batch, [(&mut out, q_len)], |first, [out]| {
            let mut p = vec![0f32; d.queries * d.keys];
            for (i, out) in out.chunks_exact_mut(q_len).enumerate() {
                let s = Sequence::of(first + i, d, q, k, v);
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

    /// `dq`, `dk` and `dv` of the whole batch from its `q`, `k`, `v` and output gradient `g`.
    fn backward(
        &self,
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
                let s = Sequence::of(first + i, d, q, k, v);
                let g = &g[s.index * q_len..][..q_len];
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
            Ok(self.backward(batch, d, t[0], t[1], t[2], t[3]))
        })?;
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ))
    }
}

/// Keys and values put in front of each sequence's own (prefix tuning), as plain values that
/// take no gradient: `[batch, len, hidden]` each.
pub struct PrefixValues {
    len: usize,
    keys: Vec<f32>,
    values: Vec<f32>,
}

impl PrefixValues {
    /// From `keys` and `values` `[batch, len, hidden]`.
    pub fn new(keys: &Tensor, values: &Tensor) -> Result<Self> {
        if keys.dims() != values.dims() {
            candle_core::bail!(
                "prefix keys {:?} and values {:?} differ in shape",
                keys.dims(),
                values.dims()
            );
        }
        let len = keys.dims3()?.1;
        let plain = |t: &Tensor| t.contiguous()?.flatten_all()?.to_vec1::<f32>();
        Ok(Self {
            len,
            keys: plain(keys)?,
            values: plain(values)?,
        })
    }

    /// `own` `[batch, seq, hidden]` with `prefix`'s rows of each sequence in front:
    /// `[batch, len + seq, hidden]`.
    fn prepend(&self, prefix: &[f32], own: &[f32], batch: usize) -> Vec<f32> {
        let (per_prefix, per_own) = (prefix.len() / batch.max(1), own.len() / batch.max(1));
        let mut out = Vec::with_capacity(prefix.len() + own.len());
        for (p, o) in prefix
            .chunks_exact(per_prefix.max(1))
            .zip(own.chunks_exact(per_own.max(1)))
        {
            out.extend_from_slice(p);
            out.extend_from_slice(o);
        }
        out
    }

    /// The rows of `all` `[batch, len + seq, hidden]` after each sequence's prefix.
    fn own_rows(&self, all: &[f32], batch: usize, hidden: usize) -> Vec<f32> {
        let per_sequence = all.len() / batch.max(1);
        (all.chunks_exact(per_sequence.max(1)))
            .flat_map(|sequence| &sequence[self.len * hidden..])
            .copied()
            .collect()
    }
}

/// A frozen layer's self-attention and output projection, `dropout(attention(x Wq^T + bq,
/// x Wk^T + bk, x Wv^T + bv) Wo^T + bo)`, as one op on `x` `[batch, seq, hidden]` whose
/// backward pass returns `dL/dx` alone. Node by node, candle would keep the attention's
/// output, the projection and a float dropout mask, and zero-fill and add a gradient for
/// each of eight edges; this op keeps q, k, v and byte masks, and sums `dx` in place.
pub struct AttentionBlockOp {
    pub query: FrozenLinear,
    pub key: FrozenLinear,
    pub value: FrozenLinear,
    /// `attention.output.dense`
    pub output: FrozenLinear,
    pub attention: AttentionOp,
    /// Dropout of the output projection.
    pub dropout: Option<DropoutMask>,
    /// Whether to keep q, k and v for a backward pass (`x` takes a gradient).
    pub keep_for_backward: bool,
    /// Whether only each sequence's first position queries (`layer::Positions::First`): the
    /// output is then `[batch, 1, hidden]`.
    first_query_only: bool,
    /// Keys and values in front of each sequence's own (the attention's bias covers them).
    prefix: Option<PrefixValues>,
    kept: Kept<[Vec<f32>; 3]>,
}

impl AttentionBlockOp {
    pub fn new(
        [query, key, value, output]: [FrozenLinear; 4],
        attention: AttentionOp,
        dropout: Option<DropoutMask>,
        keep_for_backward: bool,
    ) -> Self {
        Self {
            query,
            key,
            value,
            output,
            attention,
            dropout,
            keep_for_backward,
            first_query_only: false,
            prefix: None,
            kept: Kept::new(),
        }
    }

    /// The op with only each sequence's first position querying (the attention op and the
    /// dropout mask must be sized for one query per sequence).
    pub fn first_query_only(self, first_query_only: bool) -> Self {
        Self {
            first_query_only,
            ..self
        }
    }

    /// The op with `prefix`'s keys and values in front of each sequence's own (the attention
    /// op's bias must cover them).
    pub fn with_prefix(self, prefix: Option<PrefixValues>) -> Self {
        Self { prefix, ..self }
    }

    /// The batch size, the sequence length and the attention's sizes for input `x`.
    fn dims(&self, x: &Layout) -> Result<(usize, usize, Dims)> {
        let (batch, seq, hidden) = x.shape().dims3()?;
        let prefix = self.prefix.as_ref().map_or(0, |p| p.len);
        if let Some(p) = &self.prefix {
            if p.keys.len() != batch * prefix * hidden {
                candle_core::bail!(
                    "fused attention: a prefix of {} values for {batch} x {prefix} x {hidden}",
                    p.keys.len()
                );
            }
        }
        let queries = if self.first_query_only { 1 } else { seq };
        let d = (self.attention).checked_dims(batch, queries, prefix + seq, hidden)?;
        Ok((batch, seq, d))
    }

    /// Keys or values `own` `[batch, seq, hidden]`, with the prefix's in front if there is one.
    fn with_prefix_rows(
        &self,
        own: Vec<f32>,
        prefix: impl Fn(&PrefixValues) -> &[f32],
        batch: usize,
    ) -> Vec<f32> {
        match &self.prefix {
            Some(p) => p.prepend(prefix(p), &own, batch),
            None => own,
        }
    }

    /// The gradient of the own keys or values, from that of all of them.
    fn own_rows(&self, all: Vec<f32>, batch: usize, hidden: usize) -> Vec<f32> {
        match &self.prefix {
            Some(p) => p.own_rows(&all, batch, hidden),
            None => all,
        }
    }
}

impl CustomOp1 for AttentionBlockOp {
    fn name(&self) -> &'static str {
        "fused-attention-block"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(storage, layout)?;
        let (batch, seq, d) = self.dims(layout)?;
        let (rows, x_rows) = (batch * d.queries, batch * seq);
        let q = if self.first_query_only {
            let first: Vec<f32> = x
                .chunks_exact(seq * d.hidden)
                .flat_map(|sequence| &sequence[..d.hidden])
                .copied()
                .collect();
            self.query.forward(&first, rows)?
        } else {
            self.query.forward(x, rows)?
        };
        let k = self.with_prefix_rows(self.key.forward(x, x_rows)?, |p| &p.keys, batch);
        let v = self.with_prefix_rows(self.value.forward(x, x_rows)?, |p| &p.values, batch);
        let context = self.attention.forward(batch, d, &q, &k, &v);
        let mut out = self.output.forward(&context, rows)?;
        dropout::apply(self.dropout.as_ref(), &mut out);
        if self.keep_for_backward {
            self.kept.put([q, k, v]);
        }
        Ok((
            CpuStorage::F32(out),
            Shape::from((batch, d.queries, d.hidden)),
        ))
    }

    /// `dcontext = (g * mask) Wo`, then the attention's `dq`, `dk`, `dv`, then
    /// `dx = dq Wq + dk Wk + dv Wv` (`dq Wq` on first positions alone when only they query; the
    /// prefix's rows of `dk` and `dv` dropped, as the prefix takes no gradient here).
    fn bwd(&self, x: &Tensor, _out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let [q, k, v] = self.kept.take("attention block")?;
        let (batch, seq, d) = self.dims(x.layout())?;
        let (rows, x_rows) = (batch * d.queries, batch * seq);
        let mut g = with_values(grad, |g| Ok(g.to_vec()))?;
        dropout::apply(self.dropout.as_ref(), &mut g);
        let mut context = par_zeros(g.len());
        self.output.backward_into(&g, rows, &mut context, false)?;
        let (dq, dk, dv) = self.attention.backward(batch, d, &q, &k, &v, &context);
        drop((q, k, v, context));
        let (dk, dv) = (
            self.own_rows(dk, batch, d.hidden),
            self.own_rows(dv, batch, d.hidden),
        );
        let dx = if self.first_query_only {
            let mut dx = par_zeros(x_rows * d.hidden);
            self.key.backward_into(&dk, x_rows, &mut dx, false)?;
            self.value.backward_into(&dv, x_rows, &mut dx, true)?;
            let mut dx_first = g; // batch x hidden, overwritten
            self.query.backward_into(&dq, rows, &mut dx_first, false)?;
            let sequences = dx.chunks_exact_mut(seq * d.hidden);
            for (sequence, first) in sequences.zip(dx_first.chunks_exact(d.hidden)) {
                sequence[..d.hidden]
                    .iter_mut()
                    .zip(first)
                    .for_each(|(a, b)| *a += b);
            }
            dx
        } else {
            let mut dx = g; // rows x hidden, overwritten
            self.query.backward_into(&dq, rows, &mut dx, false)?;
            self.key.backward_into(&dk, rows, &mut dx, true)?;
            self.value.backward_into(&dv, rows, &mut dx, true)?;
            dx
        };
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::fused::testing::{assert_same_output_and_dx, frozen, random};
    use crate::model::ops::{attention, attention_bias, attention_dropout, linear};
    use crate::model::Mode;
    use crate::rng::SeededRng;
    use candle_core::{Device, Var};
    use candle_nn::Linear;

    /// Output and `dL/dx` of the block op against its Linears and the attention op node by
    /// node, with and without dropout, with a padded sequence, small and split over threads,
    /// every position querying and only the first, with and without a prefix of keys and
    /// values (one of whose positions is hidden from the first sequence).
    #[test]
    fn block_matches_its_ops_node_by_node() -> Result<()> {
        let mut rng = SeededRng::new(5);
        for (batch, seq, hidden, heads) in [(2, 3, 8, 2), (4, 40, 64, 4)] {
            let weights: Vec<(Tensor, Tensor)> = (0..4)
                .map(|_| {
                    Ok((
                        random(&mut rng, &[hidden, hidden])?,
                        random(&mut rng, &[hidden])?,
                    ))
                })
                .collect::<Result<_>>()?;
            let x = Var::from_tensor(&random(&mut rng, &[batch, seq, hidden])?)?;
            // The last sequence has one padded position.
            let mut mask = vec![1u32; batch * seq];
            mask[batch * seq - 1] = 0;
            let bias = attention_bias(&Tensor::from_vec(mask, (batch, seq), &Device::Cpu)?)?;
            let prefix_keys = random(&mut rng, &[batch, 2, hidden])?;
            let prefix_values = random(&mut rng, &[batch, 2, hidden])?;
            let mut prefix_bias = vec![0f32; batch * 2];
            prefix_bias[0] = f32::MIN;
            let prefix_bias = Tensor::from_vec(prefix_bias, (batch, 1, 1, 2), &Device::Cpu)?;
            let cases = [(0.0, false), (0.2, false), (0.0, true), (0.2, true)];
            for ((p, first_only), with_prefix) in
                cases.into_iter().flat_map(|c| [(c, false), (c, true)])
            {
                let queries = if first_only { 1 } else { seq };
                let r = random(&mut rng, &[batch, queries, hidden])?;
                let (mut node_mode, mut fused_mode) = (Mode::train(9), Mode::train(9));
                let linears: Vec<Linear> = weights
                    .iter()
                    .map(|(w, b)| Linear::new(w.clone(), Some(b.clone())))
                    .collect();
                let x_q = x.as_tensor().narrow(1, 0, queries)?;
                let q = linear(&linears[0], &x_q)?;
                let [k, v] = [1, 2].map(|i| linear(&linears[i], x.as_tensor()));
                let (mut k, mut v, mut bias) = (k?, v?, bias.clone());
                if with_prefix {
                    k = Tensor::cat(&[&prefix_keys, &k], 1)?;
                    v = Tensor::cat(&[&prefix_values, &v], 1)?;
                    bias = Tensor::cat(&[&prefix_bias, &bias], 3)?;
                }
                let context = attention(&q, &k, &v, &bias, heads, p, &mut node_mode)?;
                let nodes = node_mode.dropout(&linear(&linears[3], &context)?, p)?;

                let mask = attention_dropout(&mut fused_mode, heads, queries, &bias, p)?;
                let attention = AttentionOp::new(heads, hidden, &bias, mask)?;
                let mask = fused_mode.dropout_mask(batch * queries * hidden, p);
                let frozen = [0, 1, 2, 3].map(|i| frozen(&weights[i].0, &weights[i].1));
                let prefix = match with_prefix {
                    true => Some(PrefixValues::new(&prefix_keys, &prefix_values)?),
                    false => None,
                };
                let op = AttentionBlockOp::new(frozen, attention, mask, true)
                    .first_query_only(first_only)
                    .with_prefix(prefix);
                let fused = x.as_tensor().apply_op1(op)?;
                let what =
                    format!("p = {p}, first query only: {first_only}, prefix: {with_prefix}");
                assert_same_output_and_dx(&nodes, &fused, &x, &r, &what)?;
            }
        }
        Ok(())
    }
}
