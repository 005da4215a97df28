//! T2I-Adapters attached to a request, each with a condition image and a weight.
//!
//! An [`AdapterSet`] is checked against the graph set when it is built (known names, image size a
//! multiple of each adapter's downscale factor, finite weights, readable images), so a bad request
//! fails before any graph runs.

use std::path::PathBuf;

use ndarray::{Array4, ArrayD};

use crate::backend::{GraphSession, TensorView};
use crate::condition::{ConditionImage, ConditionKind};
use crate::error::{check_finite, Error, Field, Result, Stage};
use crate::limits::Limits;
use crate::manifest::{ConditionChannels, Manifest};
use crate::preprocess::{apply_all, Preprocess};

/// Where a condition image comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum ConditionSource {
    /// A PNG or JPEG file, converted to the adapter's channels like Pillow's `convert`.
    File(PathBuf),
    /// 8-bit pixels already in memory (a service's decoded upload); their channels must be the
    /// adapter's (1 for gray adapters, 3 for rgb ones).
    Pixels(ConditionImage),
}

/// One adapter a request asks for: `--adapter NAME=IMAGE[:WEIGHT]`.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterRequest {
    /// The adapter's name in the graph set's manifest.
    pub name: String,
    /// Condition image; resized to the output size with PIL's Lanczos like diffusers.
    pub image: ConditionSource,
    /// Multiplies this adapter's features (diffusers' `adapter_conditioning_scale`).
    pub weight: f32,
    /// Applied in order to the condition image once it has the output size (canny, palette,
    /// invert: [`Preprocess`]); empty for an image that already is the condition.
    pub preprocess: Vec<Preprocess>,
}

impl std::str::FromStr for AdapterRequest {
    type Err = Error;

    /// Parses `NAME=IMAGE[:WEIGHT]`; the weight defaults to 1.0.
    fn from_str(s: &str) -> Result<Self> {
        let (name, rest) = s.split_once('=').ok_or_else(|| {
            Error::request(
                Field::Adapters,
                format!("adapter {s:?} must look like NAME=IMAGE[:WEIGHT], e.g. sketch=edges.png:0.8"),
            )
        })?;
        let (image, weight) = match rest.rsplit_once(':') {
            Some((image, weight)) if weight.parse::<f32>().is_ok() => (image, weight.parse::<f32>().unwrap_or(1.0)),
            _ => (rest, 1.0),
        };
        if name.is_empty() || image.is_empty() {
            return Err(Error::request(Field::Adapters, format!("adapter {s:?} must look like NAME=IMAGE[:WEIGHT]")));
        }
        Ok(AdapterRequest {
            name: name.to_string(),
            image: ConditionSource::File(PathBuf::from(image)),
            weight,
            preprocess: Vec::new(),
        })
    }
}

/// Adapters ready to run for one request: each with its manifest index, weight and preprocessed
/// condition image ([1, C, H, W], values in [0, 1]).
#[derive(Debug, Clone)]
pub struct AdapterSet {
    entries: Vec<AdapterEntry>,
}

#[derive(Debug, Clone)]
struct AdapterEntry {
    index: usize,
    weight: f32,
    condition: Array4<f32>,
}

impl AdapterSet {
    /// Checks `requests` against `manifest` for an image of `width` × `height` and loads the
    /// condition images.
    pub fn build(manifest: &Manifest, requests: &[AdapterRequest], width: u32, height: u32) -> Result<AdapterSet> {
        Self::build_within(manifest, requests, width, height, &Limits::default())
    }

    /// [`build`](Self::build), with condition image files held to `limits`.
    pub fn build_within(
        manifest: &Manifest,
        requests: &[AdapterRequest],
        width: u32,
        height: u32,
        limits: &Limits,
    ) -> Result<AdapterSet> {
        let mut entries = Vec::with_capacity(requests.len());
        for request in requests {
            let index = manifest.adapters.iter().position(|a| a.name == request.name).ok_or_else(|| {
                let names: Vec<&str> = manifest.adapters.iter().map(|a| a.name.as_str()).collect();
                let available = if names.is_empty() { "no adapters".to_string() } else { names.join(", ") };
                Error::request(
                    Field::Adapters,
                    format!("unknown adapter {:?}; this graph set has: {available}", request.name),
                )
            })?;
            let spec = &manifest.adapters[index];
            if !request.weight.is_finite() {
                return Err(Error::request(
                    Field::Adapters,
                    format!("adapter {} weight {} is not a number", spec.name, request.weight),
                ));
            }
            let factor = spec.downscale_factor;
            if !width.is_multiple_of(factor) || !height.is_multiple_of(factor) {
                return Err(Error::request(
                    Field::Size,
                    format!(
                        "size {width}x{height} is not a multiple of {factor}, which adapter {} needs; try {}x{}",
                        spec.name,
                        round_to(width, factor),
                        round_to(height, factor)
                    ),
                ));
            }
            let kind = match spec.condition {
                ConditionChannels::Rgb => ConditionKind::Rgb,
                ConditionChannels::Gray => ConditionKind::Gray,
            };
            let condition = match &request.image {
                ConditionSource::File(path) => {
                    let image = ConditionImage::open_within(path, kind, limits)?.resized(width, height);
                    apply_all(&request.preprocess, image)?.to_tensor()
                }
                ConditionSource::Pixels(image) if image.kind() == kind => {
                    apply_all(&request.preprocess, image.resized(width, height))?.to_tensor()
                }
                ConditionSource::Pixels(image) => {
                    return Err(Error::request(
                        Field::Adapters,
                        format!(
                            "adapter {} takes {} condition pixels, got {} channel(s)",
                            spec.name,
                            kind.pil_mode(),
                            image.kind().channels()
                        ),
                    ))
                }
            };
            entries.push(AdapterEntry { index, weight: request.weight, condition });
        }
        Ok(AdapterSet { entries })
    }

