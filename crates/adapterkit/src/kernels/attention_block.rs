//! A frozen layer's whole attention block as one CPU op: the query, key, value and output
//! projections around [`AttentionOp`], with a prefix of keys and values (prefix tuning) in front
//! of each sequence's own where there is one, and changes to the query, key and value
//! projections (a LoRA's updates or (IA)³'s scales, trained or not) where there are some.

use std::ops::Range;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use crate::kernels::attention::{AttentionOp, Dims};
use crate::kernels::dropout::{self, DropoutMask};
use crate::kernels::fused::{
    contiguous_all, with_all_values, with_values, Activations, FrozenLinear, Kept, BACKWARD_ROWS,
};
use crate::kernels::parallel::par_zeros;

mod changes;

use changes::{ChangeValues, Kind};
pub use changes::{ProjectionChange, ProjectionChanges};

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

/// A frozen layer's self-attention and output projection, `dropout(attention(x Wq^T + bq + uq,
/// x Wk^T + bk + uk, x Wv^T + bv + uv) Wo^T + bo)`, as one op on `x` `[batch, seq, hidden]`
/// and the updates `u` (see [`AttentionBlockOp::apply`]) whose backward pass returns `dL/dx`
/// and the updates' gradients. Node by node, candle would keep the attention's output, the
/// projection and a float dropout mask, and zero-fill and add a gradient for each of eight
/// edges; this op keeps q, k, v (or recomputes them) and bit masks, and sums `dx` in place.
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
    /// What changes the query, key and value projections (set by `apply`).
    kinds: [Kind; 3],
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
            kinds: [Kind::None; 3],
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

    /// The batch size, the sequence length and the attention's sizes for input `x` and change
    /// inputs of `lengths`.
    fn dims(&self, x: &Layout, lengths: [usize; 2]) -> Result<(usize, usize, Dims)> {
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
        let expected = match self.scaling() {
            true => {
                let scales = self.kinds.iter().filter(|k| **k == Kind::Scale).count();
                [scales * hidden, 0]
            }
            false => [
                (self.kinds[0] == Kind::Add) as usize * batch * queries * hidden,
                self.key_value_updates() * batch * seq * hidden,
            ],
        };
        if lengths != expected {
            candle_core::bail!(
                "fused attention: changes of {lengths:?} values for {batch} x {seq} x {hidden}, \
                 {queries} querying (expected {expected:?})"
            );
        }
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

    /// q, k and v of `sequences` of the batch from their rows `x` (`[count, seq, hidden]`) and
    /// their rows of the updates (not scaled: see [`scaled`](Self::scaled)), the prefix's keys
    /// and values in front.
    fn projections(
        &self,
        x: &[f32],
        updates: ChangeValues,
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
        let [mut q, mut k, mut v] = [q, k?, v?];
        if self.kinds[0] == Kind::Add {
            q.iter_mut().zip(updates.query).for_each(|(a, u)| *a += u);
        }
        let width = self.key_value_updates() * d.hidden;
        for (own, column) in [&mut k, &mut v]
            .into_iter()
            .zip(self.key_value_columns(d.hidden))
        {
            let Some(column) = column else { continue };
            let rows = own.chunks_exact_mut(d.hidden);
            for (row, update) in rows.zip(updates.key_value.chunks_exact(width)) {
                let update = &update[column..column + d.hidden];
                row.iter_mut().zip(update).for_each(|(a, u)| *a += u);
            }
        }
        let [k, v] = self.behind_prefix(k, v, sequences, d.hidden);
        Ok([q, k, v])
    }

    /// The attention's gradients for `sequences` of the batch, from their `g` (the output
    /// gradient after dropout): `dcontext = g Wo`, then the attention's `dq`, `dk`, `dv`. The
    /// prefix's rows of `dk` and `dv` are dropped, as the prefix takes no gradient here.
    fn projection_grads(
        &self,
        sequences: Range<usize>,
        d: Dims,
        [q, k, v]: [&[f32]; 3],
        g: &[f32],
    ) -> Result<[Vec<f32>; 3]> {
        let n = sequences.len();
        let mut context = par_zeros(g.len());
        self.output
            .backward_into(g, n * d.queries, &mut context, false)?;
        let (dq, dk, dv) = (self.attention).backward(sequences.start, n, d, q, k, v, &context);
        drop(context);
        let [dk, dv] = self.without_prefix(dk, dv, n, d.hidden);
        Ok([dq, dk, dv])
    }

    /// `dx = dq Wq + dk Wk + dv Wv` for `n` sequences, written over `g`, or, when only first
    /// positions query, into `dx` (`dq Wq` added to first positions alone).
    fn input_grad(
        &self,
        (n, seq, d): (usize, usize, Dims),
        [dq, dk, dv]: [&[f32]; 3],
        g: &mut [f32],
        dx: Option<&mut [f32]>,
    ) -> Result<()> {
        let (rows, x_rows) = (n * d.queries, n * seq);
        match dx {
            Some(dx) => {
                self.key.backward_into(dk, x_rows, dx, false)?;
                self.value.backward_into(dv, x_rows, dx, true)?;
                let dx_first = g; // n x hidden, overwritten
                self.query.backward_into(dq, rows, dx_first, false)?;
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
                self.query.backward_into(dq, rows, dx, false)?;
                self.key.backward_into(dk, rows, dx, true)?;
                self.value.backward_into(dv, rows, dx, true)?;
            }
        }
        Ok(())
    }
}

