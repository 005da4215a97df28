//! ControlNets attached to a request, and the per-step conditioner that runs them.
//!
//! Semantics are diffusers' `StableDiffusionControlNetPipeline.__call__`
//! (pipelines/controlnet/pipeline_controlnet.py) and `MultiControlNetModel.forward`
//! (models/controlnets/multicontrolnet.py): at every UNet call each ControlNet runs on the call's
//! scaled latents, the text batch and its control image; its residuals, times
//! `controlnet_conditioning_scale` (0 outside `control_guidance_start..end`), are summed over the
//! nets and fed to the UNet's control inputs. In guess mode with classifier-free guidance the nets
//! see only the conditional half, and the unconditional half gets zeros.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use ndarray::{concatenate, Array4, ArrayD, ArrayViewD, Axis, IxDyn};

use crate::adapter::ConditionSource;
use crate::backend::TensorView;
use crate::condition::{ConditionImage, ConditionKind};
use crate::conditioning::{python_float, Call, Conditioner, ConditionerSessions, Feed};
use crate::error::{check_finite, Error, Field, Result, Stage};
use crate::limits::Limits;
use crate::manifest::{Manifest, ResidualSlot};
use crate::preprocess::{apply_all, Preprocess};
use crate::text::TextConditioning;

/// One ControlNet a request asks for: `--control NAME=IMAGE[:SCALE]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlRequest {
    /// The ControlNet's name in the graph set's manifest.
    pub name: String,
    /// Control image (e.g. canny edges): converted to RGB and resized to the output size with
    /// PIL's Lanczos, as diffusers' `control_image_processor` does.
    pub image: ConditionSource,
    /// Multiplies this ControlNet's residuals (diffusers' `controlnet_conditioning_scale`).
    pub scale: f32,
    /// Applied in order to the control image once it has the output size (e.g. canny edges from a
    /// photo: [`Preprocess`]); empty for an image that already is the condition.
    pub preprocess: Vec<Preprocess>,
}

impl std::str::FromStr for ControlRequest {
    type Err = Error;

    /// Parses `NAME=IMAGE[:SCALE]`; the scale defaults to 1.0 (the rules of
    /// [`AdapterRequest`](crate::AdapterRequest)'s parser).
    fn from_str(s: &str) -> Result<Self> {
        let malformed = || {
            Error::request(
                Field::Controls,
                format!("control {s:?} must look like NAME=IMAGE[:SCALE], e.g. canny=edges.png:0.8"),
            )
        };
        let (name, rest) = s.split_once('=').ok_or_else(malformed)?;
        let (image, scale) = match rest.rsplit_once(':') {
            Some((image, scale)) if scale.parse::<f32>().is_ok() => (image, scale.parse::<f32>().unwrap_or(1.0)),
            _ => (rest, 1.0),
        };
        if name.is_empty() || image.is_empty() {
            return Err(malformed());
        }
        Ok(ControlRequest {
            name: name.to_string(),
            image: ConditionSource::File(PathBuf::from(image)),
            scale,
            preprocess: Vec::new(),
        })
    }
}

/// A request's ControlNets, checked against the graph set, with their control images loaded
/// ([1, 3, H, W] in [0, 1] at the output size).
#[derive(Debug, Clone, Default)]
pub(crate) struct ControlSet {
    entries: Vec<ControlEntry>,
}

#[derive(Debug, Clone)]
struct ControlEntry {
    /// The ControlNet's index in the manifest (and in `ConditionerSessions::controlnets`).
    index: usize,
    scale: f32,
    image: Array4<f32>,
}

