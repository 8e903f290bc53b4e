//! Random inputs for the composition property test: bottleneck configs of every placement and
//! option, task adapters, setups from AdapterHub's grammar and padded batches, all from one
//! seeded generator.

use adapterkit::adapter_model::{AdapterModel, Method};
use adapterkit::batch::Batch;
use adapterkit::data::TaskKind;
use adapterkit::heads::HeadConfig;
use adapterkit::methods::bottleneck_config::{
    BnConfig, InitWeights, PostAdd, ReductionFactor, ResidualBeforeLn,
};
use adapterkit::methods::composition::Setup;
use adapterkit::model::ops::Activation;
use adapterkit::model::BertModel;
use adapterkit::rng::SeededRng;
use candle_core::{Device, Tensor};

pub fn chance(rng: &mut SeededRng, p: f64) -> bool {
    rng.uniform_f64() < p
}

fn pick<T: Clone>(rng: &mut SeededRng, items: &[T]) -> T {
    items[rng.below(items.len())].clone()
}

/// Any placement and option `BnConfig` supports. `original_ln_after` is off only when
/// `ln_after_off` allows it (Average needs its children to agree on it).
pub fn random_config(rng: &mut SeededRng, ln_after_off: bool) -> BnConfig {
    let mut c = BnConfig::preset(pick(rng, &["houlsby", "pfeiffer", "parallel"])).unwrap();
    c.mh_adapter = chance(rng, 0.6);
    c.output_adapter = !c.mh_adapter || chance(rng, 0.7);
    c.original_ln_before = chance(rng, 0.4);
    c.original_ln_after = !(ln_after_off && chance(rng, 0.5));
    c.ln_before = chance(rng, 0.3);
    c.ln_after = chance(rng, 0.3);
    c.is_parallel = chance(rng, 0.3);
    c.adapter_residual_before_ln = chance(rng, 0.3);
    c.residual_before_ln = match rng.below(3) {
        0 if c.original_ln_before => ResidualBeforeLn::PostAdd(PostAdd::PostAdd),
        1 => ResidualBeforeLn::Flag(false),
        _ => ResidualBeforeLn::Flag(true),
    };
    c.scaling = pick(rng, &[1.0, 0.5, 2.0]);
    c.non_linearity = pick(
        rng,
        &[
            Activation::Relu,
            Activation::Swish,
            Activation::Tanh,
            Activation::Gelu,
        ],
    );
    c.reduction_factor = ReductionFactor::Uniform(pick(rng, &[2.0, 4.0, 8.0]));
    c.leave_out = match rng.below(4) {
        0 => vec![0],
        1 => vec![1],
        _ => vec![],
    };
    // Weights far from zero (the zero up-projection of `mam_adapter` would hide everything).
    c.init_weights = InitWeights::Bert;
    c
}

pub fn random_task(encoder: &BertModel, name: &str, config: &BnConfig, seed: u64) -> AdapterModel {
    let labels: Vec<String> = ["x", "y", "z"].map(String::from).to_vec();
    let head = HeadConfig::new(TaskKind::Classification, &labels).unwrap();
    let method = Method::Adapter(config.clone().into());
    let model = AdapterModel::new(
        encoder.clone(),
        &method,
        name,
        head,
        false,
        seed,
        &Device::Cpu,
    )
    .unwrap();
    for (_, var) in model.trainable().iter() {
        var.set(&(var.as_tensor() * 8.0).unwrap()).unwrap();
    }
    model.frozen()
}

/// Random setups from AdapterHub's grammar (`ALLOWED_NESTINGS`, nothing below level 2 but
/// adapters), over adapters `t0..t{n-1}`, for a batch of `batch` rows. No Fuse: fusion layers
/// are checked against `adapters` 1.3 by `composition.rs`.
pub struct Grammar<'a> {
    pub rng: &'a mut SeededRng,
    pub adapters: usize,
}

