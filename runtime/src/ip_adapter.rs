//! The IP-Adapter conditioner: one reference image, encoded once per request into image tokens that
//! every cross-attention layer of the UNet attends to, times `ip_scale`.
//!
//! Semantics are diffusers' `StableDiffusionPipeline` with `load_ip_adapter` and
//! `ip_adapter_image` (`IPAdapterMixin`, loaders/ip_adapter.py; `encode_image` and
//! `prepare_ip_adapter_image_embeds` in pipelines/stable_diffusion/pipeline_stable_diffusion.py):
//! the image goes through `CLIPImageProcessor` ([`crate::clip_image`]), the CLIP vision encoder and
//! the adapter's image projection (`encoder_hid_proj`), with the manifest's `negative` as the
//! guidance row; the tokens are repeated over the UNet batch (`[negative × n; image × n]` with
//! guidance). A request without an image feeds zero tokens and scale 0, which is exactly "no
//! IP-Adapter" (the UNet adds `0 × attention`), so one UNet graph serves both.

use image::RgbImage;
use ndarray::{concatenate, Array4, ArrayD, Axis, IxDyn};
use sha2::{Digest, Sha256};

use crate::adapter::ConditionSource;
use crate::backend::{GraphSession, TensorView};
use crate::clip_image::{clip_pixel_values, load_clip_image_as, ClipImageConfig, ClipResize};
use crate::condition::ConditionKind;
use crate::conditioning::{Call, Conditioner, ConditionerSessions, Feed};
use crate::error::{check_finite, Error, Field, Result, Stage};
use crate::limits::Limits;
use crate::manifest::{Dim, IpAdapterSpec, IpNegative, IpPreprocess, Manifest};
use crate::resample::Filter;
use crate::size::Size;

/// Image embeddings kept per worker, keyed by the preprocessed pixels: a service that sends the same
/// reference image again skips the image encoder. Small: the least useful entry is simply the
/// oldest.
const CACHE_ENTRIES: usize = 8;

/// The manifest's `preprocess` as the [`ClipImageConfig`] that reproduces it.
pub(crate) fn clip_config(ip: &IpAdapterSpec) -> ClipImageConfig {
    preprocess_config(&ip.preprocess)
}

/// A manifest `preprocess` entry (IP-Adapter or style adapter) as the [`ClipImageConfig`] that
/// reproduces it.
pub(crate) fn preprocess_config(pre: &IpPreprocess) -> ClipImageConfig {
    ClipImageConfig {
        do_convert_rgb: pre.convert_rgb,
        do_resize: pre.shortest_edge.is_some(),
        size: ClipResize::ShortestEdge(pre.shortest_edge.unwrap_or(1)),
        // manifest::check_preprocess admits bicubic and lanczos only.
        resample: if pre.resample == "lanczos" { Filter::Lanczos } else { Filter::Bicubic },
        do_center_crop: pre.crop.is_some(),
        crop_size: pre.crop.map_or(Size { width: 1, height: 1 }, |[width, height]| Size { width, height }),
        do_rescale: true,
        rescale_factor: pre.rescale_factor,
        do_normalize: true,
        image_mean: pre.mean,
        image_std: pre.std,
    }
}

/// The request's IP-Adapter image as the image encoder's `pixel_values` [1, 3, H, W]: loaded and
/// preprocessed as the manifest says. `Ok(None)` without an image; an image for a set without an
/// IP-Adapter is refused.
pub(crate) fn pixel_values(
    manifest: &Manifest,
    image: Option<&ConditionSource>,
    limits: &Limits,
) -> Result<Option<Array4<f32>>> {
    let Some(source) = image else {
        return Ok(None);
    };
    let ip = manifest.ip_adapter.as_ref().ok_or_else(|| {
        Error::request(
            Field::IpImage,
            "this graph set has no IP-Adapter; export it with --ip-adapter FILE --image-encoder DIR to use a \
             reference image",
        )
    })?;
    source_pixel_values(source, &clip_config(ip), limits, Field::IpImage, "IP-Adapter image").map(Some)
}

