//! PNDM (diffusers `schedulers/scheduling_pndm.py`, `PNDMScheduler`): pseudo numerical methods
//! for diffusion models. With `skip_prk_steps` (SD 1.x's config) it is PLMS, a 4th-order linear
//! multistep method warmed up by lower-order steps; without, the Runge-Kutta (PRK) warm-up of the
//! paper runs first. Deterministic.
//!
//! PLMS evaluates the model once more than the requested steps: diffusers repeats the second
//! timestep (`[t₀, t₁, t₁, t₂, …]`), the first two evaluations forming a Heun-like first step, so
//! [`num_steps`](Scheduler::num_steps) is `steps + 1` (1 for 1 step). PRK takes `steps + 9`
//! evaluations (4 per Runge-Kutta step for the first 3 steps) and needs at least 4 steps.
//! `order` is 1, as diffusers says, for both.

use ndarray::{ArrayD, ArrayViewD, Zip};

use super::{
    check_same_shape, check_step_index, check_steps, leading_timesteps, numpy_linspace, trailing_timesteps, wrap_index,
    NoiseSource, PredictionType, Scheduler, SchedulerConfig, SchedulerKind, TimestepSpacing, TrainSchedule, SPACINGS,
};
use crate::error::{Error, Result};

const NAME: &str = "pndm";
const NAME_PRK: &str = "pndm-prk";

pub(crate) fn build(config: &SchedulerConfig, steps: usize) -> Result<Box<dyn Scheduler>> {
    Ok(Box::new(PndmScheduler::new(&PndmConfig::from_config(config)?, steps)?))
}

/// `PNDMScheduler`'s config keys, resolved with its defaults (`PNDMScheduler.from_config`).
#[derive(Debug, Clone, PartialEq)]
pub struct PndmConfig {
    /// `rescale_betas_zero_snr` is not a key of `PNDMScheduler` and is always false here.
    pub train: TrainSchedule,
    /// PLMS only (default false: the Runge-Kutta warm-up first). SD 1.x configs say true.
    pub skip_prk_steps: bool,
    /// The last step's "previous" ᾱ is 1 instead of `alphas_cumprod[0]` (default false).
    pub set_alpha_to_one: bool,
    /// Epsilon (default) or v_prediction; diffusers' PNDM has no `sample`.
    pub prediction_type: PredictionType,
    /// Default leading.
    pub timestep_spacing: TimestepSpacing,
    /// Added to `leading` timesteps (default 0; SD 1.x configs say 1).
    pub steps_offset: i64,
}

impl PndmConfig {
    /// Resolves `config` the way `PNDMScheduler.from_config(config)` does. Errors name the key.
    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        // Named as the user knows it: `pndm-prk` when the Runge-Kutta warm-up runs.
        let skip_prk_steps = config.reader(NAME)?.bool("skip_prk_steps", false)?;
        let r = config.reader(if skip_prk_steps { NAME } else { NAME_PRK })?;
        let mut train = TrainSchedule::read(&r)?;
        // Not an `__init__` key of PNDMScheduler: from_config drops it.
        train.rescale_betas_zero_snr = false;
        Ok(PndmConfig {
            train,
            skip_prk_steps,
            set_alpha_to_one: r.bool("set_alpha_to_one", false)?,
            prediction_type: r.choice(
                "prediction_type",
                PredictionType::Epsilon,
                &[("epsilon", PredictionType::Epsilon), ("v_prediction", PredictionType::VPrediction)],
            )?,
            timestep_spacing: r.choice("timestep_spacing", TimestepSpacing::Leading, &SPACINGS)?,
            steps_offset: r.int("steps_offset", 0)?,
        })
    }
}

