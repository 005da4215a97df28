//! The style-adapter conditioner: TencentARC's T2I style adapter (`t2iadapter_style_sd14v1.pth`).
//! Each style image is encoded once per request into style tokens that lengthen the UNet's text
//! context (`encoder_hidden_states`), for the first steps `style_cond_tau` allows.
//!
//! diffusers has no style adapter; the semantics are TencentARC's original code as ported in
//! export/t2i_export/style_adapter.py (TencentARC/T2I-Adapter@16bba674):
//! * `ldm/modules/extra_condition/api.py` `get_cond_style` / `get_adapter_feature`: each image goes
//!   through `CLIPProcessor` ([`crate::clip_image`]), the CLIP vision encoder's
//!   `last_hidden_state` and the `StyleAdapter`; its tokens times the image's weight, several
//!   images concatenated along the token axis (`combine_style_tokens`).
//! * `ldm/models/diffusion/ddim.py` `p_sample_ddim`: the conditional context is the text's tokens
//!   followed by the style tokens; with guidance the unconditional context is padded with its own
//!   last P tokens (`style_context`). `ddim_sampling` passes the tokens only while
//!   `T - i - 1 >= int((1 - style_cond_tau) × T)` (`style_active`); later steps see the plain text.
//!
//! The conditioner owns `encoder_hidden_states` only while the style applies: it binds the styled
//! contexts at the first call and the plain ones at the first call without style, so the loop
//! stays unaware of it.

use ndarray::{concatenate, s, Array4, ArrayD, Axis};

use crate::adapter::ConditionSource;
use crate::backend::{GraphSession, TensorView};
use crate::conditioning::{python_float, Call, Conditioner, ConditionerSessions, Feed};
use crate::error::{check_finite, Error, Field, Result, Stage};
use crate::ip_adapter::{preprocess_config, source_pixel_values};
use crate::limits::Limits;
use crate::manifest::{Manifest, StyleAdapterSpec};

/// One style image of a request and its weight (the original's `cond_weight`: the image's tokens
/// are multiplied by it; 1 is the adapter as trained).
#[derive(Debug, Clone)]
pub struct StyleRequest {
    pub image: ConditionSource,
    /// Finite; 0 keeps the tokens' slots in the context but zeroes them.
    pub weight: f32,
}

impl std::str::FromStr for StyleRequest {
    type Err = Error;

    /// Parses `IMAGE[:WEIGHT]`; the weight defaults to 1.0 (a trailing `:x` that is not a number
    /// stays part of the path).
    fn from_str(s: &str) -> Result<Self> {
        let (image, weight) = match s.rsplit_once(':').map(|(image, w)| (image, w.parse::<f32>())) {
            Some((image, Ok(weight))) => (image, weight),
            _ => (s, 1.0),
        };
        if image.is_empty() {
            return Err(Error::request(
                Field::Styles,
                format!("style {s:?} must look like IMAGE[:WEIGHT], e.g. painting.png:0.5"),
            ));
        }
        Ok(StyleRequest { image: ConditionSource::File(image.into()), weight })
    }
}

/// A checked style image: its `pixel_values` [1, 3, H, W] and weight.
#[derive(Debug, Clone)]
pub(crate) struct StylePixels {
    pub pixels: Array4<f32>,
    pub weight: f32,
}

/// The request's style images, loaded and preprocessed as the manifest says. Empty without
/// styles; styles for a set without a style adapter, more images than `max_images`, a
/// non-finite weight or an unreadable image are refused.
pub(crate) fn style_pixels(manifest: &Manifest, styles: &[StyleRequest], limits: &Limits) -> Result<Vec<StylePixels>> {
    if styles.is_empty() {
        return Ok(Vec::new());
    }
    let spec = manifest.style_adapter.as_ref().ok_or_else(|| {
        Error::request(
            Field::Styles,
            "this graph set has no style adapter; export it with --style-adapter FILE --style-encoder DIR to use \
             style images",
        )
    })?;
    if styles.len() > spec.max_images {
        return Err(Error::request(
            Field::Styles,
            format!(
                "{} style images, but this style adapter takes at most {} (the negative context pads itself with \
                 its own last {} tokens per image); use fewer",
                styles.len(),
                spec.max_images,
                spec.num_tokens
            ),
        ));
    }
    let config = preprocess_config(&spec.preprocess);
    styles
        .iter()
        .map(|style| {
            if !style.weight.is_finite() {
                return Err(Error::request(
                    Field::Styles,
                    format!("style weight {} is not a number; give a finite weight (1 is the default)", style.weight),
                ));
            }
            let pixels = source_pixel_values(&style.image, &config, limits, Field::Styles, "style image")?;
            Ok(StylePixels { pixels, weight: style.weight })
        })
        .collect()
}