/// `source` loaded and preprocessed by `config` into `pixel_values` [1, 3, H, W]; errors call it
/// `what` and name `field`.
pub(crate) fn source_pixel_values(
    source: &ConditionSource,
    config: &ClipImageConfig,
    limits: &Limits,
    field: Field,
    what: &str,
) -> Result<Array4<f32>> {
    let rgb = match source {
        ConditionSource::File(path) => load_clip_image_as(path, config, limits, what)?,
        ConditionSource::Pixels(image) => {
            let (w, h) = (image.width(), image.height());
            let px = match image.kind() {
                ConditionKind::Rgb => image.pixels().to_vec(),
                ConditionKind::Gray => image.pixels().iter().flat_map(|&v| [v, v, v]).collect(),
            };
            RgbImage::from_raw(w, h, px).ok_or_else(|| Error::request(field, "image pixels do not match their size"))?
        }
    };
    clip_pixel_values(&rgb, config)
}

/// Image encoder outputs by the SHA-256 of the `pixel_values` bytes and the row layout, oldest
/// first. Independent of `ip_scale`, which only the UNet applies.
#[derive(Default)]
pub(crate) struct EmbedCache {
    entries: Vec<([u8; 32], ArrayD<f32>)>,
}

impl EmbedCache {
    fn get(&self, key: &[u8; 32]) -> Option<ArrayD<f32>> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
    }

    fn put(&mut self, key: [u8; 32], value: ArrayD<f32>) {
        if self.entries.len() >= CACHE_ENTRIES {
            self.entries.remove(0);
        }
        self.entries.push((key, value));
    }
}

fn cache_key(pixels: &Array4<f32>, rows: usize) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update((rows as u64).to_le_bytes());
    for v in pixels.iter() {
        hash.update(v.to_le_bytes());
    }
    hash.finalize().into()
}

/// The IP-Adapter of one request as a once-per-request [`Conditioner`].
pub(crate) struct IpAdapter {
    inputs: Option<Vec<(String, ArrayD<f32>)>>,
}

impl IpAdapter {
    /// Encodes the request's image (if any) and builds the UNet's tokens for `n` images per prompt,
    /// `guided` doubling the batch; `scale` is the request's `ip_scale` (0 without an image).
    pub(crate) fn prepare(
        ip: &IpAdapterSpec,
        pixels: Option<&Array4<f32>>,
        scale: f32,
        sessions: &mut ConditionerSessions,
        guided: bool,
        n: usize,
    ) -> Result<IpAdapter> {
        let batch = if guided { 2 * n } else { n };
        let (tokens, scale) = match pixels {
            None => (ArrayD::zeros(IxDyn(&[batch, ip.num_tokens, token_width(ip)?])), 0.0),
            Some(pixels) => {
                let tokens = image_tokens(ip, pixels, sessions, guided)?;
                // `[negative, image]` rows (or `[image]`) repeated like diffusers' `repeat` + `cat`.
                let rows: Vec<usize> = if guided {
                    std::iter::repeat_n(0, n).chain(std::iter::repeat_n(1, n)).collect()
                } else {
                    vec![0; n]
                };
                (tokens.select(Axis(0), &rows), scale)
            }
        };
        let scale = ArrayD::from_elem(IxDyn(&[1]), scale);
        Ok(IpAdapter {
            inputs: Some(vec![(ip.unet_inputs.tokens.clone(), tokens), (ip.unet_inputs.scale.clone(), scale)]),
        })
    }
}

/// The UNet's token width (cross_attention_dim), from the manifest.
fn token_width(ip: &IpAdapterSpec) -> Result<usize> {
    let dims = ip.image_projection.outputs.iter().find(|t| t.name == ip.unet_inputs.tokens).map(|t| &t.dims);
    match dims.and_then(|d| d.get(2)) {
        Some(Dim::Fixed(d)) if *d > 0 => Ok(*d as usize),
        _ => Err(Error::GraphSet {
            dir: std::path::PathBuf::from("ip_adapter"),
            message: "the image projection's token width is not fixed in the manifest; re-export the graph set".into(),
        }),
    }
}

