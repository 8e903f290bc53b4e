//! The encoder cannot skip a hook: whatever path a block takes (one fused op for frozen
//! weights, node by node otherwise), a change the hooks make to a Linear or to the keys and
//! values reaches the output, and a change that changes nothing gives the fused path's output.

mod common;

use candle_core::{Device, Result, Tensor};

use adapterkit::batch::Batch;
use adapterkit::model::hooks::{KeyValue, KeyValueChange, LayerHooks, LinearChange, LinearSite};
use adapterkit::model::layer::Positions;
use adapterkit::model::{BertModel, Mode, NoHooks};
use common::{max_abs_diff, tiny_encoder};

/// Scales one Linear's output (or the keys and values) of one layer by `1 + shift` (a shift
/// alone would be lost on the keys: softmax ignores what every score gains).
struct Shift {
    layer: usize,
    site: Option<LinearSite>,
    shift: f64,
}

impl LayerHooks for Shift {
    fn linear(&self, layer: usize, site: LinearSite) -> Option<LinearChange<'_>> {
        if layer != self.layer || Some(site) != self.site {
            return None;
        }
        Some(Box::new(|_x: &Tensor, out: Tensor, _mode: &mut Mode| {
            out * (1.0 + self.shift)
        }))
    }

    fn key_value(&self, layer: usize) -> Option<KeyValueChange<'_>> {
        if layer != self.layer || self.site.is_some() {
            return None;
        }
        Some(Box::new(|kv: KeyValue| {
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
                        let shift = |shift| Shift { layer, site, shift };
                        let changed = run(encoder, &shift(3.0), positions, train);
                        let case = format!(
                            "{site:?} in layer {layer}, {path} path, train {train}, {positions:?}"
                        );
                        let moved = max_abs_diff(&base, &changed);
                        assert!(moved > 1e-4, "{case}: the change was skipped");
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