impl Grammar<'_> {
    fn adapter(&mut self) -> Setup {
        Setup::Adapter(format!("t{}", self.rng.below(self.adapters)))
    }

    /// How many children a block gets: mostly 2 or 3, sometimes 1.
    fn children(&mut self) -> usize {
        if chance(self.rng, 0.1) {
            1
        } else {
            2 + self.rng.below(2)
        }
    }

    fn adapters(&mut self, at_least: usize) -> Vec<Setup> {
        (0..at_least + self.rng.below(2))
            .map(|_| self.adapter())
            .collect()
    }

    /// What level 2 may hold: an adapter or a stack of adapters.
    fn leaf(&mut self) -> Setup {
        if chance(self.rng, 0.3) {
            Setup::Stack(self.adapters(1))
        } else {
            self.adapter()
        }
    }

    fn sizes(&mut self, rows: usize, parts: usize) -> Vec<usize> {
        let mut sizes = vec![0; parts];
        for _ in 0..rows {
            sizes[self.rng.below(parts)] += 1;
        }
        sizes
    }

    fn weights(&mut self, parts: usize) -> Vec<f64> {
        let raw: Vec<f64> = (0..parts).map(|_| 0.1 + self.rng.uniform_f64()).collect();
        let total: f64 = raw.iter().sum();
        raw.iter().map(|w| w / total).collect()
    }

    /// A batch split of `rows` whose children are made for their parts by `child`.
    fn batch_split(&mut self, rows: usize, child: impl Fn(&mut Self, usize) -> Setup) -> Setup {
        let parts = self.children();
        let batch_sizes = self.sizes(rows, parts);
        Setup::BatchSplit {
            children: batch_sizes.iter().map(|&size| child(self, size)).collect(),
            batch_sizes,
        }
    }

    /// A child at level 1 of `parent` (`parallel`, `batch_split`, `average` or `stack`), which
    /// sees `rows` rows.
    fn child(&mut self, parent: &str, rows: usize) -> Setup {
        let kinds: &[&str] = match parent {
            "parallel" | "batch_split" => &["adapter", "stack", "batch_split", "average"],
            "average" => &["adapter", "stack", "batch_split"],
            _ => &["adapter", "batch_split", "average"],
        };
        match pick(self.rng, kinds) {
            "adapter" => self.adapter(),
            "stack" => Setup::Stack(self.adapters(1)),
            "batch_split" => self.batch_split(rows, |g, _| g.leaf()),
            _ => {
                let children: Vec<Setup> = (0..self.children()).map(|_| self.leaf()).collect();
                Setup::Average {
                    weights: self.weights(children.len()),
                    children,
                }
            }
        }
    }

    pub fn setup(&mut self, batch: usize) -> Setup {
        let channels = self.children();
        match self.rng.below(4) {
            0 => Setup::Parallel(
                (0..channels)
                    .map(|_| self.child("parallel", batch))
                    .collect(),
            ),
            1 => self.batch_split(batch, |g, rows| g.child("batch_split", rows)),
            2 => {
                let children: Vec<Setup> = (0..self.children())
                    .map(|_| self.child("average", batch))
                    .collect();
                Setup::Average {
                    weights: self.weights(children.len()),
                    children,
                }
            }
            _ => {
                // A stack with at most one parallel block: with one, everything in it sees the
                // batch replicated once per channel.
                let len = 1 + self.rng.below(3);
                let parallel_at = self.rng.below(len + 1);
                let rows = if parallel_at < len {
                    batch * channels
                } else {
                    batch
                };
                let children = (0..len)
                    .map(|i| {
                        if i == parallel_at {
                            Setup::Parallel((0..channels).map(|_| self.leaf()).collect())
                        } else {
                            self.child("stack", rows)
                        }
                    })
                    .collect();
                Setup::Stack(children)
            }
        }
    }
}

/// A padded batch: `rows` texts of random lengths, random token types.
pub fn random_batch(rng: &mut SeededRng, rows: usize) -> Batch {
    let seq = 3 + rng.below(6);
    let (mut ids, mut types, mut mask) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rows {
        let len = 2 + rng.below(seq - 1);
        for t in 0..seq {
            let real = t < len;
            ids.push(if real { 1 + rng.below(98) as u32 } else { 0 });
            types.push(if real { rng.below(2) as u32 } else { 0 });
            mask.push(real as u32);
        }
    }
    let tensor = |v: Vec<u32>| Tensor::from_vec(v, (rows, seq), &Device::Cpu).unwrap();
    Batch {
        input_ids: tensor(ids),
        token_type_ids: tensor(types),
        attention_mask: tensor(mask),
    }
}
