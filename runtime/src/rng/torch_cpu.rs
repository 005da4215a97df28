//! `torch.Generator("cpu")` and the float32 `torch.randn` it feeds, reproduced bit for bit.
//!
//! What torch 2.15 does for `torch.randn(shape, generator=g, dtype=torch.float32)` on the CPU
//! (`normal_kernel` in aten/src/ATen/native/cpu/DistributionTemplates.h):
//!
//! * fewer than 16 elements: one `at::normal_distribution<double>` draw per element, cast to
//!   float (aten/src/ATen/core/DistributionsHelper.h). Box-Muller in double from two 53-bit
//!   uniforms (`random64`); the second value of each pair is cached in the generator and returned
//!   by the next such draw, even one in a later call. `manual_seed` clears the cache.
//! * 16 or more (contiguous): `normal_fill`. First one 24-bit float uniform per element
//!   (`uniform_real_distribution<float>`: `(random() & (2²⁴ - 1)) · 2⁻²⁴`), then Box-Muller on
//!   each block of 16 in place, pairing element j with j + 8: `u1 = 1 - d[j]`, `u2 = d[j + 8]`,
//!   `d[j] = √(-2 ln u1) · cos(2π u2)`, `d[j + 8] = … · sin(2π u2)`. When the size is not a multiple
//!   of 16, 16 fresh uniforms overwrite the last 16 elements and that block is transformed again.
//!   The cache is neither used nor changed.
//!
//! The 16-element step comes in two builds, and they round differently: their log, sin and cos
//! are different approximations, so 38 % of the values differ, by at most 2.5e-6 (a few ulps;
//! torch's own two kernels on 2²⁴ draws of seed 0):
//!
//! * [`TorchCpuKernel::Avx2`]: `NormalFill16<float>` of the AVX2 build, with `log256_ps` and
//!   `sincos256_ps` (see [`super::avx_mathfun`]). torch runs it whenever
//!   `torch.backends.cpu.get_cpu_capability()` is `AVX2` or `AVX512` (the AVX-512 build registers
//!   no `normal_` kernel of its own and falls back to this one): every x86-64 CPU with AVX2 and FMA.
//! * [`TorchCpuKernel::Default`]: the generic template, float `std::log`, `std::cos`, `std::sin`
//!   from the C library, with `θ = float(2π · double(u2))`; torch's `DEFAULT` capability (x86-64
//!   without AVX2, or `ATEN_CPU_CAPABILITY=default`). It calls this platform's libm as torch does,
//!   so it matches torch where both use the same libm (checked with glibc on x86-64).
//!
//! Everything else (the engine, the uniforms, the under-16 path) is the same in both.

use super::avx_mathfun;
use super::mt19937::Mt19937;
use crate::scheduler::NoiseSource;

/// Which build of torch's 16-element Box-Muller step to reproduce (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TorchCpuKernel {
    /// torch's AVX2 kernel: capability `AVX2` or `AVX512`.
    Avx2,
    /// torch's generic kernel: capability `DEFAULT`.
    Default,
}

/// `torch.Generator("cpu").manual_seed(seed)`: torch's MT19937 engine plus its cached second
/// normal, drawing float32 standard normals exactly as `torch.randn` does with that generator.
///
/// Each [`fill_standard_normal`](NoiseSource::fill_standard_normal) call is one
/// `torch.randn(out.len(), generator=g, dtype=torch.float32)`: the values depend on how the draws
/// are split into calls (a call of 16 or more elements takes one uniform per element, plus 16 when
/// the size is not a multiple of 16), so call it once per tensor, as diffusers' `randn_tensor` does.
#[derive(Clone)]
pub struct TorchCpuGenerator {
    engine: Mt19937,
    /// `next_double_normal_sample_`: the sine half of the last scalar Box-Muller pair.
    next_double_normal: Option<f64>,
    kernel: TorchCpuKernel,
}

impl TorchCpuGenerator {
    /// A generator in the state `torch.Generator("cpu").manual_seed(seed)` leaves (any `u64`,
    /// as torch takes; only its low 32 bits seed the engine).
    pub fn new(seed: u64, kernel: TorchCpuKernel) -> Self {
        TorchCpuGenerator { engine: Mt19937::new(seed), next_double_normal: None, kernel }
    }

    /// The kernel this generator reproduces.
    pub fn kernel(&self) -> TorchCpuKernel {
        self.kernel
    }

    /// `uniform_real_distribution<float>(0, 1)`: 24 bits of one 32-bit output.
    fn uniform_f32(&mut self) -> f32 {
        (self.engine.next_u32() & 0x00ff_ffff) as f32 * (1.0 / 16_777_216.0)
    }

