//! The seam every kind of conditioning plugs into. A [`Conditioner`] is prepared once per request
//! (running whatever graphs it needs then: T2I-Adapters, the IP-Adapter's image encoder and
//! projection, [`crate::ip_adapter`], the style adapter's, [`crate::style_adapter`])
//! and is asked, before every UNet call, which UNet inputs it feeds ([`Feed`]); a per-step
//! conditioner ([`ControlNets`](crate::controlnet::ControlNets)) runs its own graph there on the
//! call's [`Call::sample`]. The denoising loop knows none of them: it binds what they return and
//! runs the UNet.
//!
//! One UNet graph takes every kind of residual. A conditioner feeds its inputs whether or not the
//! request uses it (zeros when unused), so any combination runs on one graph and one engine.

use ndarray::{ArrayD, ArrayViewD, Axis, IxDyn};

use crate::adapter::AdapterSet;
use crate::backend::GraphSession;
use crate::error::Result;
use crate::manifest::{Manifest, ResidualSlot};

/// One UNet call, as a conditioner sees it.
pub(crate) struct Call<'a> {
    /// The call's index in this run, from 0 (img2img runs fewer calls than `steps`).
    pub index: usize,
    /// The UNet timestep of this call.
    pub timestep: f32,
    /// The scaled latents ([batch, C, h, w], both guidance halves): the UNet's `sample`, before an
    /// inpainting UNet's mask and masked-image channels are appended (diffusers' ControlNet
    /// inpaint pipeline feeds its ControlNet `latent_model_input` before that concatenation).
    pub sample: ArrayViewD<'a, f32>,
}

/// What a conditioner feeds the UNet at one call.
pub(crate) enum Feed {
    /// The same inputs as at the previous call: they are bound already, nothing to copy.
    Keep,
    /// Bind these UNet inputs from this call on (replacing the conditioner's previous ones).
    Bind(Vec<(String, ArrayD<f32>)>),
}

/// The graph sessions conditioners run, by role: separate from the UNet's, so that a per-step
/// conditioner can run its graph while the loop holds the UNet.
pub(crate) struct ConditionerSessions {
    /// The manifest's T2I-Adapters, in manifest order.
    pub adapters: Vec<Box<dyn GraphSession>>,
    /// The manifest's ControlNets, in manifest order.
    pub controlnets: Vec<Box<dyn GraphSession>>,
    /// The IP-Adapter's image encoder and image projection (sets with an IP-Adapter).
    pub image_encoder: Option<Box<dyn GraphSession>>,
    pub image_projection: Option<Box<dyn GraphSession>>,
    /// The style adapter's CLIP vision encoder and adapter (sets with a style adapter).
    pub style_encoder: Option<Box<dyn GraphSession>>,
    pub style_adapter: Option<Box<dyn GraphSession>>,
    /// Image embeddings of recent IP-Adapter images, so a repeated image skips the encoder.
    pub ip_cache: crate::ip_adapter::EmbedCache,
}

impl ConditionerSessions {
    /// No conditioner graphs (unit tests).
    #[cfg(test)]
    pub(crate) fn empty() -> ConditionerSessions {
        ConditionerSessions {
            adapters: Vec::new(),
            controlnets: Vec::new(),
            image_encoder: None,
            image_projection: None,
            style_encoder: None,
            style_adapter: None,
            ip_cache: Default::default(),
        }
    }
}

/// A source of UNet inputs for one request.
pub(crate) trait Conditioner: Send {
    /// The UNet inputs for `call`. The first call must [`Feed::Bind`] every input the conditioner
    /// owns.
    fn feed(&mut self, call: &Call<'_>, sessions: &mut ConditionerSessions) -> Result<Feed>;

    /// Time the last [`feed`](Self::feed) spent running per-step graphs; `None` for a conditioner
    /// that runs none this request (timings then have no per-step entry for it).
    fn graph_time(&self) -> Option<std::time::Duration> {
        None
    }
}

/// T2I-Adapters, once per request: their weighted features summed per residual slot
/// ([`AdapterSet::residuals`]) and repeated over the UNet batch like the text, fed to the calls
/// `cond_tau` selects, and zeros after (or throughout, when the request names no adapter).
pub(crate) struct T2iAdapters {
    slots: Vec<ResidualSlot>,
    residuals: Vec<ArrayD<f32>>,
    /// Model calls (from the first) that get the residuals; 0 feeds zeros throughout.
    calls: usize,
}

impl T2iAdapters {
    /// Runs the request's adapters once. `batch` is the UNet batch; `(lh, lw)` the latent size.
    pub(crate) fn prepare(
        manifest: &Manifest,
        adapters: &AdapterSet,
        sessions: &mut ConditionerSessions,
        batch: usize,
        (lh, lw): (usize, usize),
        calls: usize,
    ) -> Result<T2iAdapters> {
        let features = adapters.residuals(manifest, &mut sessions.adapters)?;
        let residuals = features
            .into_iter()
            .zip(&manifest.residual_slots)
            .map(|(features, slot)| match features {
                Some(features) => features.select(Axis(0), &vec![0; batch]),
                None => ArrayD::zeros(IxDyn(&[
                    batch,
                    slot.channels,
                    lh / slot.downscale as usize,
                    lw / slot.downscale as usize,
                ])),
            })
            .collect();
        let calls = if adapters.is_empty() { 0 } else { calls };
        Ok(T2iAdapters { slots: manifest.residual_slots.clone(), residuals, calls })
    }