/// The model calls (from the run's first) that see the style contexts: step `i` of `total_steps`
/// is styled when `total_steps - i - 1 >= int((1 - tau) × total_steps)` (ddim.py
/// `ddim_sampling`), with `tau` as the Python float the user typed; a run starting at
/// `first_step` (img2img) counts its calls from there.
pub(crate) fn style_calls(total_steps: usize, first_step: usize, tau: f32) -> usize {
    let skipped = ((1.0 - python_float(tau)) * total_steps as f64).max(0.0) as usize;
    total_steps.saturating_sub(skipped).saturating_sub(first_step)
}

/// Every style image through `style_encoder` and `style_adapter`, one image per run (their batch is
/// "images"), each image's tokens times its weight, concatenated along the tokens: [1, P, D] with
/// P = `num_tokens` × images (`combine_style_tokens`).
pub(crate) fn style_tokens(
    spec: &StyleAdapterSpec,
    styles: &[StylePixels],
    sessions: &mut ConditionerSessions,
) -> Result<ArrayD<f32>> {
    let missing = |role: &str| Error::GraphSet {
        dir: std::path::PathBuf::from("style_adapter"),
        message: format!("the style adapter's {role} graph is not loaded"),
    };
    let mut all = Vec::with_capacity(styles.len());
    for style in styles {
        let encoder = sessions.style_encoder.as_mut().ok_or_else(|| missing("style_encoder"))?;
        let hidden = run_one(encoder.as_mut(), "pixel_values", style.pixels.view().into_dyn(), "style_encoder")?;
        let adapter = sessions.style_adapter.as_mut().ok_or_else(|| missing("style_adapter"))?;
        let tokens = run_one(adapter.as_mut(), "last_hidden_state", hidden.view(), "style_adapter")?;
        if tokens.ndim() != 3 || tokens.shape()[..2] != [1, spec.num_tokens] {
            return Err(internal(format!(
                "the style_adapter graph gave tokens of shape {:?}, expected [1, {}, D]; re-export the graph set",
                tokens.shape(),
                spec.num_tokens
            )));
        }
        all.push(tokens * style.weight);
    }
    let views: Vec<_> = all.iter().map(|t| t.view()).collect();
    concatenate(Axis(1), &views).map_err(|e| internal(e.to_string()))
}

/// The styled contexts for the UNet batch: `hidden` [batch, L, D] holds the text rows in the UNet's
/// order (`[uncond × n; cond × n]` with `guided`, `[cond × n]` without) and `tokens` [1, P, D] the
/// combined style tokens. Conditional rows become `cat[row, tokens]`, unconditional ones
/// `cat[row, row[L - P..]]` (ddim.py's padding with its own last tokens), all [batch, L + P, D].
pub(crate) fn style_context(hidden: &ArrayD<f32>, tokens: &ArrayD<f32>, guided: bool, n: usize) -> Result<ArrayD<f32>> {
    let (batch, length) = (hidden.shape()[0], hidden.shape()[1]);
    let pad = tokens.shape()[1];
    if hidden.ndim() != 3 || tokens.ndim() != 3 || tokens.shape()[2] != hidden.shape()[2] {
        return Err(internal(format!(
            "text context {:?} and style tokens {:?} do not concatenate; re-export the graph set",
            hidden.shape(),
            tokens.shape()
        )));
    }
    if guided && pad > length {
        return Err(Error::request(
            Field::Styles,
            format!("{pad} style tokens, but the negative context pads with its own last tokens and has only {length}"),
        ));
    }
    let rows: Vec<ArrayD<f32>> = (0..batch)
        .map(|r| {
            let row = hidden.slice(s![r..r + 1, .., ..]).into_dyn();
            let tail =
                if guided && r < n { hidden.slice(s![r..r + 1, length - pad.., ..]).into_dyn() } else { tokens.view() };
            concatenate(Axis(1), &[row, tail])
        })
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| internal(e.to_string()))?;
    let views: Vec<_> = rows.iter().map(|r| r.view()).collect();
    concatenate(Axis(0), &views).map_err(|e| internal(e.to_string()))
}

