//! Text conditioning: prompts → token ids → every text encoder → the UNet's
//! `encoder_hidden_states`, SDXL's pooled `text_embeds` and its size/crop `time_ids`, in the
//! classifier-free-guidance batch order diffusers uses. How many encoders there are, which outputs
//! form the hidden states, and whether a missing negative prompt means zero embeddings all come
//! from the manifest.

use ndarray::{ArrayD, Axis, IxDyn};

use crate::backend::{GraphSession, TensorView};
use crate::error::{check_finite, Error, Result, Stage};
use crate::manifest::{Manifest, TextEncoderSpec};
use crate::request::Request;
use crate::tokenizer::PromptTokenizer;

/// What the text encoders give for a batch of prompts.
#[derive(Debug, Clone)]
pub struct TextEmbeddings {
    /// `encoder_hidden_states` rows [prompts, max_length, D].
    pub hidden: ArrayD<f32>,
    /// `text_embeds` rows [prompts, P] when the UNet takes them (SDXL).
    pub pooled: Option<ArrayD<f32>>,
}

/// The UNet's text inputs for one request, one row per UNet batch row.
#[derive(Clone)]
pub(crate) struct TextConditioning {
    pub hidden: ArrayD<f32>,
    pub text_embeds: Option<ArrayD<f32>>,
    pub time_ids: Option<ArrayD<f32>>,
}

impl TextConditioning {
    /// The UNet inputs, by name.
    pub fn inputs(&self) -> Vec<(&'static str, TensorView<'_>)> {
        let mut inputs = vec![("encoder_hidden_states", TensorView::F32(self.hidden.view()))];
        if let Some(text_embeds) = &self.text_embeds {
            inputs.push(("text_embeds", TensorView::F32(text_embeds.view())));
        }
        if let Some(time_ids) = &self.time_ids {
            inputs.push(("time_ids", TensorView::F32(time_ids.view())));
        }
        inputs
    }
}

/// Encodes `request`'s prompts for a UNet batch of `n` samples (twice that with `guided`): rows
/// [negative × n, prompt × n] with guidance, [prompt × n] without (diffusers' order). With the
/// manifest's `force_zeros_for_empty_prompt` and no negative prompt, the negative rows are zeros.
/// Returns the conditioning and the time spent tokenizing and encoding.
pub(crate) fn encode_request(
    manifest: &Manifest,
    tokenizers: &[PromptTokenizer],
    encoders: &mut [Box<dyn GraphSession>],
    request: &Request,
    (width, height): (u32, u32),
    guided: bool,
) -> Result<(TextConditioning, std::time::Duration, std::time::Duration)> {
    let n = request.n_samples;
    let zero_negative = guided && request.negative_prompt.is_none() && manifest.force_zeros_for_empty_prompt;
    let negative = request.negative_prompt.as_deref().unwrap_or("");
    let prompts: Vec<&str> =
        if guided && !zero_negative { vec![negative, &request.prompt] } else { vec![&request.prompt] };
    let clock = std::time::Instant::now();
    let ids = token_ids(tokenizers, &prompts)?;
    let tokenize = clock.elapsed();
    let clock = std::time::Instant::now();
    let mut embeddings = encode_ids(manifest, encoders, &ids)?;
    let encode = clock.elapsed();
    if zero_negative {
        embeddings = embeddings.with_zero_row_first();
    }
    let rows: Vec<usize> = (0..if guided { 2 } else { 1 }).flat_map(|i| std::iter::repeat_n(i, n)).collect();
    let batch = rows.len();
    let time_ids = manifest.added_cond.time_ids.as_ref().map(|_| {
        let values: Vec<f32> = if request.init_image.is_some() {
            // The img2img and inpaint pipelines (pipeline_stable_diffusion_xl_img2img.py,
            // `_get_add_time_ids` and `__call__`): negative sizes default to the positive ones
            // one by one, the negative row takes the *positive* crop, and the rows are
            // `[negative × n, positive × n]` like the embeddings.
            let (positive, negative) = request.size_cond.img2img_time_ids(width, height);
            rows.iter().flat_map(|&r| if guided && r == 0 { negative } else { positive }).collect()
        } else {
            // The adapter pipeline: `torch.cat([negative_add_time_ids, add_time_ids]).repeat(n, 1)`:
            // the [negative, positive] pair is tiled, so for n > 1 rows alternate.
            let (positive, negative) = request.size_cond.time_ids(width, height);
            let pair: Vec<[f32; 6]> = if guided { vec![negative, positive] } else { vec![positive] };
            (0..batch).flat_map(|r| pair[r % pair.len()]).collect()
        };
        ArrayD::from_shape_vec(IxDyn(&[batch, 6]), values).expect("batch × 6 values")
    });
    let text = TextConditioning {
        hidden: embeddings.hidden.select(Axis(0), &rows),
        text_embeds: embeddings.pooled.as_ref().map(|p| p.select(Axis(0), &rows)),
        time_ids,
    };
    Ok((text, tokenize, encode))
}

