//! LayerNorm as one CPU op with a hand-written backward pass (candle's fused one has none), and
//! a frozen LayerNorm of a sum of tensors (the end of a sub-layer) as one op.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use crate::kernels::fused::{contiguous_all, with_all_values};
use crate::kernels::parallel::{par_rows, par_vec, ROW};
use crate::kernels::simd::{lanes, sum};

/// LayerNorm over the last dimension; arguments `x`, `weight`, `bias`.
pub struct LayerNormOp {
    pub eps: f64,
}

impl LayerNormOp {
    /// Per row: mean and 1/std.
    fn stats(row: &[f32], eps: f64) -> (f32, f32) {
        let n = row.len() as f32;
        let mean = sum(row) / n;
        let var = lanes(row, row, 0.0, |a, x, _| a + (x - mean) * (x - mean))
            .iter()
            .sum::<f32>()
            / n;
        (mean, 1.0 / (var + eps as f32).sqrt())
    }

    /// `(x - mean) / std * w + b` per row.
    fn normalize(&self, x: &[f32], w: &[f32], b: &[f32]) -> Vec<f32> {
        let h = w.len();
        par_vec(x.len(), h, |first, block| {
            Self::normalize_into(&x[first * h..], w, b, self.eps, block)
        })
    }

    /// [`normalize`](Self::normalize) of the rows of `x` into `dst` (as many rows as `dst`
    /// holds), on the calling thread.
    pub(crate) fn normalize_into(x: &[f32], w: &[f32], b: &[f32], eps: f64, dst: &mut [f32]) {
        let h = w.len();
        for (row, dst) in x.chunks_exact(h).zip(dst.chunks_exact_mut(h)) {
            let (mean, rstd) = Self::stats(row, eps);
            for i in 0..h {
                dst[i] = (row[i] - mean) * rstd * w[i] + b[i];
            }
        }
    }

    fn backward(
        &self,
        xs: &[f32],
        ws: &[f32],
        gs: &[f32],
        x: &Tensor,
        w: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let h = ws.len();
        let mut dx = vec![0f32; xs.len()];
        // Each thread sums dw and db over its rows; the partial sums are added after.
        let partials = par_rows(&mut dx, h, |first, block| {
            let (mut dw, mut db) = (vec![0f32; h], vec![0f32; h]);
            let (mut xhat, mut gw) = (vec![0f32; h], vec![0f32; h]);
            let rows = xs[first * h..]
                .chunks_exact(h)
                .zip(gs[first * h..].chunks_exact(h));
            for ((row, g), dst) in rows.zip(block.chunks_exact_mut(h)) {
                let (mean, rstd) = Self::stats(row, self.eps);
                let (mut mean_gw, mut mean_gw_xhat) = (0f32, 0f32);
                for i in 0..h {
                    xhat[i] = (row[i] - mean) * rstd;
                    gw[i] = g[i] * ws[i];
                    mean_gw += gw[i];
                    mean_gw_xhat += gw[i] * xhat[i];
                    dw[i] += g[i] * xhat[i];
                    db[i] += g[i];
                }
                mean_gw /= h as f32;
                mean_gw_xhat /= h as f32;
                for i in 0..h {
                    dst[i] = rstd * (gw[i] - mean_gw - xhat[i] * mean_gw_xhat);
                }
            }
            (dw, db)
        });
        let (mut dw, mut db) = (vec![0f32; h], vec![0f32; h]);
        for (pw, pb) in partials {
            dw.iter_mut().zip(pw).for_each(|(a, b)| *a += b);
            db.iter_mut().zip(pb).for_each(|(a, b)| *a += b);
        }
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dw, w.shape(), dev)?),
            Some(Tensor::from_vec(db, w.shape(), dev)?),
        ))
    }
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let [x, w, b] = contiguous_all([(s1, l1), (s2, l2), (s3, l3)])?;
        Ok((CpuStorage::F32(self.normalize(x, w, b)), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        with_all_values(&[x, w, grad], |v| self.backward(v[0], v[1], v[2], x, w))
    }
}

