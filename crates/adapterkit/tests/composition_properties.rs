//! A differential property test of composition: random adapters of every placement and option
//! we support, random setups from AdapterHub's grammar, random padded batches, random
//! AdapterDrop; the composed encoder (with and without sharing the layers below the lowest
//! adapter, at every position and by the first-position path the heads take) against
//!
//! - an oracle that runs the definition (`Oracle`): each row finds its own path through
//!   Parallel and BatchSplit by arithmetic (`row_setup`), then adapters are steps on the
//!   stream, Average the weighted mean of its children's streams, the last adapter finishes;
//! - each channel that is one adapter against that adapter alone (`AdapterModel`, itself
//!   checked against PyTorch + `adapters` 1.3) on the same rows.
//!
//! A failing case prints its `--setup` string, the batch, the dropped layers and the configs of
//! the adapters it names.

mod common;
#[path = "composition_properties/random.rs"]
mod random;

use std::collections::{BTreeMap, BTreeSet};

use adapterkit::adapter_model::AdapterModel;
use adapterkit::batch::Batch;
use adapterkit::composed_model::ComposedModel;
use adapterkit::methods::adapter::Adapter;
use adapterkit::methods::bottleneck::{BottleneckAdapter, BottleneckAdapters};
use adapterkit::methods::bottleneck_config::BnConfig;
use adapterkit::methods::composition::{Composition, Setup};
use adapterkit::model::hooks::{LayerHooks, Position};
use adapterkit::model::layer::Positions;
use adapterkit::model::layer_norm::LayerNorm;
use adapterkit::model::{BertModel, Mode};
use adapterkit::rng::SeededRng;
use candle_core::{Result as CandleResult, Tensor};
use common::*;
use random::{chance, random_batch, random_config, random_task, Grammar};

const CASES: usize = 1000;
const ADAPTERS: usize = 5;
const TOLERANCE: f32 = 1e-5;

fn rows_of(batch: &Batch, start: usize, len: usize) -> Batch {
    let cut = |t: &Tensor| t.narrow(0, start, len).unwrap();
    Batch {
        input_ids: cut(&batch.input_ids),
        token_type_ids: cut(&batch.token_type_ids),
        attention_mask: cut(&batch.attention_mask),
    }
}

fn replicated(batch: &Batch, times: usize) -> Batch {
    let rep = |t: &Tensor| Tensor::cat(&vec![t.clone(); times], 0).unwrap();
    Batch {
        input_ids: rep(&batch.input_ids),
        token_type_ids: rep(&batch.token_type_ids),
        attention_mask: rep(&batch.attention_mask),
    }
}

/// The setup that runs row `row` of `rows`: Parallel's children take equal consecutive parts,
/// BatchSplit's parts of its sizes; every other block passes all its rows to each child.
fn row_setup(setup: &Setup, row: usize, rows: usize) -> Setup {
    match setup {
        Setup::Adapter(_) | Setup::Fuse(_) => setup.clone(),
        Setup::Parallel(children) => {
            let part = rows / children.len();
            row_setup(&children[row / part], row % part, part)
        }
        Setup::BatchSplit {
            children,
            batch_sizes,
        } => {
            let mut start = 0;
            for (child, &size) in children.iter().zip(batch_sizes) {
                if row < start + size {
                    return row_setup(child, row - start, size);
                }
                start += size;
            }
            panic!("row {row} is outside the batch split {setup}")
        }
        Setup::Stack(children) => {
            Setup::Stack(children.iter().map(|c| row_setup(c, row, rows)).collect())
        }
        Setup::Average { children, weights } => Setup::Average {
            children: children.iter().map(|c| row_setup(c, row, rows)).collect(),
            weights: weights.clone(),
        },
    }
}

/// The definition, row by row.
struct Oracle<'a> {
    setup: &'a Setup,
    adapters: &'a BTreeMap<String, BottleneckAdapters>,
    rows: usize,
}