/// Token ids [prompts, max_length] for `prompts`, one batch per text encoder.
pub(crate) fn token_ids(tokenizers: &[PromptTokenizer], prompts: &[&str]) -> Result<Vec<ArrayD<i64>>> {
    tokenizers
        .iter()
        .map(|tokenizer| {
            let length = tokenizer.max_length();
            let mut ids = Vec::with_capacity(prompts.len() * length);
            for prompt in prompts {
                ids.extend(tokenizer.encode(prompt)?);
            }
            ArrayD::from_shape_vec(IxDyn(&[prompts.len(), length]), ids)
                .map_err(|e| Error::Tokenizer(format!("token batch: {e}")))
        })
        .collect()
}

/// Runs every text encoder on its token batch: their hidden outputs concatenated on the last axis
/// ([prompts, max_length, ΣD]), and the pooled output the UNet takes, if any.
pub(crate) fn encode_ids(
    manifest: &Manifest,
    encoders: &mut [Box<dyn GraphSession>],
    ids: &[ArrayD<i64>],
) -> Result<TextEmbeddings> {
    let mut hidden = Vec::with_capacity(manifest.text_encoders.len());
    let mut pooled = None;
    for ((spec, ids), session) in manifest.text_encoders.iter().zip(ids).zip(encoders.iter_mut()) {
        let outputs = session.run(&[("input_ids", TensorView::I64(ids.view()))])?;
        check_finite(&outputs, || Stage::TextEncoder(spec.name.clone()))?;
        hidden.push(output(spec, outputs.clone(), &spec.hidden_output)?);
        if manifest.added_cond.text_embeds.as_ref() == Some(&spec.name) {
            if let Some(name) = &spec.pooled_output {
                pooled = Some(output(spec, outputs, name)?);
            }
        }
    }
    let hidden = if hidden.len() == 1 {
        hidden.pop().expect("one encoder")
    } else {
        let views: Vec<_> = hidden.iter().map(|h| h.view()).collect();
        ndarray::concatenate(Axis(hidden[0].ndim() - 1), &views).map_err(|e| Error::Backend {
            backend: "pipeline",
            graph: "text_encoder".into(),
            message: format!("text encoders' hidden states do not concatenate: {e}; re-export the graph set"),
        })?
    };
    Ok(TextEmbeddings { hidden, pooled })
}

impl TextEmbeddings {
    /// Prepends an all-zero row: diffusers' `force_zeros_for_empty_prompt` negative embeddings.
    fn with_zero_row_first(self) -> TextEmbeddings {
        let prepend = |a: ArrayD<f32>| -> ArrayD<f32> {
            let zeros = ArrayD::zeros(a.slice_axis(Axis(0), (0..1).into()).raw_dim());
            ndarray::concatenate(Axis(0), &[zeros.view(), a.view()]).expect("rows of one shape")
        };
        TextEmbeddings { hidden: prepend(self.hidden), pooled: self.pooled.map(prepend) }
    }
}

/// The output called `name` of a text encoder's run (outputs come in the graph's output order).
fn output(spec: &TextEncoderSpec, outputs: Vec<ArrayD<f32>>, name: &str) -> Result<ArrayD<f32>> {
    let index = spec.graph.outputs.iter().position(|o| o.name == name);
    index.and_then(|i| outputs.into_iter().nth(i)).ok_or_else(|| Error::Backend {
        backend: "pipeline",
        graph: spec.name.clone(),
        message: format!("graph returned no output {name}; re-export the graph set"),
    })
}