impl ControlSet {
    /// Checks `requests` against `manifest` (known names, finite scales) and loads their images
    /// within `limits` for an output of `width` × `height`.
    pub(crate) fn build(
        manifest: &Manifest,
        requests: &[ControlRequest],
        width: u32,
        height: u32,
        limits: &Limits,
    ) -> Result<ControlSet> {
        let mut entries = Vec::with_capacity(requests.len());
        for request in requests {
            let index = manifest.controlnets.iter().position(|c| c.name == request.name).ok_or_else(|| {
                let names: Vec<&str> = manifest.controlnets.iter().map(|c| c.name.as_str()).collect();
                let available = if names.is_empty() { "no ControlNets".to_string() } else { names.join(", ") };
                Error::request(
                    Field::Controls,
                    format!("unknown ControlNet {:?}; this graph set has: {available}", request.name),
                )
            })?;
            if !request.scale.is_finite() {
                return Err(Error::request(
                    Field::Controls,
                    format!("ControlNet {} scale {} is not a number; give a finite scale", request.name, request.scale),
                ));
            }
            let image = match &request.image {
                ConditionSource::File(path) => {
                    let image = ConditionImage::open_within(path, ConditionKind::Rgb, limits)?.resized(width, height);
                    apply_all(&request.preprocess, image)?.to_tensor()
                }
                ConditionSource::Pixels(image) if image.kind() == ConditionKind::Rgb => {
                    apply_all(&request.preprocess, image.resized(width, height))?.to_tensor()
                }
                ConditionSource::Pixels(image) => {
                    return Err(Error::request(
                        Field::Controls,
                        format!(
                            "ControlNet {} takes RGB control pixels, got {} channel(s); convert the image to RGB",
                            request.name,
                            image.kind().channels()
                        ),
                    ))
                }
            };
            entries.push(ControlEntry { index, scale: request.scale, image });
        }
        Ok(ControlSet { entries })
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Each entry's manifest index and control tensor ([1, 3, H, W] in [0, 1]), in request order.
    pub(crate) fn conditions(&self) -> impl Iterator<Item = (usize, &Array4<f32>)> {
        self.entries.iter().map(|e| (e.index, &e.image))
    }
}

/// diffusers' `controlnet_keep[i]`: `1.0 - float(i / len(timesteps) < start or (i + 1) /
/// len(timesteps) > end)`, with `start` and `end` as the Python floats the user typed.
pub(crate) fn keep(call: usize, total: usize, start: f32, end: f32) -> f64 {
    let (i, n) = (call as f64, total as f64);
    if i / n < python_float(start) || (i + 1.0) / n > python_float(end) {
        0.0
    } else {
        1.0
    }
}

/// The ControlNet graph's `scales` input for `cond_scale`: every slot `cond_scale` (diffusers'
/// `sample * conditioning_scale`), or in guess mode the logspace scales times it, in float32 as
/// torch computes `scales * conditioning_scale` (models/controlnets/controlnet.py).
pub(crate) fn slot_scales(guess_mode_scales: &[f32], guess_mode: bool, cond_scale: f64) -> Vec<f32> {
    let scale = cond_scale as f32;
    if guess_mode {
        guess_mode_scales.iter().map(|s| s * scale).collect()
    } else {
        vec![scale; guess_mode_scales.len()]
    }
}

/// What the conditioner last bound.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Bound {
    Nothing,
    Zeros,
    Residuals,
}

/// The ControlNets of one request as a per-step [`Conditioner`].
pub(crate) struct ControlNets {
    slots: Vec<ResidualSlot>,
    names: Vec<String>,
    guess_mode_scales: Vec<Vec<f32>>,
    controls: ControlSet,
    /// UNet batch rows, and images per prompt (`n`); `batch == 2n` with guidance.
    batch: usize,
    n: usize,
    latent_hw: (usize, usize),
    guess_mode: bool,
    guided: bool,
    start: f32,
    end: f32,
    /// Model calls this run makes (`len(timesteps)` in diffusers' loop).
    total: usize,
    text: TextConditioning,
    bound: Bound,
    graph_time: Duration,
}

/// What [`ControlNets::prepare`] takes from the request.
pub(crate) struct ControlParams {
    pub start: f32,
    pub end: f32,
    pub guess_mode: bool,
    pub guided: bool,
    pub n: usize,
    pub latent_hw: (usize, usize),
    pub total: usize,
}