/// PNDM state for one request: `PNDMScheduler` after `set_timesteps(steps)`.
///
/// Like diffusers, the multistep state advances with a counter of `step` calls, not with the step
/// index: a loop that starts at a later index (img2img) warms up from there, as diffusers' does.
#[derive(Debug, Clone)]
pub struct PndmScheduler {
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    /// Training timesteps, PRK ones first (may include -1 with `trailing`).
    train_timesteps: Vec<i64>,
    timesteps: Vec<f32>,
    /// How many of the timesteps are Runge-Kutta ones (0 with `skip_prk_steps`).
    num_prk: usize,
    /// `num_train_timesteps // steps`.
    step_ratio: i64,
    prediction_type: PredictionType,
    /// diffusers' `counter`: `step` calls so far.
    counter: usize,
    /// diffusers' `ets`: the last (up to 4) model outputs the multistep formulas combine.
    ets: Vec<ArrayD<f32>>,
    /// diffusers' `cur_sample`: the sample a multi-evaluation step starts from.
    cur_sample: Option<ArrayD<f32>>,
    /// diffusers' `cur_model_output` (`None` is its integer 0): the Runge-Kutta running sum.
    cur_model_output: Option<ArrayD<f32>>,
}

impl PndmScheduler {
    /// `PNDMScheduler(**config)` followed by `set_timesteps(steps)`.
    pub fn new(config: &PndmConfig, steps: usize) -> Result<Self> {
        let name = if config.skip_prk_steps { NAME } else { NAME_PRK };
        let err = |message: String| Error::Scheduler { scheduler: name, message };
        let num_train = config.train.num_train_timesteps;
        check_steps(name, steps, num_train)?;
        let alphas_cumprod = config.train.alphas_cumprod();
        let final_alpha_cumprod = if config.set_alpha_to_one { 1.0 } else { alphas_cumprod[0] };

        // diffusers' `_timesteps`, ascending.
        let ascending: Vec<i64> = match config.timestep_spacing {
            TimestepSpacing::Linspace => {
                numpy_linspace(0.0, (num_train - 1) as f64, steps).iter().map(|t| t.round_ties_even() as i64).collect()
            }
            TimestepSpacing::Leading => {
                leading_timesteps(steps, num_train, config.steps_offset).into_iter().rev().collect()
            }
            TimestepSpacing::Trailing => trailing_timesteps(steps, num_train).into_iter().rev().collect(),
        };
        let n = ascending.len();
        let (prk, plms): (Vec<i64>, Vec<i64>) = if config.skip_prk_steps {
            // concatenate([_timesteps[:-1], _timesteps[-2:-1], _timesteps[-1:]])[::-1]
            let mut plms: Vec<i64> = ascending[..n - 1].to_vec();
            plms.extend_from_slice(&ascending[n.saturating_sub(2)..n - 1]);
            plms.push(ascending[n - 1]);
            plms.reverse();
            (Vec::new(), plms)
        } else {
            if n < 4 {
                // diffusers fails broadcasting the Runge-Kutta offsets with fewer than 4 timesteps.
                return Err(err(format!(
                    "{steps} steps requested, but `skip_prk_steps` = false (the Runge-Kutta warm-up) needs at \
                     least 4; request more steps or set `skip_prk_steps` = true (PLMS)"
                )));
            }
            let half = (num_train / steps / 2) as i64;
            // The last 4 timesteps each with its midpoint, [:-1], every entry twice, [1:-1], reversed.
            let pairs: Vec<i64> = ascending[n - 4..].iter().flat_map(|&t| [t, t + half]).collect();
            let doubled: Vec<i64> = pairs[..pairs.len() - 1].iter().flat_map(|&t| [t, t]).collect();
            let prk: Vec<i64> = doubled[1..doubled.len() - 1].iter().rev().copied().collect();
            (prk, ascending[..n - 3].iter().rev().copied().collect())
        };
        let num_prk = prk.len();
        let train_timesteps: Vec<i64> = prk.into_iter().chain(plms).collect();
        if let Some(&t) = train_timesteps.iter().find(|&&t| wrap_index(t, num_train).is_none()) {
            return Err(err(format!(
                "{steps} steps with steps_offset {} give timestep {t}, outside the {num_train} training \
                 timesteps; lower `steps_offset` or the step count",
                config.steps_offset
            )));
        }
        Ok(PndmScheduler {
            alphas_cumprod,
            final_alpha_cumprod,
            timesteps: train_timesteps.iter().map(|&t| t as f32).collect(),
            train_timesteps,
            num_prk,
            step_ratio: (num_train / steps) as i64,
            prediction_type: config.prediction_type,
            counter: 0,
            ets: Vec::new(),
            cur_sample: None,
            cur_model_output: None,
        })
    }

