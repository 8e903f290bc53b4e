//! Changes to the fused attention block's projections: updates added to q, k and v (a LoRA's)
//! or vectors scaling them (an (IA)³'s), as the op's second and third inputs, and their
//! gradients.

use std::borrow::Cow;
use std::ops::Range;

use candle_core::{DType, Result, Tensor};

use super::AttentionBlockOp;
use crate::kernels::attention::Dims;
use crate::kernels::fused::{add_scale_grad, scale_rows, scaled_rows};

/// A change to the output of the query, key or value projection: an update added to it (a
/// LoRA's, `[batch, rows, hidden]`), or a vector `[hidden]` that scales it (an (IA)³ vector).
#[derive(Debug)]
pub enum ProjectionChange {
    Add(Tensor),
    Scale(Tensor),
}

/// The changes to the query, key and value projections: inputs of the op, which passes them
/// their gradients. Updates and scales do not mix in one op, and scales take no prefix.
#[derive(Debug, Default)]
pub struct ProjectionChanges {
    pub query: Option<ProjectionChange>,
    pub key: Option<ProjectionChange>,
    pub value: Option<ProjectionChange>,
}

impl ProjectionChanges {
    /// The changes' tensors.
    pub fn tensors(&self) -> impl Iterator<Item = &Tensor> {
        let changes = [&self.query, &self.key, &self.value].into_iter().flatten();
        changes.map(|c| match c {
            ProjectionChange::Add(t) | ProjectionChange::Scale(t) => t,
        })
    }
}

/// What changes one projection's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    None,
    Add,
    Scale,
}

/// The op's values of its [`ProjectionChanges`] for some rows: the query's update, the key's
/// and value's side by side in each row, and the scales one after another, as far as there are
/// some.
#[derive(Clone, Copy)]
pub(super) struct ChangeValues<'a> {
    pub(super) query: &'a [f32],
    pub(super) key_value: &'a [f32],
    pub(super) scales: &'a [f32],
}

impl AttentionBlockOp {
    /// The op on `x` with `changes` to its projections. Its second and third inputs are the
    /// query's update and the key's and value's side by side in each row (one copy where both
    /// have one), or the scales one after another.
    pub fn apply(mut self, x: &Tensor, changes: ProjectionChanges) -> Result<Tensor> {
        let ProjectionChanges { query, key, value } = changes;
        let changes = [query, key, value];
        self.kinds = changes.each_ref().map(|c| match c {
            None => Kind::None,
            Some(ProjectionChange::Add(_)) => Kind::Add,
            Some(ProjectionChange::Scale(_)) => Kind::Scale,
        });
        let tensors =
            changes.map(|c| c.map(|(ProjectionChange::Add(t) | ProjectionChange::Scale(t))| t));
        let empty = || Tensor::zeros(0, DType::F32, x.device());
        if self.scaling() {
            if self.kinds.contains(&Kind::Add) || self.prefix.is_some() {
                candle_core::bail!("fused attention: scales mixed with updates or a prefix");
            }
            let scales = (tensors.into_iter().flatten())
                .map(|t| t.flatten_all())
                .collect::<Result<Vec<_>>>()?;
            return x
                .contiguous()?
                .apply_op3(&Tensor::cat(&scales, 0)?, &empty()?, self);
        }
        let [query, key, value] = tensors;
        let query = match query {
            Some(q) => q.contiguous()?,
            None => empty()?,
        };
        let key_value = match [key, value] {
            [Some(k), Some(v)] => Tensor::cat(&[k, v], 2)?,
            [Some(one), None] | [None, Some(one)] => one.contiguous()?,
            [None, None] => empty()?,
        };
        x.contiguous()?.apply_op3(&query, &key_value, self)
    }

    /// Whether some projection is scaled (the op's inputs are then the scales).
    pub(super) fn scaling(&self) -> bool {
        self.kinds.contains(&Kind::Scale)
    }

    /// How many of the key and value projections have an update: the width of their input, in
    /// hidden sizes.
    pub(super) fn key_value_updates(&self) -> usize {
        (self.kinds[1..].iter())
            .filter(|k| **k == Kind::Add)
            .count()
    }

