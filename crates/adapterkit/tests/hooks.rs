//! The encoder cannot skip a hook: whatever path a block takes (one fused op for frozen
//! weights, node by node otherwise), a change the hooks make to a Linear or to the keys and
//! values reaches the output, given as weights or applied to the output alike, and a change that
//! changes nothing gives the fused path's output.

mod common;

use candle_core::{Device, Result, Tensor};
use candle_nn::Linear;

use adapterkit::batch::Batch;
use adapterkit::model::hooks::{KeyValue, KeyValueChange, LayerHooks, LinearChange, LinearSite};
use adapterkit::model::layer::Positions;
use adapterkit::model::{BertModel, Mode, NoHooks};
use common::{max_abs_diff, tiny_encoder};

/// Scales one Linear's output (or the keys and values) of one layer by `1 + shift` (a shift
/// alone would be lost on the keys: softmax ignores what every score gains), as a change
/// applied to the output or (`as_weights`) as the Linear's weights scaled.
struct Shift {
    layer: usize,
    site: Option<LinearSite>,
    shift: f64,
    as_weights: bool,
}

impl LayerHooks for Shift {
    fn linear(&self, layer: usize, site: LinearSite, base: &Linear) -> Option<LinearChange<'_>> {
        if layer != self.layer || Some(site) != self.site {
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

    fn key_value(&self, layer: usize) -> Option<KeyValueChange<'_>> {
        if layer != self.layer || self.site.is_some() {
            return None;
        }
        Some(Box::new(|kv: KeyValue, _: &mut Mode| {
            Ok(KeyValue {
                key: (kv.key * (1.0 + self.shift))?,
                value: (kv.value * (1.0 + self.shift))?,
                ..kv
            })
        }))
    }
}

fn batch() -> Batch {
    let ids = Tensor::new(
        &[[2u32, 5, 6, 3, 8, 9, 3], [2, 11, 12, 95, 3, 0, 0]],
        &Device::Cpu,
    );
    let mask = Tensor::new(&[[1u32; 7], [1, 1, 1, 1, 1, 0, 0]], &Device::Cpu);
    Batch {
        input_ids: ids.unwrap(),
        token_type_ids: Tensor::zeros((2, 7), candle_core::DType::U32, &Device::Cpu).unwrap(),
        attention_mask: mask.unwrap(),
    }
}

fn run(encoder: &BertModel, hooks: &dyn LayerHooks, positions: Positions, train: bool) -> Tensor {
    let mut mode = if train { Mode::train(7) } else { Mode::Eval };
    encoder
        .forward_at(&batch(), positions, hooks, &mut mode)
        .unwrap()
}

#[test]
fn every_change_reaches_the_output_on_the_fused_and_the_plain_path() -> Result<()> {
    let frozen = tiny_encoder();
    let mut trainable = tiny_encoder();
    trainable.make_trainable(|_| true).unwrap();
    let layers = frozen.layers.len();
    let sites = LinearSite::ATTENTION
        .into_iter()
        .chain(LinearSite::FEED_FORWARD)
        .map(Some)
        .chain([None]);
    for site in sites {
        for layer in 0..layers {
            for (encoder, path) in [(&frozen, "fused"), (&trainable, "plain")] {
                for train in [false, true] {
                    for positions in [Positions::All, Positions::First] {
                        let base = run(encoder, &NoHooks, positions, train);
                        let shift = |shift| Shift {
                            layer,
                            site,
                            shift,
                            as_weights: false,
                        };
                        let changed = run(encoder, &shift(3.0), positions, train);
                        // The same change as weights runs fused where the block is frozen.
                        let as_weights = Shift {
                            as_weights: true,
                            ..shift(3.0)
                        };
                        let by_weights = run(encoder, &as_weights, positions, train);
                        let paths = max_abs_diff(&changed, &by_weights);
                        let case = format!(
                            "{site:?} in layer {layer}, {path} path, train {train}, {positions:?}"
                        );
                        let moved = max_abs_diff(&base, &changed);
                        assert!(moved > 1e-4, "{case}: the change was skipped");
                        if site.is_some() {
                            assert!(paths < 1e-5, "{case}: as weights, {paths} off");
                        }
                        // No change: the node-by-node path gives what the fused op gives.
                        let unchanged = run(encoder, &shift(0.0), positions, train);
                        let diff = max_abs_diff(&base, &unchanged);
                        assert!(diff < 1e-5, "{case}: the paths differ by {diff}");
                    }
                }
            }
        }
    }
    Ok(())
}
