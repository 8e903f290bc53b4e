//! A frozen layer's whole attention block as one CPU op: the query, key, value and output
//! projections around [`AttentionOp`], with a prefix of keys and values (prefix tuning) in front
//! of each sequence's own where there is one.

use std::ops::Range;

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use crate::kernels::attention::{AttentionOp, Dims};
use crate::kernels::dropout::{self, DropoutMask};
use crate::kernels::fused::{
    contiguous, with_values, Activations, FrozenLinear, Kept, BACKWARD_ROWS,
};
use crate::kernels::parallel::par_zeros;

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

    /// The rows of `all` `[batch, len + seq, hidden]` after each sequence's prefix.
    fn own_rows(&self, all: &[f32], batch: usize, hidden: usize) -> Vec<f32> {
        let per_sequence = all.len() / batch.max(1);
        (all.chunks_exact(per_sequence.max(1)))
            .flat_map(|sequence| &sequence[self.len * hidden..])
            .copied()
            .collect()
    }
}

/// `own` `[batch, seq, hidden]` with each sequence's rows of `prefix` `[batch, len, hidden]` in
/// front: `[batch, len + seq, hidden]`.
fn prepend(prefix: &[f32], own: &[f32], batch: usize) -> Vec<f32> {
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

/// A frozen layer's self-attention and output projection, `dropout(attention(x Wq^T + bq,
/// x Wk^T + bk, x Wv^T + bv) Wo^T + bo)`, as one op on `x` `[batch, seq, hidden]` whose
/// backward pass returns `dL/dx` alone. Node by node, candle would keep the attention's
/// output, the projection and a float dropout mask, and zero-fill and add a gradient for
/// each of eight edges; this op keeps q, k, v (or recomputes them) and bit masks, and sums
/// `dx` in place.
pub struct AttentionBlockOp {
    pub query: FrozenLinear,
    pub key: FrozenLinear,
    pub value: FrozenLinear,
    /// `attention.output.dense`
    pub output: FrozenLinear,
    pub attention: AttentionOp,
    /// Dropout of the output projection.
    pub dropout: Option<DropoutMask>,
    /// Whether q, k and v are kept for the backward pass, recomputed there, or not needed.
    pub activations: Activations,
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
        activations: Activations,
    ) -> Self {
        Self {
            query,
            key,
            value,
            output,
            attention,
            dropout,
            activations,
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

    /// Keys and values of `sequences` of the batch, `[count, seq, hidden]`, with their prefix's
    /// in front, if there is one.
    fn behind_prefix(
        &self,
        keys: Vec<f32>,
        values: Vec<f32>,
        sequences: Range<usize>,
        hidden: usize,
    ) -> [Vec<f32>; 2] {
        match &self.prefix {
            Some(p) => {
                let per_sequence = p.len * hidden;
                let rows = sequences.start * per_sequence..sequences.end * per_sequence;
                let count = sequences.len();
                [
                    prepend(&p.keys[rows.clone()], &keys, count),
                    prepend(&p.values[rows], &values, count),
                ]
            }
            None => [keys, values],
        }
    }

    /// The gradients of the own keys and values, from those of all of them.
    fn without_prefix(
        &self,
        dk: Vec<f32>,
        dv: Vec<f32>,
        batch: usize,
        hidden: usize,
    ) -> [Vec<f32>; 2] {
        match &self.prefix {
            Some(p) => [
                p.own_rows(&dk, batch, hidden),
                p.own_rows(&dv, batch, hidden),
            ],
            None => [dk, dv],
        }
    }

    /// q, k and v of `sequences` of the batch from their rows `x` (`[count, seq, hidden]`),
    /// the prefix's keys and values in front.
    fn projections(
        &self,
        x: &[f32],
        sequences: Range<usize>,
        seq: usize,
        d: Dims,
    ) -> Result<[Vec<f32>; 3]> {
        let count = sequences.len();
        let q = if self.first_query_only {
            let first: Vec<f32> = x
                .chunks_exact(seq * d.hidden)
                .flat_map(|sequence| &sequence[..d.hidden])
                .copied()
                .collect();
            self.query.forward(&first, count)?
        } else {
            self.query.forward(x, count * seq)?
        };
        let [k, v] = [&self.key, &self.value].map(|l| l.forward(x, count * seq));
        let [k, v] = self.behind_prefix(k?, v?, sequences, d.hidden);
        Ok([q, k, v])
    }

    /// The backward pass of `sequences` of the batch, from their `g` (the output gradient after
    /// dropout): `dcontext = g Wo`, the attention's `dq`, `dk`, `dv`, then
    /// `dx = dq Wq + dk Wk + dv Wv`, written over `g`, or, when only first positions query,
    /// into `dx` (`dq Wq` added to first positions alone). The prefix's rows of `dk` and `dv`
    /// are dropped, as the prefix takes no gradient here.
    fn backward_block(
        &self,
        sequences: Range<usize>,
        seq: usize,
        d: Dims,
        [q, k, v]: [&[f32]; 3],
        g: &mut [f32],
        dx: Option<&mut [f32]>,
    ) -> Result<()> {
        let n = sequences.len();
        let (rows, x_rows) = (n * d.queries, n * seq);
        let mut context = par_zeros(g.len());
        self.output.backward_into(g, rows, &mut context, false)?;
        let (dq, dk, dv) = (self.attention).backward(sequences.start, n, d, q, k, v, &context);
        drop(context);
        let [dk, dv] = self.without_prefix(dk, dv, n, d.hidden);
        match dx {
            Some(dx) => {
                self.key.backward_into(&dk, x_rows, dx, false)?;
                self.value.backward_into(&dv, x_rows, dx, true)?;
                let dx_first = g; // n x hidden, overwritten
                self.query.backward_into(&dq, rows, dx_first, false)?;
                let sequences = dx.chunks_exact_mut(seq * d.hidden);
                for (sequence, first) in sequences.zip(dx_first.chunks_exact(d.hidden)) {
                    sequence[..d.hidden]
                        .iter_mut()
                        .zip(first)
                        .for_each(|(a, b)| *a += b);
                }
            }
            None => {
                let dx = g; // rows x hidden, overwritten
                self.query.backward_into(&dq, rows, dx, false)?;
                self.key.backward_into(&dk, rows, dx, true)?;
                self.value.backward_into(&dv, rows, dx, true)?;
            }
        }
        Ok(())
    }
}

impl CustomOp1 for AttentionBlockOp {
    fn name(&self) -> &'static str {
        "fused-attention-block"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(storage, layout)?;
        let (batch, seq, d) = self.dims(layout)?;
        let [q, k, v] = self.projections(x, 0..batch, seq, d)?;
        let context = self.attention.forward(batch, d, &q, &k, &v);
        let mut out = self.output.forward(&context, batch * d.queries)?;
        dropout::apply(self.dropout.as_ref(), &mut out);
        if self.activations == Activations::Kept {
            self.kept.put([q, k, v]);
        }
        Ok((
            CpuStorage::F32(out),
            Shape::from((batch, d.queries, d.hidden)),
        ))
    }

    /// [`backward_block`](AttentionBlockOp::backward_block) on blocks of sequences (about
    /// [`BACKWARD_ROWS`] tokens each), with their q, k and v kept or recomputed: the
    /// attention's gradients exist for one block at a time.
    fn bwd(&self, x: &Tensor, _out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (batch, seq, d) = self.dims(x.layout())?;
        let kept = match self.activations {
            Activations::Recomputed => None,
            _ => Some(self.kept.take("attention block")?),
        };
        let mut g = with_values(grad, |g| Ok(g.to_vec()))?;
        dropout::apply(self.dropout.as_ref(), &mut g);
        // With every position querying, `dx` takes `g`'s place; with the first alone, it is
        // larger than `g`.
        let mut dx_all = match self.first_query_only {
            true => par_zeros(batch * seq * d.hidden),
            false => Vec::new(),
        };
        let (q_len, kv_len, x_len) = (d.queries * d.hidden, d.keys * d.hidden, seq * d.hidden);
        let per_block = (BACKWARD_ROWS / seq.max(1)).max(1);
        with_values(x, |x| {
            for first in (0..batch).step_by(per_block) {
                let sequences = first..batch.min(first + per_block);
                let n = sequences.len();
                let recomputed;
                let qkv: [&[f32]; 3] = match &kept {
                    Some([q, k, v]) => [
                        &q[first * q_len..][..n * q_len],
                        &k[first * kv_len..][..n * kv_len],
                        &v[first * kv_len..][..n * kv_len],
                    ],
                    None => {
                        let x = &x[first * x_len..][..n * x_len];
                        recomputed = self.projections(x, sequences.clone(), seq, d)?;
                        [&recomputed[0], &recomputed[1], &recomputed[2]].map(|t| &t[..])
                    }
                };
                let g = &mut g[first * q_len..][..n * q_len];
                let dx = match self.first_query_only {
                    true => Some(&mut dx_all[first * x_len..][..n * x_len]),
                    false => None,
                };
                self.backward_block(sequences, seq, d, qkv, g, dx)?;
            }
            Ok(())
        })?;
        let dx = if self.first_query_only { dx_all } else { g };
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::attention::AttentionOp;
    use crate::kernels::fused::testing::{assert_same_output_and_dx, frozen, random};
    use crate::model::ops::{attention, attention_bias, attention_dropout, linear};
    use crate::model::Mode;
    use crate::rng::SeededRng;
    use candle_core::{Device, Var};
    use candle_nn::Linear;

    /// Output and `dL/dx` of the block op against its Linears and the attention op node by
    /// node, with q, k and v kept and recomputed, with and without dropout, with a padded
    /// sequence, small, split over threads and over backward blocks, every position querying
    /// and only the first, with and without a prefix of keys and values (one of whose
    /// positions is hidden from the first sequence).
    #[test]
    fn block_matches_its_ops_node_by_node() -> Result<()> {
        let mut rng = SeededRng::new(5);
        // The last: blocks of 3 sequences and 2 in the backward pass.
        let sizes = [(2, 3, 8, 2), (4, 40, 64, 4), (5, BACKWARD_ROWS / 3, 8, 2)];
        for (batch, seq, hidden, heads) in sizes {
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
            let variants = cases.into_iter().flat_map(|c| [(c, false), (c, true)]);
            let kept_or_recomputed = [Activations::Kept, Activations::Recomputed];
            for (((p, first_only), with_prefix), activations) in
                variants.flat_map(|v| kept_or_recomputed.map(|a| (v, a)))
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
                let op = AttentionBlockOp::new(frozen, attention, mask, activations)
                    .first_query_only(first_only)
                    .with_prefix(prefix);
                let fused = x.as_tensor().apply_op1(op)?;
                let what = format!(
                    "p = {p}, first query only: {first_only}, prefix: {with_prefix}, {activations:?}"
                );
                assert_same_output_and_dx(&nodes, &fused, &x, &r, &what)?;
            }
        }
        Ok(())
    }
}