impl ControlNets {
    /// `text` is the UNet's text batch (rows `[uncond × n, cond × n]` with guidance).
    pub(crate) fn prepare(
        manifest: &Manifest,
        controls: ControlSet,
        text: TextConditioning,
        params: &ControlParams,
    ) -> ControlNets {
        ControlNets {
            slots: manifest.control_slots.clone(),
            names: manifest.controlnets.iter().map(|c| c.name.clone()).collect(),
            guess_mode_scales: manifest.controlnets.iter().map(|c| c.guess_mode_scales.clone()).collect(),
            controls,
            batch: if params.guided { 2 * params.n } else { params.n },
            n: params.n,
            latent_hw: params.latent_hw,
            guess_mode: params.guess_mode,
            guided: params.guided,
            start: params.start,
            end: params.end,
            total: params.total,
            text,
            bound: Bound::Nothing,
            graph_time: Duration::ZERO,
        }
    }

    fn zeros(&self) -> Vec<(String, ArrayD<f32>)> {
        let (lh, lw) = self.latent_hw;
        self.slots
            .iter()
            .map(|slot| {
                let ds = slot.downscale as usize;
                (slot.input.clone(), ArrayD::zeros(IxDyn(&[self.batch, slot.channels, lh / ds, lw / ds])))
            })
            .collect()
    }

    /// Runs ControlNet `entry` for `call` at `cond_scale`: its residuals for the whole UNet batch.
    fn run_net(
        &self,
        entry: &ControlEntry,
        cond_scale: f64,
        call: &Call<'_>,
        sessions: &mut ConditionerSessions,
    ) -> Result<Vec<ArrayD<f32>>> {
        // Guess mode with guidance: the conditional half only (diffusers feeds `latents` scaled,
        // which are the UNet input's conditional rows, and `prompt_embeds.chunk(2)[1]`).
        let half = self.guess_mode && self.guided;
        let rows = if half { self.n..self.batch } else { 0..self.batch };
        let count = rows.len();
        let cut = |a: &ArrayD<f32>| -> ArrayD<f32> { a.slice_axis(Axis(0), rows.clone().into()).to_owned() };
        let sample: ArrayViewD<'_, f32> = call.sample.slice_axis(Axis(0), rows.clone().into());
        let timestep = ArrayD::from_elem(IxDyn(&[count]), call.timestep);
        // The text rows are copied only for guess mode's half batch.
        let text: std::borrow::Cow<'_, TextConditioning> = if half {
            std::borrow::Cow::Owned(TextConditioning {
                hidden: cut(&self.text.hidden),
                text_embeds: self.text.text_embeds.as_ref().map(cut),
                time_ids: self.text.time_ids.as_ref().map(cut),
            })
        } else {
            std::borrow::Cow::Borrowed(&self.text)
        };
        let image = entry.image.view().into_dyn();
        let cond = image
            .broadcast(IxDyn(&[count, image.shape()[1], image.shape()[2], image.shape()[3]]))
            .map(|v| v.to_owned());
        let cond = cond.ok_or_else(|| internal("control image does not broadcast over the batch".into()))?;
        let scales = ArrayD::from_shape_vec(
            IxDyn(&[self.slots.len()]),
            slot_scales(&self.guess_mode_scales[entry.index], self.guess_mode, cond_scale),
        )
        .map_err(|e| internal(e.to_string()))?;
        let mut inputs = vec![
            ("sample", TensorView::F32(sample)),
            ("timestep", TensorView::F32(timestep.view())),
            ("encoder_hidden_states", TensorView::F32(text.hidden.view())),
            ("controlnet_cond", TensorView::F32(cond.view())),
            ("scales", TensorView::F32(scales.view())),
        ];
        if let Some(t) = &text.text_embeds {
            inputs.push(("text_embeds", TensorView::F32(t.view())));
        }
        if let Some(t) = &text.time_ids {
            inputs.push(("time_ids", TensorView::F32(t.view())));
        }
        let session = sessions
            .controlnets
            .get_mut(entry.index)
            .ok_or_else(|| internal(format!("no session for ControlNet {}", self.names[entry.index])))?;
        let outputs = session.run(&inputs)?;
        let (step, total) = (call.index + 1, self.total);
        check_finite(&outputs, || Stage::ControlNet { name: self.names[entry.index].clone(), step, total })?;
        let (lh, lw) = self.latent_hw;
        if outputs.len() != self.slots.len() {
            return Err(
                self.mismatch(entry, format!("gave {} outputs for {} control slots", outputs.len(), self.slots.len()))
            );
        }
        outputs
            .into_iter()
            .zip(&self.slots)
            .map(|(output, slot)| {
                let ds = slot.downscale as usize;
                let want = [count, slot.channels, lh / ds, lw / ds];
                if output.shape() != want {
                    return Err(self.mismatch(
                        entry,
                        format!("gave {} shape {:?}, the unet takes {want:?}", slot.input, output.shape()),
                    ));
                }
                if !half {
                    return Ok(output);
                }
                // diffusers: `torch.cat([torch.zeros_like(d), d])`.
                let zeros = ArrayD::<f32>::zeros(output.raw_dim());
                concatenate(Axis(0), &[zeros.view(), output.view()]).map_err(|e| internal(e.to_string()))
            })
            .collect()
    }

    fn mismatch(&self, entry: &ControlEntry, what: String) -> Error {
        Error::Backend {
            backend: "pipeline",
            graph: format!("controlnet_{}", self.names[entry.index]),
            message: format!("{what}; re-export the graph set"),
        }
    }
}