impl Oracle<'_> {
    fn adapter(&self, name: &str, layer: usize, position: Position) -> Option<&BottleneckAdapter> {
        let adapters = &self.adapters[name];
        if adapters.skip_layers.contains(&layer) {
            return None;
        }
        adapters.get(layer, position)
    }

    /// The stream after `setup`, and the last adapter that ran.
    fn eval(
        &self,
        setup: &Setup,
        stream: Tensor,
        at: (usize, Position),
        input: &Tensor,
        layer_norm: &LayerNorm,
    ) -> CandleResult<(Tensor, Option<&BottleneckAdapter>)> {
        match setup {
            Setup::Adapter(name) => match self.adapter(name, at.0, at.1) {
                Some(a) => Ok((
                    a.step(&stream, input, layer_norm, &mut Mode::Eval)?.0,
                    Some(a),
                )),
                None => Ok((stream, None)),
            },
            Setup::Stack(children) => {
                let (mut stream, mut last) = (stream, None);
                for child in children {
                    let (next, ran) = self.eval(child, stream, at, input, layer_norm)?;
                    stream = next;
                    last = ran.or(last);
                }
                Ok((stream, last))
            }
            Setup::Average { children, weights } => {
                let mut sum = stream.zeros_like()?;
                let mut last = None;
                let mut finishes = BTreeSet::new();
                for (child, w) in children.iter().zip(weights) {
                    let (s, ran) = self.eval(child, stream.clone(), at, input, layer_norm)?;
                    sum = (sum + (s * *w)?)?;
                    finishes.insert(ran.is_none_or(|a| a.config().original_ln_after));
                    last = ran.or(last);
                }
                if finishes.len() > 1 {
                    candle_core::bail!("the oracle's average: original_ln_after differs");
                }
                Ok((sum, last))
            }
            other => panic!("the oracle has no {other}"),
        }
    }
}

impl LayerHooks for Oracle<'_> {
    fn sub_layer_output(
        &self,
        layer: usize,
        position: Position,
        hidden: &Tensor,
        input: &Tensor,
        layer_norm: &LayerNorm,
        _mode: &mut Mode,
    ) -> CandleResult<Tensor> {
        // Neighbouring rows with the same setup run together: row by row, a stack of adapters
        // far from zero amplifies the rounding differences of other matmul shapes to 1e-4.
        let mut rows = Vec::new();
        let mut row = 0;
        while row < self.rows {
            let setup = row_setup(self.setup, row, self.rows);
            let mut n = 1;
            while row + n < self.rows && row_setup(self.setup, row + n, self.rows) == setup {
                n += 1;
            }
            let (h, x) = (hidden.narrow(0, row, n)?, input.narrow(0, row, n)?);
            row += n;
            let (stream, last) = self.eval(&setup, h, (layer, position), &x, layer_norm)?;
            rows.push(match last {
                Some(a) => a.finish(&stream, &x, layer_norm)?,
                None => layer_norm.of_sum(&[&stream, &x])?,
            });
        }
        Tensor::cat(&rows, 0)
    }
}

/// `got` against `want` within TOLERANCE, relative to `want`'s largest value when above 1 (a
/// stack of adapters scaled far from zero makes large streams).
fn check(got: &Tensor, want: &Tensor, what: impl FnOnce() -> String) {
    let diff = max_abs_diff(got, want);
    let largest = want
        .abs()
        .and_then(|t| t.flatten_all()?.max(0)?.to_scalar::<f32>())
        .unwrap();
    assert!(
        diff <= TOLERANCE * largest.max(1.0),
        "{}: {diff} off (largest value {largest})",
        what()
    );
}

/// One adapter, or a stack of one.
fn single_adapter(setup: &Setup) -> Option<&str> {
    match setup {
        Setup::Adapter(name) => Some(name),
        Setup::Stack(children) if children.len() == 1 => single_adapter(&children[0]),
        _ => None,
    }
}

struct Outcome {
    compared: bool,
    routed_outputs: usize,
    changed_by_adapters: bool,
    single_channels: usize,
    refused_average: bool,
}