fn run_one(
    session: &mut dyn GraphSession,
    input: &str,
    value: ndarray::ArrayViewD<'_, f32>,
    graph: &str,
) -> Result<ArrayD<f32>> {
    let outputs = session.run(&[(input, TensorView::F32(value))])?;
    check_finite(&outputs, || Stage::StyleAdapter(graph.to_string()))?;
    outputs.into_iter().next().ok_or_else(|| Error::Backend {
        backend: "pipeline",
        graph: graph.to_string(),
        message: "graph returned no output".into(),
    })
}

fn internal(message: String) -> Error {
    Error::Backend { backend: "pipeline", graph: "style_adapter".into(), message }
}

/// The style adapter of one request as a once-per-request [`Conditioner`]: the styled contexts for
/// the first `calls` model calls, the plain text contexts after.
pub(crate) struct StyleAdapter {
    input: String,
    styled: Option<ArrayD<f32>>,
    plain: Option<ArrayD<f32>>,
    calls: usize,
}

impl StyleAdapter {
    /// Encodes the request's style images and builds the styled contexts from the text rows
    /// `hidden` ([`style_context`]); `calls` is [`style_calls`]'.
    pub(crate) fn prepare(
        spec: &StyleAdapterSpec,
        styles: &[StylePixels],
        sessions: &mut ConditionerSessions,
        hidden: &ArrayD<f32>,
        guided: bool,
        n: usize,
        calls: usize,
    ) -> Result<StyleAdapter> {
        let styled = if calls > 0 {
            let tokens = style_tokens(spec, styles, sessions)?;
            Some(style_context(hidden, &tokens, guided, n)?)
        } else {
            None
        };
        Ok(StyleAdapter { input: spec.context.unet_input.clone(), styled, plain: Some(hidden.clone()), calls })
    }
}