    /// ᾱ at training timestep `t` (Python-indexed), or an error past the schedule.
    fn alpha_cumprod(&self, t: i64) -> Result<f32> {
        wrap_index(t, self.alphas_cumprod.len()).map(|i| self.alphas_cumprod[i]).ok_or_else(|| Error::Scheduler {
            scheduler: NAME,
            message: format!("timestep {t} is outside the {} training timesteps", self.alphas_cumprod.len()),
        })
    }

    /// `_get_prev_sample`: formula (9) of the PNDM paper from `t` to `prev_t`, float32 scalars in
    /// diffusers' order; writes into `out`.
    fn prev_sample(
        &self,
        sample: &ArrayD<f32>,
        t: i64,
        prev_t: i64,
        model_output: &ArrayD<f32>,
        out: &mut ArrayD<f32>,
    ) -> Result<()> {
        let alpha_prod_t = self.alpha_cumprod(t)?;
        let alpha_prod_t_prev = if prev_t >= 0 { self.alpha_cumprod(prev_t)? } else { self.final_alpha_cumprod };
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        let (sqrt_alpha, sqrt_beta) = (alpha_prod_t.sqrt(), beta_prod_t.sqrt());
        let sample_coeff = (alpha_prod_t_prev / alpha_prod_t).sqrt();
        let denom = alpha_prod_t * beta_prod_t_prev.sqrt() + (alpha_prod_t * beta_prod_t * alpha_prod_t_prev).sqrt();
        let diff = alpha_prod_t_prev - alpha_prod_t;
        let v_prediction = self.prediction_type == PredictionType::VPrediction;
        Zip::from(out).and(sample).and(model_output).for_each(|o, &s, &m| {
            let eps = if v_prediction { sqrt_alpha * m + sqrt_beta * s } else { m };
            *o = sample_coeff * s - diff * eps / denom;
        });
        Ok(())
    }

    /// `step_prk`: one of the 4 evaluations of a Runge-Kutta step.
    fn step_prk(&mut self, model_output: ArrayD<f32>, timestep: i64, sample: &mut ArrayD<f32>) -> Result<()> {
        let c = self.counter;
        let half = self.step_ratio / 2;
        let prev_t = timestep - if c % 2 == 1 { 0 } else { half };
        let t = self.train_timesteps[c / 4 * 4];
        let add = |acc: Option<ArrayD<f32>>, w: f32, m: &ArrayD<f32>| match acc {
            None => m.mapv(|m| w * m),
            Some(mut acc) => {
                Zip::from(&mut acc).and(m).for_each(|a, &m| *a += w * m);
                acc
            }
        };
        let (sixth, third) = ((1.0f64 / 6.0) as f32, (1.0f64 / 3.0) as f32);
        let model_output = match c % 4 {
            0 => {
                self.cur_model_output = Some(add(self.cur_model_output.take(), sixth, &model_output));
                self.cur_sample = Some(sample.clone());
                self.ets.push(model_output.clone());
                model_output
            }
            1 | 2 => {
                self.cur_model_output = Some(add(self.cur_model_output.take(), third, &model_output));
                model_output
            }
            _ => add(self.cur_model_output.take(), sixth, &model_output),
        };
        // Every evaluation of the Runge-Kutta step starts from the sample its first one got.
        match self.cur_sample.take() {
            Some(start) => {
                self.prev_sample(&start, t, prev_t, &model_output, sample)?;
                self.cur_sample = Some(start);
            }
            None => {
                let start = sample.clone();
                self.prev_sample(&start, t, prev_t, &model_output, sample)?;
            }
        }
        Ok(())
    }

