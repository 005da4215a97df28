//! Where a request's noise comes from: the generator that turns [`Request::seed`] into the
//! initial latents and the stochastic samplers' step noise.
//!
//! [`RngKind::Fast`] (the default) is this runtime's own generator. [`RngKind::TorchCpu`]
//! reproduces `torch.Generator("cpu").manual_seed(seed)` as diffusers draws from it, so a seed
//! gives diffusers' image without passing `latents=`: diffusers' `randn_tensor`
//! (diffusers/utils/torch_utils.py) draws the initial latents in `prepare_latents`, then each
//! stochastic scheduler's `step` draws one tensor of the sample's shape from the same generator,
//! and the pipeline does the same in the same order (one [`NoiseSource`] call per tensor).
//!
//! [`Request::seed`]: crate::Request::seed

mod avx_mathfun;
mod mt19937;
mod torch_cpu;

use std::fmt;
use std::str::FromStr;

use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::error::{Error, Field, Result};
use crate::scheduler::NoiseSource;

pub use torch_cpu::{TorchCpuGenerator, TorchCpuKernel};

/// Which generator a request's seed drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum RngKind {
    /// rand's `StdRng` (ChaCha12) from `seed_from_u64(seed)`, normals by rand_distr's ziggurat.
    /// Reproducible from a seed across runs and machines, but not diffusers' draws.
    #[default]
    Fast,
    /// `torch.Generator("cpu").manual_seed(seed)` with `torch.randn`'s float32 values on x86-64 CPUs
    /// with AVX2 (what `torch.backends.cpu.get_cpu_capability()` calls `AVX2` or `AVX512`): the
    /// same bits on any machine this runs on.
    TorchCpu,
    /// The same generator with torch's generic `randn` kernel (capability `DEFAULT`: x86-64
    /// without AVX2, or `ATEN_CPU_CAPABILITY=default`), whose ≥ 16-element draws go through this
    /// platform's libm as torch's do.
    TorchCpuDefault,
}

impl RngKind {
    /// Every kind, in the order they are listed to users.
    pub const ALL: [RngKind; 3] = [RngKind::Fast, RngKind::TorchCpu, RngKind::TorchCpuDefault];

    /// The name used on the command line and in requests.
    pub fn as_str(self) -> &'static str {
        match self {
            RngKind::Fast => "fast",
            RngKind::TorchCpu => "torch-cpu",
            RngKind::TorchCpuDefault => "torch-cpu-default",
        }
    }

    /// One line on what the kind matches, for help texts.
    pub fn describe(self) -> &'static str {
        match self {
            RngKind::Fast => "this runtime's own generator (ChaCha12); not diffusers' draws",
            RngKind::TorchCpu => {
                "diffusers with generator=torch.Generator(\"cpu\").manual_seed(SEED), as torch draws on x86-64 \
                 CPUs with AVX2 (torch.backends.cpu.get_cpu_capability() is AVX2 or AVX512)"
            }
            RngKind::TorchCpuDefault => {
                "the same for torch's DEFAULT CPU capability (no AVX2, or ATEN_CPU_CAPABILITY=default)"
            }
        }
    }

    /// A generator seeded with `seed`, fresh as `manual_seed(seed)` leaves one.
    pub fn generator(self, seed: u64) -> Box<dyn NoiseSource + Send> {
        match self {
            RngKind::Fast => Box::new(StdRng::seed_from_u64(seed)),
            RngKind::TorchCpu => Box::new(TorchCpuGenerator::new(seed, TorchCpuKernel::Avx2)),
            RngKind::TorchCpuDefault => Box::new(TorchCpuGenerator::new(seed, TorchCpuKernel::Default)),
        }
    }
}

impl fmt::Display for RngKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RngKind {
    type Err = Error;

    fn from_str(name: &str) -> Result<Self> {
        if name == "torch-cuda" {
            return Err(Error::request(
                Field::Rng,
                "rng \"torch-cuda\" (torch.Generator(\"cuda\"), Philox on the GPU) is not implemented yet; use \
                 torch-cpu and pass generator=torch.Generator(\"cpu\").manual_seed(SEED) to diffusers",
            ));
        }
        RngKind::ALL.into_iter().find(|k| k.as_str() == name).ok_or_else(|| {
            let valid: Vec<&str> = RngKind::ALL.iter().map(|k| k.as_str()).collect();
            Error::request(Field::Rng, format!("unknown rng \"{name}\"; valid names: {}", valid.join(", ")))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_torch_cuda_is_refused() {
        for kind in RngKind::ALL {
            assert_eq!(kind.as_str().parse::<RngKind>().ok(), Some(kind));
        }
        let err = "torch-cuda".parse::<RngKind>().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("not implemented yet"), "{err}");
        let err = "mt".parse::<RngKind>().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("fast, torch-cpu, torch-cpu-default"), "{err}");
    }

    #[test]
    fn fast_is_the_std_rng_stream_the_runtime_always_drew() {
        use rand_distr::{Distribution, StandardNormal};
        let mut rng = StdRng::seed_from_u64(9);
        let want: Vec<f32> = (0..40).map(|_| StandardNormal.sample(&mut rng)).collect();
        let mut got = vec![0.0f32; 40];
        RngKind::Fast.generator(9).fill_standard_normal(&mut got);
        assert_eq!(got, want);
    }
}
