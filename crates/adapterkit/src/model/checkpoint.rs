//! Gradient checkpointing: a small sub-graph (an adapter and the LayerNorm after it) as one op
//! that keeps only its inputs; its backward pass runs the sub-graph again to take the
//! gradients. candle keeps every op's inputs until the backward pass, so the sub-graph run op
//! by op would keep each of its intermediate tensors (for a bottleneck adapter, its output and
//! the sum before the LayerNorm: two hidden-sized tensors per sub-layer) for a backward pass
//! that can recompute them at a small fraction of the step's cost.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor, Var};

use crate::kernels::fused::with_values;

/// The sub-graph `f(a, b, params)`: a pure function of its arguments (dropout masks drawn
/// before, not inside).
type SubGraph = dyn Fn(&Tensor, &Tensor, &[Tensor]) -> Result<Tensor> + Send + Sync;

/// `f(a, b, params)` with the gradients `f` run op by op would give, keeping only `a`, `b` and
/// the parameters (as one flat tensor: candle's ops take three inputs) for the backward pass.
/// The values are `f`'s own: both passes run it.
pub fn checkpointed(
    a: &Tensor,
    b: &Tensor,
    params: &[&Tensor],
    f: impl Fn(&Tensor, &Tensor, &[Tensor]) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    let flat = params
        .iter()
        .map(|p| p.flatten_all())
        .collect::<Result<Vec<_>>>()?;
    let op = Checkpoint {
        f: Arc::new(f),
        inputs: [a.detach(), b.detach()],
        params: params.iter().map(|p| p.detach()).collect(),
    };
    a.apply_op3(b, &Tensor::cat(&flat, 0)?, op)
}

struct Checkpoint {
    f: Arc<SubGraph>,
    /// `a` and `b` and the parameters as values (sharing the graph inputs' storage), for the
    /// forward pass.
    inputs: [Tensor; 2],
    params: Vec<Tensor>,
}

impl Checkpoint {
    /// The parameters out of their flat tensor, in their shapes.
    fn unflattened(&self, flat: &Tensor) -> Result<Vec<Tensor>> {
        let mut offset = 0;
        let mut params = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let n = p.elem_count();
            params.push(flat.narrow(0, offset, n)?.reshape(p.shape())?);
            offset += n;
        }
        Ok(params)
    }
}

impl CustomOp3 for Checkpoint {
    fn name(&self) -> &'static str {
        "checkpoint"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let [a, b] = &self.inputs;
        let out = (self.f)(a, b, &self.params)?;
        let values = with_values(&out, |v| Ok(v.to_vec()))?;
        Ok((CpuStorage::F32(values), out.shape().clone()))
    }

    /// Runs `f` again on fresh variables (those inputs that take a gradient) and passes `grad`
    /// back through it.
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        flat: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let leaf = |t: &Tensor| -> Result<Tensor> {
            match t.track_op() {
                true => Ok(Var::from_tensor(&t.detach())?.as_tensor().clone()),
                false => Ok(t.detach()),
            }
        };
        let leaves = [leaf(a)?, leaf(b)?, leaf(flat)?];
        let params = self.unflattened(&leaves[2])?;
        let out = (self.f)(&leaves[0], &leaves[1], &params)?;
        let grads = out.apply_op1(Seed(grad.detach()))?.backward()?;
        let [a, b, flat] = [(a, &leaves[0]), (b, &leaves[1]), (flat, &leaves[2])]
            .map(|(t, leaf)| t.track_op().then(|| grads.get(leaf).cloned()).flatten());
        Ok((a, b, flat))
    }
}

/// A scalar root over a tensor whose backward pass hands the tensor the gradient it holds: how
/// a backward pass starts from a given output gradient (candle's starts from ones) without a
/// pass over the values.
struct Seed(Tensor);

impl CustomOp1 for Seed {
    fn name(&self) -> &'static str {
        "checkpoint-seed"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(vec![0.0]), Shape::from(())))
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, _: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.0.clone()))
    }
}