    fn inputs(&self, zeros: bool) -> Vec<(String, ArrayD<f32>)> {
        self.slots
            .iter()
            .zip(&self.residuals)
            .map(|(slot, r)| (slot.input.clone(), if zeros { ArrayD::zeros(r.raw_dim()) } else { r.clone() }))
            .collect()
    }
}

impl Conditioner for T2iAdapters {
    fn feed(&mut self, call: &Call<'_>, _: &mut ConditionerSessions) -> Result<Feed> {
        Ok(match call.index {
            0 => Feed::Bind(self.inputs(self.calls == 0)),
            i if i == self.calls => Feed::Bind(self.inputs(true)),
            _ => Feed::Keep,
        })
    }
}

/// How many model calls (from the first) get adapter residuals. `cond_tau = 1` is every call:
/// `StableDiffusionAdapterPipeline` has no factor and always adds them (with Heun's two calls per
/// step too). Below 1 it is the XL pipeline's `int(num_inference_steps * adapter_conditioning_factor)`
/// with the factor as the Python float the user would type: an f32 such as 0.7 is widened through
/// its shortest decimal form, so 10 steps × 0.7 gives 7 like Python, not 6.
pub(crate) fn adapter_calls(steps: usize, cond_tau: f32) -> usize {
    if cond_tau >= 1.0 {
        return usize::MAX;
    }
    (steps as f64 * python_float(cond_tau)) as usize
}

/// `value` as the Python float of its shortest decimal form (what a user typed: 0.7, not
/// 0.699999988079071).
pub(crate) fn python_float(value: f32) -> f64 {
    value.to_string().parse().unwrap_or(f64::from(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapter_calls_follow_python_arithmetic() {
        assert_eq!(adapter_calls(10, 1.0), usize::MAX);
        // Python: int(10 * 0.7) == 7, int(10 * 0.3) == 3, int(6 * 0.5) == 3, int(30 * 0.1) == 3.
        assert_eq!(adapter_calls(10, 0.7), 7);
        assert_eq!(adapter_calls(10, 0.3), 3);
        assert_eq!(adapter_calls(6, 0.5), 3);
        assert_eq!(adapter_calls(30, 0.1), 3);
        assert_eq!(adapter_calls(10, 0.0), 0);
    }

    fn feeds(calls: usize, total: usize) -> Vec<&'static str> {
        let slot = ResidualSlot { input: "r0".into(), channels: 1, downscale: 1 };
        let residual = ArrayD::from_elem(IxDyn(&[1, 1, 1, 1]), 2.0f32);
        let mut t2i = T2iAdapters { slots: vec![slot], residuals: vec![residual], calls };
        let mut sessions = ConditionerSessions::empty();
        let sample = ArrayD::zeros(IxDyn(&[1, 1, 1, 1]));
        (0..total)
            .map(|index| {
                let call = Call { index, timestep: 0.0, sample: sample.view() };
                match t2i.feed(&call, &mut sessions).unwrap() {
                    Feed::Keep => "keep",
                    Feed::Bind(inputs) if inputs[0].1.iter().all(|&v| v == 0.0) => "zeros",
                    Feed::Bind(_) => "residuals",
                }
            })
            .collect()
    }

    #[test]
    fn adapters_feed_their_calls_then_zeros() {
        assert_eq!(feeds(2, 4), ["residuals", "keep", "zeros", "keep"]);
        assert_eq!(feeds(usize::MAX, 3), ["residuals", "keep", "keep"]);
        assert_eq!(feeds(0, 3), ["zeros", "keep", "keep"]);
    }
}