fn internal(message: String) -> Error {
    Error::Backend { backend: "pipeline", graph: "controlnet".into(), message }
}

impl Conditioner for ControlNets {
    fn feed(&mut self, call: &Call<'_>, sessions: &mut ConditionerSessions) -> Result<Feed> {
        self.graph_time = Duration::ZERO;
        let keep = keep(call.index, self.total, self.start, self.end);
        let mut sum: Option<Vec<ArrayD<f32>>> = None;
        let clock = Instant::now();
        for entry in &self.controls.entries {
            // diffusers: `cond_scale = controlnet_conditioning_scale * controlnet_keep[i]`. At 0 the
            // net's residuals are ±0, which change nothing the UNet adds them to: skip the run.
            let cond_scale = python_float(entry.scale) * keep;
            if cond_scale == 0.0 {
                continue;
            }
            let residuals = self.run_net(entry, cond_scale, call, sessions)?;
            // MultiControlNetModel: `down = [prev + curr ...]`, in request order.
            sum = Some(match sum {
                None => residuals,
                Some(acc) => acc.into_iter().zip(residuals).map(|(a, r)| a + r).collect(),
            });
        }
        self.graph_time = clock.elapsed();
        Ok(match sum {
            Some(residuals) => {
                self.bound = Bound::Residuals;
                Feed::Bind(self.slots.iter().map(|s| s.input.clone()).zip(residuals).collect())
            }
            None if self.bound == Bound::Zeros => Feed::Keep,
            None => {
                self.bound = Bound::Zeros;
                Feed::Bind(self.zeros())
            }
        })
    }