/// `[negative; image]` tokens with guidance, `[image]` without: [rows, num_tokens, D].
fn image_tokens(
    ip: &IpAdapterSpec,
    pixels: &Array4<f32>,
    sessions: &mut ConditionerSessions,
    guided: bool,
) -> Result<ArrayD<f32>> {
    let (encoder, projection) = match (sessions.image_encoder.as_mut(), sessions.image_projection.as_mut()) {
        (Some(e), Some(p)) => (e, p),
        _ => return Err(internal("no IP-Adapter graph sessions were opened".into())),
    };
    // diffusers' encode_image: Plus encodes all-zero pixel_values for the negative row.
    let zero_pixels = guided && ip.negative == IpNegative::ZeroPixelValues;
    let key = cache_key(pixels, usize::from(zero_pixels) + 1);
    let embeds = match sessions.ip_cache.get(&key) {
        Some(embeds) => embeds,
        None => {
            let rows = if zero_pixels {
                concatenate(Axis(0), &[Array4::zeros(pixels.raw_dim()).view(), pixels.view()])
                    .map_err(|e| internal(e.to_string()))?
            } else {
                pixels.clone()
            };
            let embeds = run_one(encoder.as_mut(), "pixel_values", rows.into_dyn(), "image_encoder")?;
            sessions.ip_cache.put(key, embeds.clone());
            embeds
        }
    };
    let embeds = match (guided, ip.negative) {
        (true, IpNegative::ZeroEmbeds) => {
            concatenate(Axis(0), &[ArrayD::zeros(embeds.raw_dim()).view(), embeds.view()])
                .map_err(|e| internal(e.to_string()))?
        }
        _ => embeds,
    };
    let tokens = run_one(projection.as_mut(), "image_embeds", embeds, "image_projection")?;
    let want_rows = if guided { 2 } else { 1 };
    if tokens.ndim() != 3 || tokens.shape()[0] != want_rows || tokens.shape()[1] != ip.num_tokens {
        return Err(Error::Backend {
            backend: "pipeline",
            graph: "ip_adapter_image_projection".into(),
            message: format!(
                "gave tokens of shape {:?}, expected [{want_rows}, {}, D]; re-export the graph set",
                tokens.shape(),
                ip.num_tokens
            ),
        });
    }
    Ok(tokens)
}

fn run_one(session: &mut dyn GraphSession, input: &str, value: ArrayD<f32>, graph: &str) -> Result<ArrayD<f32>> {
    let outputs = session.run(&[(input, TensorView::F32(value.view()))])?;
    check_finite(&outputs, || Stage::IpAdapter(graph.to_string()))?;
    outputs.into_iter().next().ok_or_else(|| Error::Backend {
        backend: "pipeline",
        graph: format!("ip_adapter_{graph}"),
        message: "graph returned no output".into(),
    })
}

fn internal(message: String) -> Error {
    Error::Backend { backend: "pipeline", graph: "ip_adapter".into(), message }
}

