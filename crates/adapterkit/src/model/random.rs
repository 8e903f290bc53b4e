//! A BERT with random weights, for benchmarks of shapes no checkpoint here has (bert-base)
//! and for tests: N(0, std) matrices, unit LayerNorm weights, zero biases, from our seeded
//! generator.

use std::sync::Mutex;

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::VarBuilder;

use crate::model::{BertConfig, BertModel};
use crate::rng::SeededRng;

struct RandomWeights {
    rng: Mutex<SeededRng>,
    std: f64,
}

impl candle_nn::var_builder::SimpleBackend for RandomWeights {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let tensor = if name.ends_with("LayerNorm.weight") {
            Tensor::ones(shape, DType::F32, device)?
        } else if name.ends_with("bias") {
            Tensor::zeros(shape, DType::F32, device)?
        } else {
            let mut rng = self.rng.lock().expect("no other holder panics");
            rng.normal_tensor(shape, 0.0, self.std, device)?
        };
        tensor.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        candle_core::bail!("random weights have no shape for {name}")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

impl BertModel {
    /// A model of `config`'s shape with random weights (`std`: the matrices' standard
    /// deviation; `transformers` initialises with `initializer_range`, 0.02).
    pub fn random(config: &BertConfig, std: f64, seed: u64, device: &Device) -> Result<Self> {
        let backend = RandomWeights {
            rng: Mutex::new(SeededRng::new(seed)),
            std,
        };
        let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, device.clone());
        BertModel::load(vb, config)
    }
}