    /// Each entry's manifest index and condition tensor ([1, C, H, W] in [0, 1]), in request order.
    pub(crate) fn conditions(&self) -> impl Iterator<Item = (usize, &Array4<f32>)> {
        self.entries.iter().map(|e| (e.index, &e.condition))
    }

    /// True when the request uses no adapter.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Runs every adapter once and sums their weighted features per residual slot, in request
    /// order, like diffusers' `MultiAdapter.forward` (`acc = w0 * f0; acc += w1 * f1; ...`).
    /// Slots no adapter feeds stay `None`. `sessions[i]` runs the manifest's adapter `i`.
    pub fn residuals(
        &self,
        manifest: &Manifest,
        sessions: &mut [Box<dyn GraphSession>],
    ) -> Result<Vec<Option<ArrayD<f32>>>> {
        let mut slots: Vec<Option<ArrayD<f32>>> = vec![None; manifest.residual_slots.len()];
        for entry in &self.entries {
            let spec = &manifest.adapters[entry.index];
            let features =
                sessions[entry.index].run(&[("condition", TensorView::F32(entry.condition.view().into_dyn()))])?;
            check_finite(&features, || Stage::Adapter(spec.name.clone()))?;
            for (feature, &slot) in features.into_iter().zip(&spec.residual_slots) {
                let expected = &manifest.residual_slots[slot];
                if feature.ndim() != 4 || feature.shape()[1] != expected.channels {
                    return Err(Error::Backend {
                        backend: "pipeline",
                        graph: format!("adapter_{}", spec.name),
                        message: format!(
                            "feature for residual slot {slot} has shape {:?}, the unet expects {} channels; re-export the graph set",
                            feature.shape(),
                            expected.channels
                        ),
                    });
                }
                let weighted = feature * entry.weight;
                slots[slot] = Some(match slots[slot].take() {
                    None => weighted,
                    Some(acc) if acc.shape() == weighted.shape() => acc + weighted,
                    Some(acc) => {
                        return Err(Error::Backend {
                            backend: "pipeline",
                            graph: format!("adapter_{}", spec.name),
                            message: format!(
                                "adapter {} gives residual slot {slot} shape {:?}, another adapter gave {:?}",
                                spec.name,
                                weighted.shape(),
                                acc.shape()
                            ),
                        })
                    }
                });
            }
        }
        Ok(slots)
    }
}

/// The multiple of `factor` nearest to `value` (at least `factor`), to suggest a valid size.
pub(crate) fn round_to(value: u32, factor: u32) -> u32 {
    let factor = factor.max(1);
    (value.saturating_add(factor / 2) / factor).max(1).saturating_mul(factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_adapter_arguments() {
        let a: AdapterRequest = "sketch=edges.png:0.8".parse().unwrap();
        assert_eq!((a.name.as_str(), &a.image, a.weight), ("sketch", &ConditionSource::File("edges.png".into()), 0.8));
        let b: AdapterRequest = "color=C:/img/c.png".parse().unwrap();
        assert_eq!((&b.image, b.weight), (&ConditionSource::File("C:/img/c.png".into()), 1.0));
        assert!("sketch".parse::<AdapterRequest>().is_err());
        assert!("=x.png".parse::<AdapterRequest>().is_err());
        assert!("sketch=".parse::<AdapterRequest>().is_err());
    }

    #[test]
    fn suggests_valid_sizes() {
        assert_eq!(round_to(500, 64), 512);
        assert_eq!(round_to(10, 64), 64);
        assert_eq!(round_to(600, 64), 576);
    }
}
