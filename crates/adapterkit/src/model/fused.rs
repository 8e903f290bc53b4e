//! LayerNorm and softmax as single CPU kernels with hand-written backward passes (candle's own
//! fused versions have no backward). Each row is one pass over memory instead of the half-dozen
//! tensors the composed versions allocate; `ops` picks these on CPU for f32 and keeps the
//! composed ones elsewhere. `docs/BENCHMARKS.md` has the comparison.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};

fn contiguous<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("fused op needs a contiguous input".into()))?;
    Ok(&storage.as_slice::<f32>()?[start..end])
}

fn values(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

/// LayerNorm over the last dimension; arguments `x`, `weight`, `bias`.
pub struct LayerNormOp {
    pub eps: f64,
}

impl LayerNormOp {
    /// Per row: mean and 1/std.
    fn stats(row: &[f32], eps: f64) -> (f32, f32) {
        let n = row.len() as f32;
        let mean = row.iter().sum::<f32>() / n;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
        (mean, 1.0 / (var + eps as f32).sqrt())
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
        let (x, w, b) = (
            contiguous(s1, l1)?,
            contiguous(s2, l2)?,
            contiguous(s3, l3)?,
        );
        let h = w.len();
        let mut out = vec![0f32; x.len()];
        for (row, dst) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
            let (mean, rstd) = Self::stats(row, self.eps);
            for i in 0..h {
                dst[i] = (row[i] - mean) * rstd * w[i] + b[i];
            }
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (xs, ws, gs) = (values(x)?, values(w)?, values(grad)?);
        let h = ws.len();
        let mut dx = vec![0f32; xs.len()];
        let (mut dw, mut db) = (vec![0f32; h], vec![0f32; h]);
        let mut xhat = vec![0f32; h];
        let mut gw = vec![0f32; h];
        for ((row, g), dst) in xs
            .chunks_exact(h)
            .zip(gs.chunks_exact(h))
            .zip(dx.chunks_exact_mut(h))
        {
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
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dw, w.shape(), dev)?),
            Some(Tensor::from_vec(db, w.shape(), dev)?),
        ))
    }
}

/// Softmax over the last dimension, shifted by the row maximum.
pub struct SoftmaxOp;

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(storage, layout)?;
        let n = layout.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![0f32; x.len()];
        for (row, dst) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for (d, v) in dst.iter_mut().zip(row) {
                *d = (v - max).exp();
                sum += *d;
            }
            let inv = 1.0 / sum;
            dst.iter_mut().for_each(|d| *d *= inv);
        }
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    /// `dx = y * (g - sum(g * y))` per row.
    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (ys, gs) = (values(y)?, values(grad)?);
        let n = y.dims().last().copied().unwrap_or(1).max(1);
        let mut dx = vec![0f32; ys.len()];
        for ((yr, gr), dst) in ys
            .chunks_exact(n)
            .zip(gs.chunks_exact(n))
            .zip(dx.chunks_exact_mut(n))
        {
            let dot: f32 = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
            for i in 0..n {
                dst[i] = yr[i] * (gr[i] - dot);
            }
        }
        Ok(Some(Tensor::from_vec(dx, y.shape(), y.device())?))
    }
}