impl Conditioner for IpAdapter {
    fn feed(&mut self, _: &Call<'_>, _: &mut ConditionerSessions) -> Result<Feed> {
        // Bound once, at the first call; the same tokens serve every step.
        Ok(self.inputs.take().map_or(Feed::Keep, Feed::Bind))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    fn spec(negative: IpNegative) -> IpAdapterSpec {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../graphs/generated/tiny-sd1-ip");
        let text = std::fs::read_to_string(dir.join("manifest.json"))
            .expect("graphs/generated/tiny-sd1-ip is generated, not committed: run bash scripts/generate-sets.sh");
        let mut ip = Manifest::parse(&text, &dir).unwrap().ip_adapter.unwrap();
        ip.negative = negative;
        ip
    }

    /// The first value of each row of each call a fake graph saw.
    type Log = Arc<Mutex<Vec<Vec<f32>>>>;

    /// Encoder: each row's first pixel value + 1, as a [rows, 2] embedding. Projection: 4 tokens
    /// of width 4 holding the embedding's first value. Both log the rows they saw.
    struct Fake {
        rows: Log,
        projection: bool,
    }

    impl GraphSession for Fake {
        fn run(&mut self, inputs: &[(&str, TensorView<'_>)]) -> Result<Vec<ArrayD<f32>>> {
            let TensorView::F32(x) = &inputs[0].1 else { panic!("f32 input") };
            let firsts: Vec<f32> = x.outer_iter().map(|r| r.iter().next().copied().unwrap()).collect();
            self.rows.lock().unwrap().push(firsts.clone());
            let n = firsts.len();
            Ok(vec![if self.projection {
                ArrayD::from_shape_fn(IxDyn(&[n, 4, 4]), |ix| firsts[ix[0]])
            } else {
                ArrayD::from_shape_fn(IxDyn(&[n, 2]), |ix| firsts[ix[0]] + 1.0)
            }])
        }
        fn bind(&mut self, _: &[(&str, TensorView<'_>)]) -> Result<()> {
            Ok(())
        }
        fn unbind(&mut self) {}
    }

    fn sessions() -> (ConditionerSessions, Log, Log) {
        let (enc, proj) = (Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(Vec::new())));
        let sessions = ConditionerSessions {
            image_encoder: Some(Box::new(Fake { rows: enc.clone(), projection: false })),
            image_projection: Some(Box::new(Fake { rows: proj.clone(), projection: true })),
            ..ConditionerSessions::empty()
        };
        (sessions, enc, proj)
    }

    fn bound(ip: &mut IpAdapter) -> (Vec<f32>, Vec<usize>, f32) {
        let sample = ArrayD::zeros(IxDyn(&[1]));
        let call = Call { index: 0, timestep: 0.0, sample: sample.view() };
        let Feed::Bind(inputs) = ip.feed(&call, &mut ConditionerSessions::empty()).unwrap() else { panic!("bind") };
        assert!(matches!(ip.feed(&call, &mut ConditionerSessions::empty()).unwrap(), Feed::Keep));
        assert_eq!((inputs[0].0.as_str(), inputs[1].0.as_str()), ("ip_tokens", "ip_scale"));
        let rows = inputs[0].1.outer_iter().map(|r| r.iter().next().copied().unwrap()).collect();
        (rows, inputs[0].1.shape().to_vec(), inputs[1].1[[0]])
    }

    #[test]
    fn the_manifest_preprocess_is_clip_image_processor_default() {
        assert_eq!(clip_config(&spec(IpNegative::ZeroEmbeds)), ClipImageConfig::for_image_size(224));
    }

    #[test]
    fn rows_are_negative_times_n_then_image_times_n() {
        let pixels = Array4::from_elem((1, 3, 224, 224), 5.0f32);
        let (mut s, enc, proj) = sessions();
        let mut ip = IpAdapter::prepare(&spec(IpNegative::ZeroEmbeds), Some(&pixels), 0.6, &mut s, true, 2).unwrap();
        assert_eq!(bound(&mut ip), (vec![0.0, 0.0, 6.0, 6.0], vec![4, 4, 4], 0.6));
        // zero_embeds: the encoder sees the image only; the projection [zeros; embeds].
        assert_eq!(
            (enc.lock().unwrap().clone(), proj.lock().unwrap().clone()),
            (vec![vec![5.0]], vec![vec![0.0, 6.0]])
        );
        // Without guidance: the image rows only.
        let mut ip = IpAdapter::prepare(&spec(IpNegative::ZeroEmbeds), Some(&pixels), 1.0, &mut s, false, 3).unwrap();
        assert_eq!(bound(&mut ip).0, vec![6.0, 6.0, 6.0]);
        // The second and third requests found the embeds in the cache.
        assert_eq!(enc.lock().unwrap().len(), 1);
    }

    #[test]
    fn plus_encodes_zero_pixel_values_for_the_negative() {
        let pixels = Array4::from_elem((1, 3, 224, 224), 5.0f32);
        let (mut s, enc, proj) = sessions();
        let mut ip =
            IpAdapter::prepare(&spec(IpNegative::ZeroPixelValues), Some(&pixels), 0.5, &mut s, true, 1).unwrap();
        assert_eq!(bound(&mut ip).0, vec![1.0, 6.0]);
        assert_eq!(
            (enc.lock().unwrap().clone(), proj.lock().unwrap().clone()),
            (vec![vec![0.0, 5.0]], vec![vec![1.0, 6.0]])
        );
    }

    #[test]
    fn no_image_is_zero_tokens_and_scale_zero_without_running_graphs() {
        let (mut s, enc, proj) = sessions();
        let mut ip = IpAdapter::prepare(&spec(IpNegative::ZeroEmbeds), None, 1.0, &mut s, true, 2).unwrap();
        assert_eq!(bound(&mut ip), (vec![0.0; 4], vec![4, 4, 4], 0.0));
        assert!(enc.lock().unwrap().is_empty() && proj.lock().unwrap().is_empty());
    }

    #[test]
    fn an_image_for_a_set_without_ip_adapter_names_the_export_flag() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../graphs/tiny-sd1");
        let m = Manifest::load(&dir, false).unwrap();
        let e = pixel_values(&m, Some(&ConditionSource::File("x.png".into())), &Limits::default()).unwrap_err();
        assert!(
            matches!(&e, Error::InvalidRequest { field: Field::IpImage, message } if message.contains("--ip-adapter"))
        );
    }
}