fn run_case(case: usize, encoder: &BertModel) -> Outcome {
    let mut rng = SeededRng::new(0x5e7_u64 ^ (case as u64) << 8);
    let ln_after_off = chance(&mut rng, 0.15);
    let configs: Vec<BnConfig> = (0..ADAPTERS)
        .map(|_| random_config(&mut rng, ln_after_off))
        .collect();
    let mut tasks: Vec<AdapterModel> = configs
        .iter()
        .enumerate()
        .map(|(i, c)| random_task(encoder, &format!("t{i}"), c, rng.next_u64()))
        .collect();
    let batch_rows = 1 + rng.below(6);
    let setup = Grammar {
        rng: &mut rng,
        adapters: ADAPTERS,
    }
    .setup(batch_rows);
    let text = setup.to_string();
    let setup = Setup::parse(&text).unwrap_or_else(|e| panic!("case {case}: {text}: {e}"));
    let batch = random_batch(&mut rng, batch_rows);
    let skip: BTreeSet<usize> = match rng.below(5) {
        0 => [0].into(),    // --drop-lower 1
        1 => [1].into(),    // --skip-layers 1
        2 => [0, 1].into(), // every layer dropped
        _ => BTreeSet::new(),
    };
    for task in &mut tasks {
        task.set_skip_layers(&skip).unwrap();
    }
    let adapters: BTreeMap<String, BottleneckAdapters> = tasks
        .iter()
        .map(|t| {
            let a = t.adapter.as_ref().unwrap().bottleneck().unwrap().clone();
            (a.name.clone(), a)
        })
        .collect();
    let described = || {
        let names = setup.names();
        let configs: Vec<String> = names
            .iter()
            .map(|n| {
                let i: usize = n[1..].parse().unwrap();
                format!("  {n}: {}", serde_json::to_string(&configs[i]).unwrap())
            })
            .collect();
        format!(
            "case {case}: --setup '{setup}' on {batch_rows} rows of {:?} (mask {:?}), skip_layers {skip:?}\n{}",
            ids_of(&batch.input_ids),
            ids_of(&batch.attention_mask),
            configs.join("\n")
        )
    };

    let channels = setup.parallel_channels();
    let rows = batch_rows * channels;
    let oracle = Oracle {
        setup: &setup,
        adapters: &adapters,
        rows,
    };
    let expected = encoder.forward(&replicated(&batch, channels), &oracle, &mut Mode::Eval);
    let mut model = ComposedModel {
        encoder: encoder.clone(),
        composition: Composition::new(
            setup.clone(),
            adapters
                .values()
                .map(|a| (a.name.clone(), Adapter::of_bottleneck(a.clone())))
                .collect(),
            BTreeMap::new(),
        )
        .unwrap(),
        heads: vec![],
        share_base_layers: true,
    };
    let got = model.hidden(&batch, Positions::All, &mut Mode::Eval);
    let expected = match (expected, got) {
        (Ok(expected), Ok(got)) => {
            check(&got, &expected, || {
                format!("{}\nshared, against the oracle", described())
            });
            expected
        }
        (Err(oracle), Err(ours)) => {
            // Average over adapters that end the sub-layer differently: both refuse.
            let ours = ours.to_string();
            assert!(
                ours.contains("original_ln_after") && ours.contains("layer"),
                "{}\nunclear error: {ours} (oracle: {oracle})",
                described()
            );
            return Outcome {
                compared: false,
                routed_outputs: 0,
                changed_by_adapters: false,
                single_channels: 0,
                refused_average: true,
            };
        }
        (expected, got) => panic!(
            "{}\nthe oracle gives {:?}, we give {:?}",
            described(),
            expected.err(),
            got.err()
        ),
    };

    model.share_base_layers = false;
    let unshared = model
        .hidden(&batch, Positions::All, &mut Mode::Eval)
        .unwrap();
    check(&unshared, &expected, || {
        format!("{}\nunshared, against the oracle", described())
    });

    // The first-position path the heads take.
    model.share_base_layers = true;
    let first = model
        .hidden(&batch, Positions::First, &mut Mode::Eval)
        .unwrap();
    check(&first, &expected.narrow(1, 0, 1).unwrap(), || {
        format!("{}\nfirst position, against the oracle", described())
    });

    // Each channel that is one adapter, against that adapter alone on the same rows.
    let mut single_channels = 0;
    for channel in setup.channels(0..rows).unwrap() {
        let Some(name) = single_adapter(&channel.setup) else {
            continue;
        };
        let task = &tasks[name[1..].parse::<usize>().unwrap()];
        let start = channel.rows.start % batch_rows;
        let alone_batch = rows_of(&batch, start, channel.rows.len());
        let alone = task
            .encoder
            .forward(&alone_batch, task.hooks(), &mut Mode::Eval)
            .unwrap();
        let ours = expected
            .narrow(0, channel.rows.start, channel.rows.len())
            .unwrap();
        check(&ours, &alone, || {
            format!(
                "{}\nchannel {:?} against {name} alone",
                described(),
                channel.rows
            )
        });
        single_channels += 1;
    }

    // Logits through `ComposedModel::new`'s routing, where the setup gives each head its rows:
    // each (head, text) once at most, every text some head.
    let mut routed_outputs = 0;
    if let Ok(routed) = ComposedModel::new(encoder.clone(), setup.clone(), tasks.clone()) {
        let mut seen = BTreeSet::new();
        let channels = setup.channels(0..rows).unwrap();
        for task in routed.logits(&batch, &mut Mode::Eval).unwrap() {
            let head = &routed.heads[task.head];
            let name = &head.name;
            assert!(
                task.rows.end <= batch_rows,
                "{}\nrows {:?}",
                described(),
                task.rows
            );
            for row in task.rows.clone() {
                assert!(
                    seen.insert((name.clone(), row)),
                    "{}\n{name} twice on {row}",
                    described()
                );
            }
            let channel_rows = channels
                .iter()
                .filter(|c| c.setup.head_name() == *name)
                .map(|c| c.rows.clone())
                .find(|r| r.start % batch_rows == task.rows.start)
                .expect("a channel for every output");
            let states = expected
                .narrow(0, channel_rows.start, task.rows.len())
                .unwrap();
            let want = head.forward(&states, &mut Mode::Eval).unwrap();
            check(&task.logits, &want, || {
                format!("{}\nhead {name}", described())
            });
            routed_outputs += 1;
        }
        let texts: BTreeSet<usize> = seen.iter().map(|(_, row)| *row).collect();
        assert_eq!(
            texts.len(),
            batch_rows,
            "{}\nsome text has no head",
            described()
        );
    }

    let plain = encoder
        .forward(
            &replicated(&batch, channels),
            &adapterkit::model::hooks::NoHooks,
            &mut Mode::Eval,
        )
        .unwrap();
    Outcome {
        compared: true,
        routed_outputs,
        changed_by_adapters: max_abs_diff(&plain, &expected) > 1e-3,
        single_channels,
        refused_average: false,
    }
}

