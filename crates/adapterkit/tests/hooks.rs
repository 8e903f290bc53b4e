//! The encoder cannot skip a hook: whatever path a block takes (one fused op for frozen
//! weights, node by node otherwise), a change the hooks make to a Linear reaches the output,
//! given as weights or applied to the output alike, a prefix of keys and values reaches it
//! alike on both paths, and a change that changes nothing gives the fused path's output.

mod common;

use candle_core::{Device, Result, Tensor, Var};
use candle_nn::Linear;

use adapterkit::model::hooks::{KeyValuePrefix, LayerHooks, LinearChange, LinearSite};
use adapterkit::model::layer::Positions;
use adapterkit::model::{Mode, NoHooks};
use common::{max_abs_diff, run_encoder, tiny_encoder};

/// Scales one Linear's output of one layer by `1 + shift`, as a change applied to the output
/// or (`as_weights`) as the Linear's weights scaled.
struct Shift {
    layer: usize,
    site: LinearSite,
    shift: f64,
    as_weights: bool,
}

impl LayerHooks for Shift {
    fn linear(&self, layer: usize, site: LinearSite, base: &Linear) -> Option<LinearChange<'_>> {
        if layer != self.layer || site != self.site {
            return None;
        }
        let factor = 1.0 + self.shift;
        if self.as_weights {
            let weight = (base.weight() * factor).unwrap();
            let bias = base.bias().map(|b| (b * factor).unwrap());
            return Some(LinearChange::Weights(Linear::new(weight, bias)));
        }
        Some(LinearChange::Apply(Box::new(
            move |_x: &Tensor, out: Tensor, _mode: &mut Mode| out * factor,
        )))
    }
}

/// Three keys and values in front of one layer's own: fixed values, every query attending to
/// them or (`hidden`) none; as a tensor that tracks a gradient (`trainable`, which keeps the
/// block off the fused op) or not.
struct Prefix {
    layer: usize,
    hidden: bool,
    trainable: bool,
}

impl LayerHooks for Prefix {
    fn key_value_prefix(
        &self,
        layer: usize,
        input: &Tensor,
        _mode: &mut Mode,
    ) -> Result<Option<KeyValuePrefix>> {
        if layer != self.layer {
            return Ok(None);
        }
        let (rows, _, hidden) = input.dims3()?;
        let values = Tensor::arange(0f32, (3 * hidden) as f32, input.device())?
            .reshape((1, 3, hidden))?
            .sin()?;
        let values = match self.trainable {
            true => Var::from_tensor(&values)?.as_tensor().clone(),
            false => values,
        };
        let values = values.broadcast_as((rows, 3, hidden))?;
        let mask = if self.hidden { f32::MIN } else { 0.0 };
        Ok(Some(KeyValuePrefix {
            keys: (&values * 2.0)?,
            values,
            bias: Tensor::full(mask, (rows, 1, 1, 3), input.device())?,
        }))
    }
}

#[test]
fn every_change_reaches_the_output_on_the_fused_and_the_plain_path() -> Result<()> {
    let frozen = tiny_encoder();
    let mut trainable = tiny_encoder();
    trainable.make_trainable(|_| true).unwrap();
    let layers = frozen.layers.len();
    let sites = LinearSite::ATTENTION
        .into_iter()
        .chain(LinearSite::FEED_FORWARD);
    for site in sites {
        for layer in 0..layers {
            for (encoder, path) in [(&frozen, "fused"), (&trainable, "plain")] {
                for train in [false, true] {
                    for positions in [Positions::All, Positions::First] {
                        let base = run_encoder(encoder, &NoHooks, positions, train);
                        let shift = |shift| Shift {
                            layer,
                            site,
                            shift,
                            as_weights: false,
                        };
                        let changed = run_encoder(encoder, &shift(3.0), positions, train);
                        // The same change as weights runs fused where the block is frozen.
                        let as_weights = Shift {
                            as_weights: true,
                            ..shift(3.0)
                        };
                        let by_weights = run_encoder(encoder, &as_weights, positions, train);
                        let paths = max_abs_diff(&changed, &by_weights);
                        let case = format!(
                            "{site:?} in layer {layer}, {path} path, train {train}, {positions:?}"
                        );
                        let moved = max_abs_diff(&base, &changed);
                        assert!(moved > 1e-4, "{case}: the change was skipped");
                        assert!(paths < 1e-5, "{case}: as weights, {paths} off");
                        // No change: the node-by-node path gives what the fused op gives.
                        let unchanged = run_encoder(encoder, &shift(0.0), positions, train);
                        let diff = max_abs_diff(&base, &unchanged);
                        assert!(diff < 1e-5, "{case}: the paths differ by {diff}");
                    }
                }
            }
        }
    }
    Ok(())
}

