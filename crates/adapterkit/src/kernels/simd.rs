//! Numerical building blocks for the fused kernels, written so that the compiler vectorises
//! them: `exp` and `erf` without library calls, reductions over eight lanes, and
//! `with_wide_simd!`, which compiles a kernel for AVX-512 or AVX2 behind a run-time check.

/// Defines `$name`, which runs `$kernel` (an `#[inline(always)]` loop written to vectorise)
/// compiled for AVX-512, or AVX2 + FMA, when the CPU has it: the default build targets baseline
/// x86-64, whose SSE2 gives 4 lanes where AVX-512 gives 16.
macro_rules! with_wide_simd {
    ($name:ident => $kernel:ident($($arg:ident: $ty:ty),*)) => {
        pub(crate) fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512($($arg: $ty),*) {
                    $kernel($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) {
                    $kernel($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has the instructions `avx512` is compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $kernel($($arg),*)
        }
    };
}
pub(crate) use with_wide_simd;

/// `c[0] + x (c[1] + x (c[2] + ...))` by fused multiply-adds: Rust never contracts `a * b + c`
/// on its own, and a separate multiply and add double both the instructions and the
/// dependency chain of a polynomial. The kernels that use it run behind `with_wide_simd!`,
/// whose AVX-512 and AVX2 builds have FMA; elsewhere `mul_add` is a (slower) library call.
#[inline(always)]
pub(crate) fn horner(x: f32, c: &[f32]) -> f32 {
    c.iter().rev().fold(0.0, |acc, &ci| acc.mul_add(x, ci))
}

/// `e^x` without a library call or a float-to-int conversion, so that loops over it
/// vectorise: `x = k ln 2 + r` with `|r| <= ln 2 / 2`, `e^r` by its degree-6 Taylor polynomial
/// (relative error below 3e-7), `2^k` built in the exponent bits. Below -80 it is 0: the masked
/// keys of a softmax must get exactly 0, not ~1e-38, which divided by the row's sum becomes a
/// denormal number and slows every later product with it (e^-80 / 512 keys is still normal).
#[inline(always)]
#[allow(clippy::manual_clamp)] // `clamp`'s NaN handling would stop the loop vectorising
pub(crate) fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75; // ln 2 split in two for an exact `k * LN2_HI`
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding 1.5 * 2^23 rounds to an integer k held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let clamped = if x < -80.0 {
        -80.0
    } else if x > 88.0 {
        88.0
    } else {
        x
    };
    let t = clamped.mul_add(std::f32::consts::LOG2_E, ROUND);
    let k = t - ROUND;
    let r = (-k).mul_add(LN2_LO, (-k).mul_add(LN2_HI, clamped));
    let p = horner(
        r,
        &[
            1.0,
            1.0,
            1.0 / 2.0,
            1.0 / 6.0,
            1.0 / 24.0,
            1.0 / 120.0,
            1.0 / 720.0,
        ],
    );
    let k_bits = t.to_bits().wrapping_sub(ROUND.to_bits());
    let e = p * f32::from_bits(k_bits.wrapping_add(127) << 23);
    if x < -80.0 {
        0.0
    } else {
        e
    }
}

/// Sum, maximum and dot product over eight running lanes: a single running sum is a chain of
/// dependent additions that the compiler may not reorder, so it would not vectorise.
#[inline(always)]
pub(crate) fn lanes(
    xs: &[f32],
    ys: &[f32],
    init: f32,
    step: impl Fn(f32, f32, f32) -> f32,
) -> [f32; 9] {
    let mut acc = [init; 9];
    let (xc, yc) = (xs.chunks_exact(8), ys.chunks_exact(8));
    let (xr, yr) = (xc.remainder(), yc.remainder());
    for (x, y) in xc.zip(yc) {
        for i in 0..8 {
            acc[i] = step(acc[i], x[i], y[i]);
        }
    }
    for (x, y) in xr.iter().zip(yr) {
        acc[8] = step(acc[8], *x, *y);
    }
    acc
}

#[inline(always)]
pub(crate) fn sum(xs: &[f32]) -> f32 {
    lanes(xs, xs, 0.0, |a, x, _| a + x).iter().sum()
}

#[inline(always)]
pub(crate) fn dot(xs: &[f32], ys: &[f32]) -> f32 {
    lanes(xs, ys, 0.0, |a, x, y| a + x * y).iter().sum()
}

#[inline(always)]
pub(crate) fn max(xs: &[f32]) -> f32 {
    let acc = lanes(
        xs,
        xs,
        f32::NEG_INFINITY,
        |a, x, _| if x > a { x } else { a },
    );
    acc.into_iter().fold(f32::NEG_INFINITY, f32::max)
}

/// The error function without a library call (vectorises): Numerical Recipes' Chebyshev
/// fit of `erfc`, fractional error below 1.2e-7, so `erf` within ~1.2e-7 absolute.
#[inline(always)]
#[allow(clippy::excessive_precision)] // the coefficients as published
pub(crate) fn erf(x: f32) -> f32 {
    let z = x.abs();
    let t = 1.0 / z.mul_add(0.5, 1.0);
    let poly = horner(
        t,
        &[
            -1.265_512_2,
            1.000_023_7,
            0.374_091_96,
            0.096_784_18,
            -0.186_288_06,
            0.278_868_07,
            -1.135_203_98,
            1.488_515_87,
            -0.822_152_23,
            0.170_872_77,
        ],
    );
    let erfc = t * exp((-z).mul_add(z, poly));
    (1.0 - erfc).copysign(x)
}

/// `softmax` of one row, in place: shifted by the row's maximum.
#[inline(always)]
pub(crate) fn softmax_in_place(row: &mut [f32]) {
    let max = max(row);
    row.iter_mut().for_each(|x| *x = exp(*x - max));
    let inv = 1.0 / sum(row);
    row.iter_mut().for_each(|x| *x *= inv);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The polynomial `exp` and `erf` against the library's, over the ranges the kernels use.
    #[test]
    fn exp_and_erf_match_the_library() {
        for i in 0..=20_000 {
            let x = -80.0 + 168.0 * i as f32 / 20_000.0;
            let (ours, libm) = (exp(x), x.exp());
            assert!(
                (ours - libm).abs() <= 3e-7 * libm,
                "exp({x}): {ours} vs {libm}"
            );
            let x = -6.0 + 12.0 * i as f32 / 20_000.0;
            let (ours, libm) = (erf(x), candle_core::cpu::erf::erf_f32(x));
            assert!((ours - libm).abs() < 3e-7, "erf({x}): {ours} vs {libm}");
        }
        for x in [-80.001, -100.0, -1e30, f32::MIN] {
            assert_eq!(exp(x), 0.0, "exp({x})");
        }
    }
}
