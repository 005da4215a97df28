//! One lane of the `log256_ps` and `sincos256_ps` that PyTorch's AVX2 `normal_` kernel calls
//! (aten/src/ATen/native/cpu/avx_mathfun.h: Giovanni Garberoglio's AVX port of Julien Pommier's
//! sse_mathfun, zlib licence, with the Cephes `logf`/`sinf`/`cosf` polynomials), written again
//! in scalar Rust so that it rounds exactly as torch's compiled kernel does.
//!
//! The header spells every operation as a separate `_mm256_mul_ps` / `_mm256_add_ps`, but GCC
//! (which builds torch's x86-64 wheels) contracts a multiply whose only use is an add into one
//! fused multiply-add, because the AVX2 kernels are compiled with `-mfma` and C++ defaults to
//! `-ffp-contract=fast`. The `mul_add` calls below are those contractions. Which ones happen was
//! measured, not guessed from the source: with them, 67 million `torch.randn` values (four seeds ×
//! 2²⁴, torch 2.15 on an AMD EPYC, AVX-512 and AVX2 capabilities) come out bit for bit; leaving out
//! any one of the Horner-step, `x - y·DP` or `y·x + x` contractions breaks hundreds to tens of
//! thousands of them. Two candidates are exact either way and are written as plain operations:
//! `z·0.5` (a power of two) and `e·0.693359375` (an integer times a 9-bit constant).

/// The constants are C `float` arrays initialised from double literals: rounded to float from the
/// double, as the compiler does (`as f32` of the `f64`, not a direct decimal-to-float parse). Where
/// the header's literal has more digits than a double holds, the shortest literal of the same
/// double is written, with the header's in a comment.
macro_rules! float_of_double {
    ($x:expr) => {
        ($x as f64) as f32
    };
}

/// Natural log of one lane as `log256_ps` computes it: frexp, then the Cephes polynomial.
/// NaN for `x <= 0`; subnormals are flushed to the smallest normal, as in the header.
pub(crate) fn log(x: f32) -> f32 {
    let invalid = x <= 0.0;
    let min_norm_pos = f32::from_bits(0x0080_0000);
    // `_mm256_max_ps(x, min_norm_pos)`: the second operand unless x is larger.
    let x = if x > min_norm_pos { x } else { min_norm_pos };
    let exponent = (x.to_bits() >> 23) as i32;
    // Keep the mantissa, with the exponent of 0.5: x in [0.5, 1).
    let mut x = f32::from_bits((x.to_bits() & !0x7f80_0000) | 0.5f32.to_bits());
    let mut e = (exponent - 0x7f) as f32 + 1.0;
    // if x < SQRTHF { e -= 1; x = x + x - 1 } else { x = x - 1 }
    let below = x < float_of_double!(std::f64::consts::FRAC_1_SQRT_2); // 0.707106781186547524
    let tmp = if below { x } else { 0.0 };
    x -= 1.0;
    e -= if below { 1.0 } else { 0.0 };
    x += tmp;

    let z = x * x;
    let mut y = float_of_double!(7.0376836292E-2);
    for p in [
        -1.1514610310E-1,
        1.1676998740E-1,
        -1.2420140846E-1,
        1.4249322787E-1,
        -1.6668057665E-1,
        2.0000714765E-1,
        -2.4999993993E-1,
        3.3333331174E-1,
    ] {
        y = y.mul_add(x, float_of_double!(p));
    }
    y *= x;
    // y = y·z + e·q1: GCC fuses the first product (y·z) and rounds e·q1 on its own.
    y = y.mul_add(z, e * float_of_double!(-2.12194440e-4));
    y -= z * 0.5;
    x += y;
    x += e * float_of_double!(0.693359375);
    if invalid {
        f32::NAN
    } else {
        x
    }
}

/// `(sin x, cos x)` of one lane as `sincos256_ps` computes them: reduction by multiples of π/4
/// in three parts (Cody-Waite), then the Cephes sine and cosine polynomials. Accurate for
/// |x| < 8192; the normal kernel only passes [0, 2π).
pub(crate) fn sincos(x: f32) -> (f32, f32) {
    let sign_sin = x.to_bits() & 0x8000_0000;
    let mut x = x.abs();
    // j = (int(x · 4/π) + 1) & ~1, truncating like `_mm256_cvttps_epi32`.
    let j = (((x * float_of_double!(1.27323954473516)) as i32) + 1) & !1;
    let y = j as f32;
    let swap_sign_sin = ((j & 4) as u32) << 29;
    let sine_poly = (j & 2) == 0;
    // x = ((x - y·DP1) - y·DP2) - y·DP3, each step one fused multiply-add.
    x = y.mul_add(-0.78515625, x);
    x = y.mul_add(float_of_double!(-0.00024187564849853516), x); // -2.4187564849853515625e-4
    x = y.mul_add(float_of_double!(-3.774894977445941e-8), x); // -3.77489497744594108e-8
    let sign_cos = ((!(j - 2) & 4) as u32) << 29;
    let sign_sin = sign_sin ^ swap_sign_sin;

    let z = x * x;
    // Cosine polynomial (0 ≤ x ≤ π/4): 1 - z/2 + z²·(c0·z² + c1·z + c2).
    let mut yc = float_of_double!(2.443315711809948E-005);
    yc = yc.mul_add(z, float_of_double!(-1.388731625493765E-003));
    yc = yc.mul_add(z, float_of_double!(4.166664568298827E-002));
    yc *= z;
    yc = yc.mul_add(z, -(z * 0.5));
    yc += 1.0;
    // Sine polynomial: x + x·z·(s0·z² + s1·z + s2).
    let mut ys = float_of_double!(-1.9515295891E-4);
    ys = ys.mul_add(z, float_of_double!(8.3321608736E-3));
    ys = ys.mul_add(z, float_of_double!(-1.6666654611E-1));
    ys *= z;
    ys = ys.mul_add(x, x);

    // The header selects with bit masks (a masked-out lane is +0.0) and adds; kept as it is so
    // that signed zeros come out the same.
    let (ysin2, ysin1) = if sine_poly { (ys, 0.0) } else { (0.0, yc) };
    let cos_sine_part = ys - ysin2;
    let cos_cosine_part = yc - ysin1;
    let sin = f32::from_bits((ysin1 + ysin2).to_bits() ^ sign_sin);
    let cos = f32::from_bits((cos_cosine_part + cos_sine_part).to_bits() ^ sign_cos);
    (sin, cos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_to_libm_on_the_kernels_domain() {
        // A few ulps from the correctly rounded values: a typo in a constant is far larger.
        for k in 0..=4096u32 {
            let u = k as f32 / 4096.0;
            if u > 0.0 {
                let want = (u as f64).ln();
                assert!((log(u) as f64 - want).abs() <= 4e-7 * want.abs().max(1.0), "log({u})");
            }
            let theta = (2.0 * std::f64::consts::PI) as f32 * u;
            let (s, c) = sincos(theta);
            assert!((s as f64 - (theta as f64).sin()).abs() < 3e-7, "sin({theta})");
            assert!((c as f64 - (theta as f64).cos()).abs() < 3e-7, "cos({theta})");
        }
        assert!(log(0.0).is_nan() && log(-1.0).is_nan());
        assert_eq!(log(1.0), 0.0);
    }
}