    /// `step_plms`: the linear multistep update from the last model outputs.
    fn step_plms(&mut self, model_output: ArrayD<f32>, timestep: i64, sample: &mut ArrayD<f32>) -> Result<()> {
        let (mut t, mut prev_t) = (timestep, timestep - self.step_ratio);
        if self.counter != 1 {
            let keep_from = self.ets.len().saturating_sub(3);
            self.ets.drain(..keep_from);
            self.ets.push(model_output.clone());
        } else {
            // The repeated timestep: the second evaluation of a Heun-like first step from t₀.
            prev_t = timestep;
            t = timestep + self.step_ratio;
        }
        let e = &self.ets;
        let combined = match e.len() {
            1 if self.counter == 0 => {
                self.cur_sample = Some(sample.clone());
                model_output
            }
            1 if self.counter == 1 => {
                let start = self.cur_sample.take().ok_or_else(|| Error::Scheduler {
                    scheduler: NAME,
                    message: "internal: PLMS's second evaluation has no starting sample".into(),
                })?;
                *sample = start;
                Zip::from(&model_output).and(&e[0]).map_collect(|&m, &e1| (m + e1) / 2.0)
            }
            2 => Zip::from(&e[1]).and(&e[0]).map_collect(|&e1, &e2| (3.0 * e1 - e2) / 2.0),
            3 => Zip::from(&e[2])
                .and(&e[1])
                .and(&e[0])
                .map_collect(|&e1, &e2, &e3| (23.0 * e1 - 16.0 * e2 + 5.0 * e3) / 12.0),
            _ => {
                let c = (1.0f64 / 24.0) as f32;
                Zip::from(&e[3])
                    .and(&e[2])
                    .and(&e[1])
                    .and(&e[0])
                    .map_collect(|&e1, &e2, &e3, &e4| c * (55.0 * e1 - 59.0 * e2 + 37.0 * e3 - 9.0 * e4))
            }
        };
        let start = sample.clone();
        self.prev_sample(&start, t, prev_t, &combined, sample)
    }
}

impl Scheduler for PndmScheduler {
    fn kind(&self) -> SchedulerKind {
        if self.num_prk == 0 {
            SchedulerKind::Pndm
        } else {
            SchedulerKind::PndmPrk
        }
    }

    /// Training timesteps; PLMS repeats the second one (`[t₀, t₁, t₁, t₂, …]`).
    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f32 {
        1.0
    }

    fn order(&self) -> usize {
        1
    }

    /// Identity, as in diffusers.
    fn scale_model_input(&self, _sample: &mut ArrayD<f32>, step: usize) {
        assert!(step < self.num_steps(), "pndm: step index {step} out of range 0..{}", self.num_steps());
    }

    /// `PNDMScheduler.step(model_output, timesteps[step], sample)`: `step_prk` for the first
    /// Runge-Kutta evaluations (without `skip_prk_steps`), `step_plms` after, each driven by the
    /// count of `step` calls as in diffusers.
    fn step(
        &mut self,
        model_output: ArrayViewD<f32>,
        step: usize,
        sample: &mut ArrayD<f32>,
        _noise: &mut dyn NoiseSource,
    ) -> Result<()> {
        check_step_index(NAME, step, self.num_steps())?;
        check_same_shape(NAME, "model_output", model_output.shape(), sample.shape())?;
        let timestep = self.train_timesteps[step];
        let model_output = model_output.to_owned();
        if self.counter < self.num_prk {
            self.step_prk(model_output, timestep, sample)?;
        } else {
            self.step_plms(model_output, timestep, sample)?;
        }
        self.counter += 1;
        Ok(())
    }

    /// `PNDMScheduler.add_noise`: `sqrt(ᾱ_t)·original + sqrt(1 − ᾱ_t)·noise` at `t = timesteps[step]`.
    fn add_noise(&self, original: ArrayViewD<f32>, noise: ArrayViewD<f32>, step: usize) -> ArrayD<f32> {
        assert_eq!(noise.shape(), original.shape(), "pndm add_noise: noise and original shapes differ");
        let alpha = self.alpha_cumprod(self.train_timesteps[step]).unwrap_or(f32::NAN);
        let (a, b) = (alpha.sqrt(), (1.0 - alpha).sqrt());
        Zip::from(&original).and(&noise).map_collect(|&x, &n| a * x + b * n)
    }
}