/// A prefix reaches the output alike on the fused op (frozen encoder, prefix without a
/// gradient), node by node because the prefix trains, and node by node because the encoder
/// trains, with and without dropout; a prefix no query attends to changes nothing.
#[test]
fn a_prefix_reaches_the_output_alike_on_every_path() -> Result<()> {
    let frozen = tiny_encoder();
    let mut trainable = tiny_encoder();
    trainable.make_trainable(|_| true).unwrap();
    for layer in 0..frozen.layers.len() {
        for train in [false, true] {
            for positions in [Positions::All, Positions::First] {
                let case = format!("layer {layer}, train {train}, {positions:?}");
                let prefix = |hidden, trainable| Prefix {
                    layer,
                    hidden,
                    trainable,
                };
                let fused = run_encoder(&frozen, &prefix(false, false), positions, train);
                let base = run_encoder(&frozen, &NoHooks, positions, train);
                let moved = max_abs_diff(&base, &fused);
                assert!(moved > 1e-4, "{case}: the prefix was skipped");
                for (encoder, hooks, path) in [
                    (&frozen, prefix(false, true), "trained prefix"),
                    (&trainable, prefix(false, false), "trained encoder"),
                ] {
                    let plain = run_encoder(encoder, &hooks, positions, train);
                    let diff = max_abs_diff(&fused, &plain);
                    assert!(diff < 1e-5, "{case}: {path} is {diff} off the fused op");
                }
                // (In training the attention's dropout draws over the prefix too.)
                let paths = [(&frozen, "fused"), (&trainable, "plain")];
                for (encoder, path) in paths.into_iter().filter(|_| !train) {
                    let hidden = run_encoder(encoder, &prefix(true, false), positions, train);
                    let diff =
                        max_abs_diff(&run_encoder(encoder, &NoHooks, positions, train), &hidden);
                    assert!(
                        diff < 1e-5,
                        "{case}, {path}: a hidden prefix moved it by {diff}"
                    );
                }
            }
        }
    }
    Ok(())
}

/// `hooks` with each update or scale they give a Linear's output applied to the output instead,
/// which sends the block node by node.
struct NodeByNode<'a>(&'a dyn LayerHooks);

impl LayerHooks for NodeByNode<'_> {
    fn linear(&self, layer: usize, site: LinearSite, base: &Linear) -> Option<LinearChange<'_>> {
        match self.0.linear(layer, site, base)? {
            LinearChange::Add(update) => Some(LinearChange::Apply(Box::new(
                move |x: &Tensor, out: Tensor, mode: &mut Mode| {
                    out.broadcast_add(&update(x, mode)?)
                },
            ))),
            LinearChange::Scale(scale) => Some(LinearChange::Apply(Box::new(
                move |_: &Tensor, out: Tensor, mode: &mut Mode| out.broadcast_mul(&scale(mode)?),
            ))),
            other => Some(other),
        }
    }
}

