//! The checkpointed sub-layer against the sub-graph run op by op.

use super::*;
use crate::model::ops::Activation;

fn random(rng: &mut SeededRng, shape: &[usize], mean: f32) -> CandleResult<Tensor> {
    let values = (0..shape.iter().product())
        .map(|_| mean + rng.normal_f64() as f32)
        .collect::<Vec<_>>();
    Tensor::from_vec(values, shape, &Device::Cpu)
}

/// The checkpointed sub-layer is the sub-graph run op by op to the bit: its values and
/// every gradient (inputs, adapter, LayerNorm), for Houlsby's and Pfeiffer's shapes, the
/// LayerNorm frozen or trained, with and without dropout, on each non-linearity.
#[test]
fn checkpointed_is_the_sub_graph_to_the_bit() -> CandleResult<()> {
    let mut rng = SeededRng::new(3);
    let (hidden_size, shape) = (24, [2, 5, 24]);
    for (preset, non_linearity, dropout, norm_trains) in [
        ("houlsby", Activation::Swish, 0.0, true),
        ("houlsby", Activation::Relu, 0.1, false),
        ("pfeiffer", Activation::Relu, 0.0, false),
        ("pfeiffer", Activation::Gelu, 0.2, true),
        ("houlsby", Activation::Tanh, 0.0, false),
        ("pfeiffer", Activation::GeluNew, 0.0, true),
    ] {
        let mut config = BnConfig::preset(preset).expect("a preset");
        config.non_linearity = non_linearity;
        config.dropout = dropout;
        let adapter = BottleneckAdapter::new(&config, hidden_size, 6, &mut rng, &Device::Cpu)
            .expect("an adapter");
        let var = |t: Tensor| Var::from_tensor(&t).map(|v| v.as_tensor().clone());
        let hidden = var(random(&mut rng, &shape, 0.0)?)?;
        let input = var(random(&mut rng, &shape, 0.5)?)?;
        let (weight, bias) = (
            random(&mut rng, &[hidden_size], 1.0)?,
            random(&mut rng, &[hidden_size], 0.0)?,
        );
        let layer_norm = match norm_trains {
            true => LayerNorm {
                weight: var(weight)?,
                bias: var(bias)?,
                eps: 1e-12,
            },
            false => LayerNorm {
                weight,
                bias,
                eps: 1e-12,
            },
        };
        let probe = random(&mut rng, &shape, 0.0)?;
        let mask = Mode::train(7).dropout_mask(hidden.elem_count(), dropout);
        let mut tensors = vec![hidden.clone(), input.clone()];
        tensors.extend(adapter.params().iter().map(|(_, v)| v.as_tensor().clone()));
        if norm_trains {
            tensors.extend([layer_norm.weight.clone(), layer_norm.bias.clone()]);
        }
        let run = |checkpoint: bool| -> CandleResult<Vec<Vec<f32>>> {
            let out = match checkpoint {
                true => adapter
                    .checkpointed(&hidden, &input, &layer_norm, mask.as_ref())?
                    .expect("the checkpoint applies"),
                false => adapter.sequential(&hidden, &input, &layer_norm, mask.as_ref())?,
            };
            let grads = (&out * &probe)?.sum_all()?.backward()?;
            let mut values = vec![out.flatten_all()?.to_vec1::<f32>()?];
            for t in &tensors {
                let grad = grads.get(t).expect("a gradient");
                values.push(grad.flatten_all()?.to_vec1::<f32>()?);
            }
            Ok(values)
        };
        let case = format!("{preset}, {non_linearity:?}, dropout {dropout}");
        assert_eq!(run(true)?, run(false)?, "{case}");
    }
    Ok(())
}