/// A frozen LayerNorm of the sum of two or three tensors (a residual connection, an adapter's
/// too): arguments the parts, the LayerNorm's weights fields of the op. No tensor for the sum
/// is kept (the backward pass adds the parts again), and every part gets the same gradient.
pub struct SumLayerNormOp {
    pub norm: LayerNormOp,
    pub weight: Tensor,
    pub bias: Tensor,
}

/// The element-wise sum of `parts` (one length), in parallel blocks.
fn sum_of(parts: &[&[f32]]) -> Vec<f32> {
    par_vec(parts[0].len(), ROW, |first, block| {
        block.copy_from_slice(&parts[0][first * ROW..][..block.len()]);
        for part in &parts[1..] {
            let part = &part[first * ROW..][..block.len()];
            block.iter_mut().zip(part).for_each(|(s, p)| *s += p);
        }
    })
}

/// `a + b + c` (one shape) as one op, for a LayerNorm of a sum whose weights train: candle's two
/// additions would keep the partial sum `a + b` for a backward pass that needs none of it
/// (every part's gradient is the sum's).
pub struct Sum3Op;

impl CustomOp3 for Sum3Op {
    fn name(&self) -> &'static str {
        "fused-sum3"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if l2.shape() != l1.shape() || l3.shape() != l1.shape() {
            candle_core::bail!(
                "sum of {:?}, {:?} and {:?}",
                l1.shape(),
                l2.shape(),
                l3.shape()
            );
        }
        let out = sum_of(&contiguous_all([(s1, l1), (s2, l2), (s3, l3)])?);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let take = |t: &Tensor| t.track_op().then(|| grad.clone());
        Ok((take(a), take(b), take(c)))
    }
}

impl SumLayerNormOp {
    fn forward(&self, parts: &[&[f32]], shape: &Shape) -> Result<(CpuStorage, Shape)> {
        let sum = sum_of(parts);
        let out = with_all_values(&[&self.weight, &self.bias], |v| {
            Ok(self.norm.normalize(&sum, v[0], v[1]))
        })?;
        Ok((CpuStorage::F32(out), shape.clone()))
    }

    /// The gradient every part gets, or `None` when no part takes one.
    fn backward(&self, parts: &[&Tensor], grad: &Tensor) -> Result<Option<Tensor>> {
        if !parts.iter().any(|p| p.track_op()) {
            return Ok(None);
        }
        let sum = with_all_values(parts, |values| Ok(sum_of(values)))?;
        let (dx, _, _) = with_all_values(&[&self.weight, grad], |v| {
            self.norm.backward(&sum, v[0], v[1], parts[0], &self.weight)
        })?;
        Ok(dx)
    }

    fn check(&self, layouts: &[&Layout]) -> Result<()> {
        let shape = layouts[0].shape();
        let h = self.weight.elem_count();
        if layouts.iter().any(|l| l.shape() != shape) || shape.dims().last() != Some(&h) {
            candle_core::bail!("layer norm of a sum: parts {layouts:?}, {h} features");
        }
        Ok(())
    }
}

impl CustomOp2 for SumLayerNormOp {
    fn name(&self) -> &'static str {
        "fused-sum-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.check(&[l1, l2])?;
        self.forward(&contiguous_all([(s1, l1), (s2, l2)])?, l1.shape())
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = self.backward(&[a, b], grad)?;
        let take = |t: &Tensor| dx.clone().filter(|_| t.track_op());
        Ok((take(a), take(b)))
    }
}

impl CustomOp3 for SumLayerNormOp {
    fn name(&self) -> &'static str {
        "fused-sum-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.check(&[l1, l2, l3])?;
        self.forward(&contiguous_all([(s1, l1), (s2, l2), (s3, l3)])?, l1.shape())
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = self.backward(&[a, b, c], grad)?;
        let take = |t: &Tensor| dx.clone().filter(|_| t.track_op());
        Ok((take(a), take(b), take(c)))
    }
}