/// A trained LoRA's updates of q, k and v, and (IA)³'s scales of k, v and the expansion, are
/// inputs of the fused ops: outputs and every gradient match the same module node by node, for
/// a LoRA on q and v, on q, k and v with dropout and the feed-forward block's Linears, gated
/// (UniPELT's), and (IA)³ (with random vectors), at every position and the first, in training
/// and evaluation. In bf16 the fused ops' products are bf16 (the node path's f32): so they ran.
#[test]
fn trained_loras_and_ia3_run_in_the_fused_ops_as_node_by_node() -> Result<()> {
    use adapterkit::methods::lora::{Lora, LoraConfig, LoraInit};
    use adapterkit::model::Precision;
    let encoder = tiny_encoder();
    let mut in_bf16 = encoder.clone();
    in_bf16.set_precision(Precision::Bf16)?;
    let mut q_v = LoraConfig::preset("lora").unwrap();
    q_v.init_weights = LoraInit::Bert; // B is not zero: the updates move the output.
    let mut everywhere = q_v.clone();
    everywhere.attn_matrices = ["q", "k", "v"].map(String::from).to_vec();
    (
        everywhere.dropout,
        everywhere.intermediate_lora,
        everywhere.output_lora,
    ) = (0.1, true, true);
    let mut gated = q_v.clone();
    gated.other.insert("use_gating".into(), true.into());
    let mut ia3 = LoraConfig::preset("ia3").unwrap();
    ia3.init_weights = LoraInit::Bert; // Vectors that are not all ones.
    let configs = [
        ("q_v", q_v),
        ("everywhere", everywhere),
        ("gated", gated),
        ("ia3", ia3),
    ];
    for (name, config) in configs {
        let mut rng = adapterkit::rng::SeededRng::new(3);
        let lora = Lora::new(name, &config, &encoder.config, &mut rng, &Device::Cpu).unwrap();
        let bare = run_encoder(&encoder, &NoHooks, Positions::All, false);
        let moved = max_abs_diff(&bare, &run_encoder(&encoder, &lora, Positions::All, false));
        assert!(moved > 1e-3, "{name}: the LoRA moved nothing");
        for (train, positions) in [false, true]
            .into_iter()
            .flat_map(|t| [Positions::All, Positions::First].map(|p| (t, p)))
        {
            let case = format!("{name}, train {train}, {positions:?}");
            let loss_and_grads = |encoder: &adapterkit::model::BertModel,
                                  hooks: &dyn LayerHooks| {
                let out = run_encoder(encoder, hooks, positions, train);
                let weights = Tensor::arange(0f32, out.elem_count() as f32, &Device::Cpu)?
                    .reshape(out.shape())?
                    .cos()?;
                let grads = (&out * weights)?.sum_all()?.backward()?;
                let grads: Vec<(String, Tensor)> = (lora.params().iter())
                    .map(|(n, v)| (n.clone(), grads.get(v.as_tensor()).unwrap().clone()))
                    .collect();
                Ok::<_, candle_core::Error>((out, grads))
            };
            let (fused, fused_grads) = loss_and_grads(&encoder, &lora)?;
            let (nodes, node_grads) = loss_and_grads(&encoder, &NodeByNode(&lora))?;
            let diff = max_abs_diff(&fused, &nodes);
            assert!(diff < 1e-5, "{case}: the output differs by {diff}");
            for ((param, a), (_, b)) in fused_grads.iter().zip(&node_grads) {
                let diff = max_abs_diff(a, b);
                let scale = (b.abs()?.max_all()?.to_scalar::<f32>()?).max(1.0);
                assert!(
                    diff < 1e-5 * scale,
                    "{case}: {param}'s gradient differs by {diff}"
                );
            }
            let fused = run_encoder(&in_bf16, &lora, positions, train);
            let nodes = run_encoder(&in_bf16, &NodeByNode(&lora), positions, train);
            let diff = max_abs_diff(&fused, &nodes);
            assert!(diff > 0.0 && diff < 0.05, "{case}: bf16 is {diff} off f32");
        }
    }
    Ok(())
}