    /// `uniform_real_distribution<double>(0, 1)`: 53 bits of one 64-bit output.
    fn uniform_f64(&mut self) -> f64 {
        (self.engine.next_u64() & ((1 << 53) - 1)) as f64 * (1.0 / 9_007_199_254_740_992.0)
    }

    /// `normal_distribution<double>(0, 1)`, with the generator's cache.
    fn normal_f64(&mut self) -> f64 {
        // `transformation::normal(x, mean = 0, std = 1)` is `x · 1 + 0`, which turns -0 into +0.
        let standard = |x: f64| x * 1.0 + 0.0;
        if let Some(cached) = self.next_double_normal.take() {
            return standard(cached);
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let radius = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.next_double_normal = Some(radius * theta.sin());
        standard(radius * theta.cos())
    }

    /// Box-Muller on one block of 16 uniforms, in place (`NormalFill16`).
    fn normal_fill_16(&self, block: &mut [f32]) {
        let (first, second) = block.split_at_mut(8);
        for (a, b) in first.iter_mut().zip(second) {
            let u1 = 1.0 - *a; // [0, 1) -> (0, 1] for the log
            let u2 = *b;
            let (radius, sin, cos) = match self.kernel {
                TorchCpuKernel::Avx2 => {
                    let radius = (-2.0 * avx_mathfun::log(u1)).sqrt();
                    let (sin, cos) = avx_mathfun::sincos((2.0 * std::f64::consts::PI) as f32 * u2);
                    (radius, sin, cos)
                }
                TorchCpuKernel::Default => {
                    let radius = (-2.0 * u1.ln()).sqrt();
                    // `2.0f * c10::pi<double> * u2`: the product is taken in double.
                    let theta = (2.0 * std::f64::consts::PI * f64::from(u2)) as f32;
                    (radius, theta.sin(), theta.cos())
                }
            };
            // `fma(x, std = 1, mean = 0)`: exact, and -0 becomes +0.
            *a = radius * cos + 0.0;
            *b = radius * sin + 0.0;
        }
    }
}

impl NoiseSource for TorchCpuGenerator {
    /// `torch.randn(out.len(), generator=self, dtype=torch.float32)` (see the type's docs).
    fn fill_standard_normal(&mut self, out: &mut [f32]) {
        let size = out.len();
        if size < 16 {
            for x in out {
                *x = self.normal_f64() as f32;
            }
            return;
        }
        for x in out.iter_mut() {
            *x = self.uniform_f32();
        }
        for block in out.chunks_exact_mut(16) {
            self.normal_fill_16(block);
        }
        if !size.is_multiple_of(16) {
            let last = &mut out[size - 16..];
            for x in last.iter_mut() {
                *x = self.uniform_f32();
            }
            self.normal_fill_16(last);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn randn(seed: u64, kernel: TorchCpuKernel, n: usize) -> Vec<f32> {
        let mut out = vec![0.0; n];
        TorchCpuGenerator::new(seed, kernel).fill_standard_normal(&mut out);
        out
    }

    #[test]
    fn known_values() {
        // torch.randn(3, generator=torch.Generator("cpu").manual_seed(5)) prints
        // tensor([-0.4868, -0.6038, -0.5581]); runtime/tests/rng_parity.rs checks every bit.
        let got = randn(5, TorchCpuKernel::Avx2, 3);
        for (g, want) in got.iter().zip([-0.4868, -0.6038, -0.5581]) {
            assert!((g - want).abs() < 5e-5, "{got:?}");
        }
    }

    #[test]
    fn the_scalar_path_caches_the_second_value_across_calls() {
        let mut whole = TorchCpuGenerator::new(3, TorchCpuKernel::Avx2);
        let mut one = [0.0f32; 2];
        whole.fill_standard_normal(&mut one);
        let mut split = TorchCpuGenerator::new(3, TorchCpuKernel::Avx2);
        let (mut a, mut b) = ([0.0f32; 1], [0.0f32; 1]);
        split.fill_standard_normal(&mut a);
        split.fill_standard_normal(&mut b);
        assert_eq!([a[0], b[0]], one);
    }

    #[test]
    fn kernels_share_uniforms_and_differ_only_in_rounding() {
        let (a, b) = (randn(0, TorchCpuKernel::Avx2, 4096), randn(0, TorchCpuKernel::Default, 4096));
        let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(worst > 0.0 && worst < 1e-5, "{worst}");
    }
}