    fn graph_time(&self) -> Option<Duration> {
        (!self.controls.is_empty()).then_some(self.graph_time)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::GraphSession;

    #[test]
    fn parses_control_arguments() {
        let c: ControlRequest = "canny=edges.png:0.8".parse().unwrap();
        assert_eq!((c.name.as_str(), &c.image, c.scale), ("canny", &ConditionSource::File("edges.png".into()), 0.8));
        let d: ControlRequest = "depth=C:/img/d.png".parse().unwrap();
        assert_eq!((&d.image, d.scale), (&ConditionSource::File("C:/img/d.png".into()), 1.0));
        let e: ControlRequest = "canny=a:b.png:0".parse().unwrap();
        assert_eq!((&e.image, e.scale), (&ConditionSource::File("a:b.png".into()), 0.0));
        for bad in ["canny", "=x.png", "canny=", "canny=:0.5"] {
            let err = bad.parse::<ControlRequest>().unwrap_err().to_string();
            assert!(err.contains("NAME=IMAGE[:SCALE]"), "{bad}: {err}");
        }
    }

    #[test]
    fn keep_follows_python_arithmetic() {
        let keeps = |total: usize, start: f32, end: f32| -> Vec<f64> {
            (0..total).map(|i| keep(i, total, start, end)).collect()
        };
        // i / 6 < 0.2 drops i = 0, 1; (i + 1) / 6 > 0.8 drops i = 4 (0.833), 5 (1.0).
        assert_eq!(keeps(6, 0.2, 0.8), [0.0, 0.0, 1.0, 1.0, 0.0, 0.0]);
        assert_eq!(keeps(4, 0.0, 1.0), [1.0; 4]);
        // Python: 3 / 10 < 0.3 is False (0.3 is 0.299999999999999988898 and 3 / 10 rounds to the
        // same double), so call 3 is kept; the f32 0.3 (0.30000001192) would drop it.
        assert_eq!(keeps(10, 0.3, 1.0), [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]);
        // (i + 1) / 10 > 0.7: 7 / 10 == 0.7 in Python, kept; 8 / 10 dropped.
        assert_eq!(keeps(10, 0.0, 0.7), [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]);
        // Heun's 2 × 3 − 1 = 5 calls with end 0.5: (i + 1) / 5 > 0.5 from i = 2.
        assert_eq!(keeps(5, 0.0, 0.5), [1.0, 1.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn guess_mode_scales_are_float32_products() {
        let logspace = [0.1f32, 0.3f32, 1.0f32];
        assert_eq!(slot_scales(&logspace, false, 0.7), [0.7f32; 3]);
        assert_eq!(slot_scales(&logspace, true, 0.7), [0.1f32 * 0.7f32, 0.3f32 * 0.7f32, 0.7f32]);
        assert_eq!(slot_scales(&logspace, true, 0.0), [0.0f32; 3]);
        // torch: float32 logspace × Python float, rounded once in float32, not in float64.
        let torch = (0.3f32 * 0.7f32).to_bits();
        assert_eq!(slot_scales(&logspace, true, 0.7)[1].to_bits(), torch);
    }

    /// The rows and `scales` of every call a [`FakeNet`] got.
    type Log = std::sync::Arc<std::sync::Mutex<Vec<(usize, Vec<f32>)>>>;

    /// A ControlNet graph stand-in: output `i` of row `r` is `sample[r, 0, 0, 0] + scales[i]` over
    /// the slot's shape; it logs the rows and scales of each call.
    struct FakeNet {
        calls: Log,
    }

    impl GraphSession for FakeNet {
        fn run(&mut self, inputs: &[(&str, TensorView<'_>)]) -> Result<Vec<ArrayD<f32>>> {
            let get = |name: &str| match inputs.iter().find(|(n, _)| *n == name) {
                Some((_, TensorView::F32(a))) => a.to_owned(),
                _ => panic!("no input {name}"),
            };
            let (sample, scales, cond) = (get("sample"), get("scales"), get("controlnet_cond"));
            let rows = sample.shape()[0];
            assert_eq!(cond.shape()[0], rows);
            assert_eq!(get("encoder_hidden_states").shape()[0], rows);
            self.calls.lock().unwrap().push((rows, scales.iter().copied().collect()));
            Ok(scales
                .iter()
                .map(|&s| {
                    let mut out = ArrayD::from_elem(IxDyn(&[rows, 1, 2, 2]), s);
                    for (r, mut row) in out.axis_iter_mut(Axis(0)).enumerate() {
                        row += sample[[r, 0, 0, 0]];
                    }
                    out
                })
                .collect())
        }
        fn bind(&mut self, _: &[(&str, TensorView<'_>)]) -> Result<()> {
            Ok(())
        }
        fn unbind(&mut self) {}
    }

    fn net(
        scales: &[(usize, f32)],
        guess_mode: bool,
        guided: bool,
        start: f32,
        end: f32,
        total: usize,
    ) -> (ControlNets, ConditionerSessions, Log) {
        let log: Log = Default::default();
        let slots = vec![
            ResidualSlot { input: "control_down_0".into(), channels: 1, downscale: 1 },
            ResidualSlot { input: "control_mid".into(), channels: 1, downscale: 1 },
        ];
        let n = 1;
        let batch = if guided { 2 } else { 1 };
        let entries = scales
            .iter()
            .map(|&(index, scale)| ControlEntry { index, scale, image: Array4::zeros((1, 3, 2, 2)) })
            .collect();
        let text =
            TextConditioning { hidden: ArrayD::zeros(IxDyn(&[batch, 77, 4])), text_embeds: None, time_ids: None };
        let nets = ControlNets {
            slots,
            names: vec!["a".into(), "b".into()],
            guess_mode_scales: vec![vec![0.1, 1.0], vec![0.1, 1.0]],
            controls: ControlSet { entries },
            batch,
            n,
            latent_hw: (2, 2),
            guess_mode,
            guided,
            start,
            end,
            total,
            text,
            bound: Bound::Nothing,
            graph_time: Duration::ZERO,
        };
        let sessions = ConditionerSessions {
            controlnets: vec![Box::new(FakeNet { calls: log.clone() }), Box::new(FakeNet { calls: log.clone() })],
            ..ConditionerSessions::empty()
        };
        (nets, sessions, log)
    }

    /// Feeds for each call: "keep", "zeros", or the values bound at row 0 / last row of `control_mid`.
    fn feeds(nets: &mut ControlNets, sessions: &mut ConditionerSessions, total: usize) -> Vec<String> {
        let sample = ArrayD::from_shape_fn(IxDyn(&[nets.batch, 4, 2, 2]), |i| (i[0] * 10) as f32);
        (0..total)
            .map(|index| {
                let call = Call { index, timestep: 1.0, sample: sample.view() };
                match nets.feed(&call, sessions).unwrap() {
                    Feed::Keep => "keep".to_string(),
                    Feed::Bind(inputs) if inputs.iter().all(|(_, a)| a.iter().all(|&v| v == 0.0)) => "zeros".into(),
                    Feed::Bind(inputs) => {
                        assert_eq!(inputs[1].0, "control_mid");
                        let mid = &inputs[1].1;
                        format!("{}/{}", mid[[0, 0, 0, 0]], mid[[mid.shape()[0] - 1, 0, 0, 0]])
                    }
                }
            })
            .collect()
    }

    #[test]
    fn controlnets_run_inside_their_range_and_feed_zeros_outside() {
        let (mut nets, mut sessions, log) = net(&[(0, 0.5)], false, true, 0.2, 0.8, 6);
        // Rows: uncond sample 0, cond sample 10; mid = sample + 0.5.
        assert_eq!(feeds(&mut nets, &mut sessions, 6), ["zeros", "keep", "0.5/10.5", "0.5/10.5", "zeros", "keep"]);
        assert_eq!(*log.lock().unwrap(), [(2, vec![0.5, 0.5]), (2, vec![0.5, 0.5])]);
    }

    #[test]
    fn guess_mode_runs_the_conditional_half_and_zeros_the_other() {
        let (mut nets, mut sessions, log) = net(&[(0, 0.5)], true, true, 0.0, 1.0, 2);
        assert_eq!(feeds(&mut nets, &mut sessions, 2), ["0/10.5", "0/10.5"]);
        assert_eq!(log.lock().unwrap()[0], (1, vec![0.1f32 * 0.5, 0.5]));
        // Without guidance guess mode keeps the whole (one-half) batch, with the logspace scales.
        let (mut nets, mut sessions, log) = net(&[(0, 1.0)], true, false, 0.0, 1.0, 1);
        assert_eq!(feeds(&mut nets, &mut sessions, 1), ["1/1"]);
        assert_eq!(log.lock().unwrap()[0], (1, vec![0.1, 1.0]));
    }

    #[test]
    fn multi_controlnet_sums_and_skips_zero_scales() {
        let (mut nets, mut sessions, log) = net(&[(0, 0.5), (1, 0.25), (0, 0.0)], false, true, 0.0, 1.0, 1);
        // (0 + 0.5) + (0 + 0.25) at the uncond row, (10 + 0.5) + (10 + 0.25) at the cond row.
        assert_eq!(feeds(&mut nets, &mut sessions, 1), ["0.75/20.75"]);
        assert_eq!(log.lock().unwrap().len(), 2);
        let (mut nets, mut sessions, _) = net(&[], false, true, 0.0, 1.0, 3);
        assert_eq!(feeds(&mut nets, &mut sessions, 3), ["zeros", "keep", "keep"]);
        assert_eq!(nets.graph_time(), None);
    }
}