    /// Where the key's and the value's updates start in a row of their input (`None`: no
    /// update).
    pub(super) fn key_value_columns(&self, hidden: usize) -> [Option<usize>; 2] {
        let key = (self.kinds[1] == Kind::Add).then_some(0);
        let value = (self.kinds[2] == Kind::Add).then_some(key.map_or(0, |_| hidden));
        [key, value]
    }

    /// The op's change inputs `a` and `b` as what they hold.
    pub(super) fn change_values<'a>(&self, a: &'a [f32], b: &'a [f32]) -> ChangeValues<'a> {
        match self.scaling() {
            true => ChangeValues {
                query: &[],
                key_value: &[],
                scales: a,
            },
            false => ChangeValues {
                query: a,
                key_value: b,
                scales: &[],
            },
        }
    }

    /// The rows of the updates for `sequences` of the batch (and all the scales).
    pub(super) fn update_rows<'a>(
        &self,
        updates: ChangeValues<'a>,
        sequences: &Range<usize>,
        seq: usize,
        d: Dims,
    ) -> ChangeValues<'a> {
        let q_len = (self.kinds[0] == Kind::Add) as usize * d.queries * d.hidden;
        let kv_len = self.key_value_updates() * seq * d.hidden;
        let n = sequences.len();
        ChangeValues {
            query: &updates.query[sequences.start * q_len..][..n * q_len],
            key_value: &updates.key_value[sequences.start * kv_len..][..n * kv_len],
            scales: updates.scales,
        }
    }

    /// Each projection's `values` times its scale, where it has one (a copy), else as they are.
    pub(super) fn scaled<'v>(
        &self,
        values: [&'v [f32]; 3],
        scales: &[f32],
        hidden: usize,
    ) -> [Cow<'v, [f32]>; 3] {
        let mut scales = scales.chunks_exact(hidden);
        let mut kinds = self.kinds.iter();
        values.map(|values| match (kinds.next(), &mut scales) {
            (Some(Kind::Scale), scales) => {
                let scale = scales
                    .next()
                    .expect("one scale per scaled projection (dims)");
                Cow::Owned(scaled_rows(values, scale))
            }
            _ => Cow::Borrowed(values),
        })
    }

    /// For each scaled projection, its scale's gradient from `grads` (of the scaled output) and
    /// its unscaled `values`, `sum over rows of grad * value`, added into `dscales`; then
    /// `grads` times the scale: the gradient of the unscaled output.
    pub(super) fn scale_grads(
        &self,
        values: [&[f32]; 3],
        grads: &mut [Vec<f32>; 3],
        scales: &[f32],
        mut dscales: Option<&mut [f32]>,
        hidden: usize,
    ) {
        let scaled = (self.kinds.iter().zip(values).zip(grads))
            .filter(|((kind, _), _)| **kind == Kind::Scale);
        for (index, ((_, values), grad)) in scaled.enumerate() {
            let scale = &scales[index * hidden..][..hidden];
            if let Some(dscales) = dscales.as_deref_mut() {
                add_scale_grad(&mut dscales[index * hidden..][..hidden], grad, values);
            }
            scale_rows(grad, scale);
        }
    }

    /// The updates' gradients of a block of rows: `dq`'s into `query`, `dk`'s and `dv`'s side
    /// by side into `key_value` (as far as each has an update).
    pub(super) fn update_grads(
        &self,
        [dq, dk, dv]: [&[f32]; 3],
        hidden: usize,
        query: Option<&mut [f32]>,
        key_value: Option<&mut [f32]>,
    ) {
        if let Some(query) = query {
            query.copy_from_slice(dq);
        }
        let Some(key_value) = key_value else {
            return;
        };
        let width = self.key_value_updates() * hidden;
        for (grad, column) in [dk, dv].into_iter().zip(self.key_value_columns(hidden)) {
            let Some(column) = column else { continue };
            let rows = key_value.chunks_exact_mut(width);
            for (row, grad) in rows.zip(grad.chunks_exact(hidden)) {
                row[column..column + hidden].copy_from_slice(grad);
            }
        }
    }
}