impl CustomOp3 for AttentionBlockOp {
    fn name(&self) -> &'static str {
        "fused-attention-block"
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
        let [x, a, b] = contiguous_all([(s1, l1), (s2, l2), (s3, l3)])?;
        let (batch, seq, d) = self.dims(l1, [a.len(), b.len()])?;
        let changes = self.change_values(a, b);
        let [q, k, v] = self.projections(x, changes, 0..batch, seq, d)?;
        let context = {
            let [q, k, v] = self.scaled([&q, &k, &v], changes.scales, d.hidden);
            self.attention.forward(batch, d, &q, &k, &v)
        };
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

    /// [`projection_grads`](AttentionBlockOp::projection_grads) on blocks of sequences (about
    /// [`BACKWARD_ROWS`] tokens each), with their q, k and v kept or recomputed, then the
    /// gradients of the inputs that take one: the attention's gradients exist for one block at
    /// a time.
    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (batch, seq, d) = self.dims(x.layout(), [a.elem_count(), b.elem_count()])?;
        let kept = match self.activations {
            Activations::Recomputed => None,
            _ => Some(self.kept.take("attention block")?),
        };
        let mut g = with_values(grad, |g| Ok(g.to_vec()))?;
        dropout::apply(self.dropout.as_ref(), &mut g);
        let zeros_if = |takes: bool, len: usize| takes.then(|| par_zeros(len));
        // With every position querying, `dx` takes `g`'s place; with the first alone, it is
        // larger than `g`.
        let input_grad = x.track_op();
        let mut dx_all = zeros_if(self.first_query_only && input_grad, x.elem_count());
        // The updates' gradients, or the scales'.
        let (mut da, mut db) = (
            zeros_if(a.track_op(), a.elem_count()),
            zeros_if(b.track_op(), b.elem_count()),
        );
        let (q_len, kv_len, x_len) = (d.queries * d.hidden, d.keys * d.hidden, seq * d.hidden);
        let per_block = (BACKWARD_ROWS / seq.max(1)).max(1);
        with_all_values(&[x, a, b], |values| {
            let (x, changes) = (values[0], self.change_values(values[1], values[2]));
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
                        let changes = self.update_rows(changes, &sequences, seq, d);
                        recomputed = self.projections(x, changes, sequences.clone(), seq, d)?;
                        [&recomputed[0], &recomputed[1], &recomputed[2]].map(|t| &t[..])
                    }
                };
                let g = &mut g[first * q_len..][..n * q_len];
                let mut grads = {
                    let [q, k, v] = self.scaled(qkv, changes.scales, d.hidden);
                    self.projection_grads(sequences.clone(), d, [&q, &k, &v], g)?
                };
                if self.scaling() {
                    self.scale_grads(qkv, &mut grads, changes.scales, da.as_deref_mut(), d.hidden);
                }
                let grads = [&grads[0], &grads[1], &grads[2]].map(|t| &t[..]);
                if !self.scaling() {
                    // This block's rows of the updates' gradients.
                    let width = self.key_value_updates();
                    self.update_grads(
                        grads,
                        d.hidden,
                        da.as_mut().map(|t| &mut t[first * q_len..][..n * q_len]),
                        (db.as_mut()).map(|t| &mut t[first * x_len * width..][..n * x_len * width]),
                    );
                }
                if input_grad {
                    let dx = dx_all
                        .as_mut()
                        .map(|t| &mut t[first * x_len..][..n * x_len]);
                    self.input_grad((n, seq, d), grads, g, dx)?;
                }
            }
            Ok(())
        })?;
        let tensor = |values: Option<Vec<f32>>, like: &Tensor| {
            values
                .map(|v| Tensor::from_vec(v, like.shape(), like.device()))
                .transpose()
        };
        let dx = match (input_grad, self.first_query_only) {
            (false, _) => None,
            (true, true) => dx_all,
            (true, false) => Some(g),
        };
        Ok((tensor(dx, x)?, tensor(da, a)?, tensor(db, b)?))
    }
}

#[cfg(test)]
mod tests;
