//! The fused attention block against its ops node by node.

use super::*;
use crate::kernels::attention::AttentionOp;
use crate::kernels::fused::testing::{assert_same_output_and_grads, frozen, random};
use crate::model::ops::{attention, attention_bias, attention_dropout, linear};
use crate::model::Mode;
use crate::rng::SeededRng;
use candle_core::{Device, Var};
use candle_nn::Linear;

/// Output, `dL/dx` and the updates' gradients of the block op against its Linears and the
/// attention op node by node, with q, k and v kept and recomputed, with and without
/// dropout, with a padded sequence, small, split over threads and over backward blocks,
/// every position querying and only the first, with and without a prefix of keys and
/// values (one of whose positions is hidden from the first sequence), with updates or scales of
/// none, some and all of q, k and v, and with an input that takes no gradient.
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
        // What changes q, k and v (an update added, a scale), and whether `x` takes a
        // gradient, by turns.
        let (n, a, s) = ('-', '+', '*');
        let changed = [
            ([n, n, n], true),
            ([a, n, a], true),
            ([n, s, s], true),
            ([n, a, n], true),
            ([s, s, s], false),
            ([a, a, a], false),
            ([s, n, n], true),
            ([n, n, a], false),
        ];
        let variants = variants.flat_map(|v| kept_or_recomputed.map(|a| (v, a)));
        for (i, (((p, first_only), with_prefix), activations)) in variants.enumerate() {
            let (changed, x_grad) = changed[i % changed.len()];
            // Scales take no prefix.
            let with_prefix = with_prefix && !changed.contains(&s);
            let x = match x_grad {
                true => x.clone(),
                false => Var::from_tensor(&x.as_tensor().detach())?,
            };
            let x_input = match x_grad {
                true => x.as_tensor().clone(),
                false => x.as_tensor().detach(),
            };
            let queries = if first_only { 1 } else { seq };
            let r = random(&mut rng, &[batch, queries, hidden])?;
            let (mut node_mode, mut fused_mode) = (Mode::train(9), Mode::train(9));
            let linears: Vec<Linear> = weights
                .iter()
                .map(|(w, b)| Linear::new(w.clone(), Some(b.clone())))
                .collect();
            let x_q = x_input.narrow(1, 0, queries)?;
            let shapes = [queries, seq, seq].map(|rows| vec![batch, rows, hidden]);
            let mut changes = Vec::new();
            for (kind, shape) in changed.iter().zip(shapes) {
                changes.push(match *kind {
                    '+' => Some(Var::from_tensor(&random(&mut rng, &shape)?)?),
                    '*' => Some(Var::from_tensor(&(random(&mut rng, &[hidden])? + 1.0)?)?),
                    _ => None,
                });
            }
            let changed_output = |t: Tensor, i: usize| match (changed[i], &changes[i]) {
                ('+', Some(u)) => t + u.as_tensor(),
                ('*', Some(s)) => t.broadcast_mul(s.as_tensor()),
                _ => Ok(t),
            };
            let q = changed_output(linear(&linears[0], &x_q)?, 0)?;
            let [k, v] = [1, 2].map(|i| changed_output(linear(&linears[i], &x_input)?, i));
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
            let change = |i: usize| {
                let t = changes[i].as_ref()?.as_tensor().clone();
                Some(match changed[i] {
                    '+' => ProjectionChange::Add(t),
                    _ => ProjectionChange::Scale(t),
                })
            };
            let projection_changes = ProjectionChanges {
                query: change(0),
                key: change(1),
                value: change(2),
            };
            let fused = op.apply(&x_input, projection_changes)?;
            let what = format!(
                "p = {p}, first query only: {first_only}, prefix: {with_prefix}, \
                 {activations:?}, changes {changed:?}, dx {x_grad}"
            );
            let inputs: Vec<&Var> = (x_grad.then_some(&x).into_iter())
                .chain(changes.iter().flatten())
                .collect();
            assert_same_output_and_grads(&nodes, &fused, &inputs, &r, &what)?;
        }
    }
    Ok(())
}