impl Conditioner for StyleAdapter {
    fn feed(&mut self, call: &Call<'_>, _: &mut ConditionerSessions) -> Result<Feed> {
        let bind = |value: Option<ArrayD<f32>>, input: &str| {
            value.map_or(Feed::Keep, |v| Feed::Bind(vec![(input.to_string(), v)]))
        };
        Ok(match call.index {
            0 if self.calls > 0 => bind(self.styled.take(), &self.input),
            i if i == self.calls => bind(self.plain.take(), &self.input),
            _ => Feed::Keep,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use ndarray::IxDyn;

    use super::*;

    fn spec() -> StyleAdapterSpec {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../graphs/generated/tiny-sd1-style");
        let text = std::fs::read_to_string(dir.join("manifest.json"))
            .expect("graphs/generated/tiny-sd1-style is generated, not committed: run bash scripts/generate-sets.sh");
        Manifest::parse(&text, &dir).unwrap().style_adapter.unwrap()
    }

    #[test]
    fn style_arguments_are_image_and_optional_weight() {
        let parse = |s: &str| s.parse::<StyleRequest>().map(|r| (r.image, r.weight));
        let file = |p: &str| ConditionSource::File(p.into());
        assert!(matches!(parse("a.png"), Ok((f, w)) if f == file("a.png") && w == 1.0));
        assert!(matches!(parse("a.png:0.5"), Ok((f, w)) if f == file("a.png") && w == 0.5));
        assert!(matches!(parse("C:/x.png"), Ok((f, w)) if f == file("C:/x.png") && w == 1.0));
        assert!(matches!(parse(":0.5"), Err(Error::InvalidRequest { field: Field::Styles, .. })));
    }

    #[test]
    fn style_calls_follow_the_original_arithmetic() {
        // tau 1: every step; Python int((1 - 0.7) * 10) == 3 → the first 7 of 10 steps.
        assert_eq!(style_calls(10, 0, 1.0), 10);
        assert_eq!(style_calls(10, 0, 0.7), 7);
        assert_eq!(style_calls(4, 0, 0.5), 2);
        assert_eq!(style_calls(5, 0, 0.5), 3); // int(0.5 * 5) == 2: steps 0, 1, 2
        assert_eq!(style_calls(10, 0, 0.0), 0);
        // img2img from step 4 of 10 at tau 0.7: steps 4, 5, 6 are styled.
        assert_eq!(style_calls(10, 4, 0.7), 3);
        assert_eq!(style_calls(10, 8, 0.7), 0);
    }

    /// Rows [u0, u1, c0, c1] of width 1: a row's values are its id × 100 + token index.
    fn hidden(batch: usize, length: usize) -> ArrayD<f32> {
        ArrayD::from_shape_fn(IxDyn(&[batch, length, 1]), |ix| (ix[0] * 100 + ix[1]) as f32)
    }

    #[test]
    fn cond_rows_get_the_tokens_uncond_rows_their_own_last_tokens() {
        let tokens = ArrayD::from_shape_fn(IxDyn(&[1, 2, 1]), |ix| -1.0 - ix[1] as f32);
        let got = style_context(&hidden(4, 5), &tokens, true, 2).unwrap();
        assert_eq!(got.shape(), [4, 7, 1]);
        let row = |r: usize| got.slice(s![r, .., 0]).to_vec();
        assert_eq!(row(0), [0.0, 1.0, 2.0, 3.0, 4.0, 3.0, 4.0]);
        assert_eq!(row(1), [100.0, 101.0, 102.0, 103.0, 104.0, 103.0, 104.0]);
        assert_eq!(row(2), [200.0, 201.0, 202.0, 203.0, 204.0, -1.0, -2.0]);
        assert_eq!(row(3), [300.0, 301.0, 302.0, 303.0, 304.0, -1.0, -2.0]);
        // Without guidance every row is conditional.
        let got = style_context(&hidden(2, 5), &tokens, false, 2).unwrap();
        assert_eq!(got.slice(s![0, 5.., 0]).to_vec(), [-1.0, -2.0]);
        // More style tokens than the negative context has: refused, not padded.
        let many = ArrayD::zeros(IxDyn(&[1, 6, 1]));
        assert!(matches!(style_context(&hidden(2, 5), &many, true, 1), Err(Error::InvalidRequest { .. })));
    }

    /// Encoder: [rows, 50, 32] filled with the first pixel value; adapter: [rows, 8, 4] filled with
    /// the hidden state's first value + 1. Both log what they saw.
    struct Fake {
        seen: Arc<Mutex<Vec<Vec<usize>>>>,
        adapter: bool,
    }

    impl GraphSession for Fake {
        fn run(&mut self, inputs: &[(&str, TensorView<'_>)]) -> Result<Vec<ArrayD<f32>>> {
            let TensorView::F32(x) = &inputs[0].1 else { panic!("f32 input") };
            self.seen.lock().unwrap().push(x.shape().to_vec());
            let first = *x.iter().next().unwrap();
            let rows = x.shape()[0];
            Ok(vec![if self.adapter {
                ArrayD::from_elem(IxDyn(&[rows, 8, 4]), first + 1.0)
            } else {
                ArrayD::from_elem(IxDyn(&[rows, 50, 32]), first)
            }])
        }
        fn bind(&mut self, _: &[(&str, TensorView<'_>)]) -> Result<()> {
            Ok(())
        }
        fn unbind(&mut self) {}
    }

    fn sessions() -> (ConditionerSessions, Arc<Mutex<Vec<Vec<usize>>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sessions = ConditionerSessions {
            style_encoder: Some(Box::new(Fake { seen: seen.clone(), adapter: false })),
            style_adapter: Some(Box::new(Fake { seen: seen.clone(), adapter: true })),
            ..ConditionerSessions::empty()
        };
        (sessions, seen)
    }

    fn style(value: f32, weight: f32) -> StylePixels {
        StylePixels { pixels: Array4::from_elem((1, 3, 224, 224), value), weight }
    }

    #[test]
    fn tokens_are_weighted_and_concatenated_in_order() {
        let (mut s, seen) = sessions();
        let tokens = style_tokens(&spec(), &[style(1.0, 1.0), style(3.0, 0.5)], &mut s).unwrap();
        assert_eq!(tokens.shape(), [1, 16, 4]);
        assert_eq!((tokens[[0, 0, 0]], tokens[[0, 7, 3]]), (2.0, 2.0));
        assert_eq!((tokens[[0, 8, 0]], tokens[[0, 15, 3]]), (2.0, 2.0)); // (3 + 1) × 0.5
                                                                         // One image per run, each through the encoder then the adapter.
        assert_eq!(
            *seen.lock().unwrap(),
            [vec![1, 3, 224, 224], vec![1, 50, 32], vec![1, 3, 224, 224], vec![1, 50, 32]]
        );
    }

    fn feeds(calls: usize, total: usize) -> Vec<(String, Vec<usize>)> {
        let (mut s, _) = sessions();
        let text = ArrayD::zeros(IxDyn(&[2, 77, 4]));
        let mut style = StyleAdapter::prepare(&spec(), &[style(1.0, 1.0)], &mut s, &text, true, 1, calls).unwrap();
        let sample = ArrayD::zeros(IxDyn(&[1]));
        (0..total)
            .map(|index| {
                let call = Call { index, timestep: 0.0, sample: sample.view() };
                match style.feed(&call, &mut s).unwrap() {
                    Feed::Keep => ("keep".into(), vec![]),
                    Feed::Bind(inputs) => (inputs[0].0.clone(), inputs[0].1.shape().to_vec()),
                }
            })
            .collect()
    }

    #[test]
    fn styled_contexts_for_their_calls_then_the_plain_ones() {
        let styled = ("encoder_hidden_states".to_string(), vec![2, 85, 4]);
        let plain = ("encoder_hidden_states".to_string(), vec![2, 77, 4]);
        let keep = ("keep".to_string(), vec![]);
        assert_eq!(feeds(2, 4), [styled.clone(), keep.clone(), plain.clone(), keep.clone()]);
        assert_eq!(feeds(3, 3), [styled, keep.clone(), keep.clone()]);
        // No styled call: the plain context, bound at the first call.
        assert_eq!(feeds(0, 2), [plain, keep]);
    }

    #[test]
    fn styles_need_a_set_with_a_style_adapter_and_at_most_max_images() {
        let image = StyleRequest { image: ConditionSource::File("x.png".into()), weight: 1.0 };
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../graphs/tiny-sd1");
        let m = Manifest::load(&dir, false)
            .expect("graphs/generated/tiny-sd1-style is generated, not committed: run bash scripts/generate-sets.sh");
        let e = style_pixels(&m, std::slice::from_ref(&image), &Limits::default()).unwrap_err();
        assert!(
            matches!(&e, Error::InvalidRequest { field: Field::Styles, message } if message.contains("--style-adapter")),
            "{e}"
        );
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../graphs/generated/tiny-sd1-style");
        let m = Manifest::load(&dir, false).unwrap();
        let e = style_pixels(&m, &vec![image.clone(); 10], &Limits::default()).unwrap_err();
        assert!(matches!(&e, Error::InvalidRequest { field: Field::Styles, message } if message.contains("at most 9")));
        let nan = StyleRequest { weight: f32::NAN, ..image };
        let e = style_pixels(&m, &[nan], &Limits::default()).unwrap_err();
        assert!(matches!(&e, Error::InvalidRequest { field: Field::Styles, .. }));
        assert!(style_pixels(&m, &[], &Limits::default()).unwrap().is_empty());
    }
}