#[test]
fn every_setup_equals_its_parts() {
    let encoder = tiny_encoder();
    let outcomes: Vec<Outcome> = (0..CASES).map(|case| run_case(case, &encoder)).collect();
    let compared = outcomes.iter().filter(|o| o.compared).count();
    let changed = outcomes.iter().filter(|o| o.changed_by_adapters).count();
    let singles: usize = outcomes.iter().map(|o| o.single_channels).sum();
    let routed: usize = outcomes.iter().map(|o| o.routed_outputs).sum();
    let refused = outcomes.iter().filter(|o| o.refused_average).count();
    eprintln!(
        "{CASES} cases: {compared} compared ({changed} changed by their adapters), \
         {singles} one-adapter channels checked against the adapter alone, \
         {routed} outputs routed to heads, \
         {refused} averages refused (original_ln_after differs)"
    );
    // Not vacuous: most setups compute something other than the base model, many channels
    // are checked against an adapter alone, and most cases run.
    assert!(compared > CASES * 8 / 10, "{compared}");
    assert!(changed > compared * 7 / 10, "{changed} of {compared}");
    assert!(singles > CASES / 2, "{singles}");
    assert!(routed > CASES, "{routed} outputs routed to heads");
}

#[test]
fn an_average_that_cannot_be_taken_is_refused_by_name() {
    let encoder = tiny_encoder();
    let mut rng = SeededRng::new(7);
    let mut with_ln = random_config(&mut rng, false);
    with_ln.leave_out.clear();
    with_ln.output_adapter = true;
    let mut without_ln = with_ln.clone();
    without_ln.original_ln_after = false;
    let tasks = vec![
        random_task(&encoder, "t0", &with_ln, 1),
        random_task(&encoder, "t1", &without_ln, 2),
    ];
    let model =
        ComposedModel::new(encoder, Setup::parse("average(t0,t1)").unwrap(), tasks).unwrap();
    let error = model
        .logits(&random_batch(&mut rng, 2), &mut Mode::Eval)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("average(t0,t1)") && error.contains("original_ln_after"),
        "{error}"
    );
}

#[test]
fn the_grammar_matches_the_parser() {
    // Every generated setup is one a user can write, and its channels cover the batch.
    let mut rng = SeededRng::new(11);
    for _ in 0..500 {
        let batch = 1 + rng.below(4);
        let setup = Grammar {
            rng: &mut rng,
            adapters: 3,
        }
        .setup(batch);
        let text = setup.to_string();
        Setup::parse(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
        let rows = batch * setup.parallel_channels();
        let channels = setup.channels(0..rows).unwrap();
        let starts = channels.iter().map(|c| c.rows.start);
        let ends = [0].into_iter().chain(channels.iter().map(|c| c.rows.end));
        assert!(
            starts.zip(ends).all(|(s, e)| s == e),
            "{text}: {channels:?}"
        );
        assert_eq!(channels.last().map(|c| c.rows.end), Some(rows), "{text}");
    }
}
