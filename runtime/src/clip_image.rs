//! IP-Adapter reference images: the CLIP image encoder's `pixel_values`, bit-exact with
//! transformers' PIL-backed `CLIPImageProcessor`.
//!
//! diffusers encodes an IP-Adapter's image with `self.feature_extractor(image,
//! return_tensors="pt").pixel_values` (`encode_image`, e.g. in
//! `pipelines/stable_diffusion/pipeline_stable_diffusion.py`). The feature extractor is the
//! pipeline's own (`feature_extractor/preprocessor_config.json` of the SD repository:
//! [`ClipImageConfig::from_file`]) or, when the pipeline has none, the one `load_ip_adapter`
//! (`loaders/ip_adapter.py`) builds: `CLIPImageProcessor(size=image_encoder.config.image_size,
//! crop_size=...)` ([`ClipImageConfig::for_image_size`]).
//! Without torchvision, transformers 5 gives `CLIPImageProcessorPil` (`PilBackend` in
//! `transformers/image_processing_backends.py`), whose steps are reproduced here:
//!
//! 1. `convert_to_rgb` (`image_transforms.py`): an image with alpha (an alpha band or a tRNS
//!    `transparency`) is converted to RGBA and `Image.alpha_composite`d onto opaque white, then
//!    converted to RGB ([`load_clip_image`]);
//! 2. `resize` to `shortest_edge`: `get_resize_output_image_size(default_to_square=False)` keeps the
//!    short side at `shortest_edge` and sets the long one to `int(shortest_edge * long / short)`
//!    (truncated, not rounded), then `PIL.Image.resize((w, h), resample=BICUBIC)` on the uint8
//!    image (no `reducing_gap`; uint8 input means no rescale round trip through `to_pil_image`);
//!    `{"height", "width"}` sizes resize to exactly that;
//! 3. `center_crop`: offsets `(size - crop) // 2` (floor), zero padding where the image is smaller
//!    than the crop (`image_transforms.center_crop`), still in uint8;
//! 4. `rescale`: `(uint8.astype(float64) * rescale_factor).astype(float32)`;
//! 5. `normalize`: `(x - mean) / std` in **float32**, with mean and std cast to float32 first.
//!
//! The value of an output element depends only on its channel and uint8 sample, so steps 4-5 are a
//! 3x256 table computed with those exact operations.
//!
//! Not reproduced: JPEG decoding (zune-jpeg, not libjpeg-turbo: see
//! [`ConditionImage::open`](crate::condition::ConditionImage::open)), EXIF orientation (ignored by
//! both), `shortest_edge` with `longest_edge`, filters other than BICUBIC and LANCZOS.
//!
//! transformers' torchvision backend (`CLIPImageProcessor` when torchvision is installed, i.e. not
//! in our pinned venv) resizes with torch's antialiased bicubic instead of Pillow's, and so lands
//! elsewhere: measured (December 2026, transformers 5.23, torchvision 0.29.2 over torch 2.15 in a
//! throwaway install, default config) on 16 clip_image fixture sources, two condition-image ones
//! and three synthetic 512-1024 px images, `max |fast - slow| = 0.0300` in `pixel_values` units,
//! i.e. 2 uint8 levels before normalization; 0.2-1 % of the values differ by a level or more.
//! This module matches the PIL backend only.

use std::io::ErrorKind;
use std::path::Path;

use image::RgbImage;
use ndarray::Array4;
use serde::Deserialize;
use serde_json::Value;

use crate::condition::{decode_pillow, Decoded, Native};
use crate::error::{Error, Result};
use crate::limits::{read_bounded, Limits};
use crate::resample::{resize_region, Filter, Region};
use crate::size::Size;

/// How `CLIPImageProcessor` resizes before cropping (its `size`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClipResize {
    /// `{"shortest_edge": n}`: the short side becomes `n`, the long side keeps the aspect ratio
    /// (truncated).
    ShortestEdge(u32),
    /// `{"height": h, "width": w}`: exactly this size.
    Exact(Size),
}

/// A `CLIPImageProcessor` configuration (`preprocessor_config.json`). [`Default`] is
/// `CLIPImageProcessor()`: OpenAI CLIP's 224 shortest edge, 224x224 crop, mean and std.
#[derive(Clone, Debug, PartialEq)]
pub struct ClipImageConfig {
    /// Composite alpha onto white and convert to RGB ([`load_clip_image`]).
    pub do_convert_rgb: bool,
    pub do_resize: bool,
    pub size: ClipResize,
    /// `resample`: Pillow's BICUBIC (3) or LANCZOS (1).
    pub resample: Filter,
    pub do_center_crop: bool,
    pub crop_size: Size,
    pub do_rescale: bool,
    /// Applied in f64 (`image.astype(np.float64) * scale`), then rounded to f32.
    pub rescale_factor: f64,
    pub do_normalize: bool,
    /// Per RGB channel; rounded to f32 before use, as `np.array(mean, dtype=np.float32)`.
    pub image_mean: [f64; 3],
    pub image_std: [f64; 3],
}

/// transformers' `OPENAI_CLIP_MEAN` and `OPENAI_CLIP_STD` (`image_utils.py`).
const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

impl Default for ClipImageConfig {
    fn default() -> Self {
        ClipImageConfig {
            do_convert_rgb: true,
            do_resize: true,
            size: ClipResize::ShortestEdge(224),
            resample: Filter::Bicubic,
            do_center_crop: true,
            crop_size: Size { width: 224, height: 224 },
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: OPENAI_CLIP_MEAN,
            image_std: OPENAI_CLIP_STD,
        }
    }
}

/// `preprocessor_config.json` as written by `save_pretrained`; absent keys keep the defaults.
#[derive(Deserialize)]
struct RawConfig {
    do_convert_rgb: Option<bool>,
    do_resize: Option<bool>,
    size: Option<Value>,
    resample: Option<u32>,
    do_center_crop: Option<bool>,
    crop_size: Option<Value>,
    do_rescale: Option<bool>,
    rescale_factor: Option<f64>,
    do_normalize: Option<bool>,
    image_mean: Option<Value>,
    image_std: Option<Value>,
}

impl ClipImageConfig {
    /// What diffusers' `load_ip_adapter` builds for an image encoder of `image_size` (224 for the
    /// ViT-H/14 and ViT-bigG/14 encoders of IP-Adapter, which equals [`Default`]):
    /// `CLIPImageProcessor(size=image_size, crop_size=image_size)`, a shortest-edge resize and a
    /// square crop.
    pub fn for_image_size(image_size: u32) -> Self {
        ClipImageConfig {
            size: ClipResize::ShortestEdge(image_size),
            crop_size: Size { width: image_size, height: image_size },
            ..ClipImageConfig::default()
        }
    }

    /// Reads a `preprocessor_config.json` (as IP-Adapter image encoders ship).
    ///
    /// Errors: [`Error::Io`] if it cannot be read, [`Error::GraphSet`] (naming the file) if it is
    /// not JSON or holds a value this runtime does not reproduce.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
            path: path.to_path_buf(),
            message: match e.kind() {
                ErrorKind::NotFound => "image processor config not found; check the path".to_string(),
                _ => format!("cannot read image processor config: {e}"),
            },
        })?;
        Self::from_json(&text).map_err(|message| Error::GraphSet { dir: path.to_path_buf(), message })
    }

    /// Parses the text of a `preprocessor_config.json`. Sizes may be given as transformers'
    /// `get_size_dict` accepts them: `size` as an int (shortest edge), `{"shortest_edge"}`,
    /// `{"height", "width"}` or `[height, width]`; `crop_size` as an int (square), `{"height",
    /// "width"}` or `[height, width]`. Mean and std may be one number for all channels.
    pub fn from_json(text: &str) -> std::result::Result<Self, String> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| format!("image processor config: {e}"))?;
        let mut config = ClipImageConfig::default();
        config.do_convert_rgb = raw.do_convert_rgb.unwrap_or(config.do_convert_rgb);
        config.do_resize = raw.do_resize.unwrap_or(config.do_resize);
        config.do_center_crop = raw.do_center_crop.unwrap_or(config.do_center_crop);
        config.do_rescale = raw.do_rescale.unwrap_or(config.do_rescale);
        config.do_normalize = raw.do_normalize.unwrap_or(config.do_normalize);
        config.rescale_factor = raw.rescale_factor.unwrap_or(config.rescale_factor);
        if let Some(size) = &raw.size {
            config.size = parse_size(size)?;
        }
        if let Some(crop) = &raw.crop_size {
            config.crop_size = match parse_size(crop)? {
                ClipResize::Exact(size) => size,
                // get_size_dict(crop_size) makes an int square; a dict keeps its keys.
                ClipResize::ShortestEdge(n) if crop.is_number() => Size { width: n, height: n },
                ClipResize::ShortestEdge(_) => {
                    return Err(format!("crop_size {crop} must have \"height\" and \"width\""));
                }
            };
        }
        config.resample = match raw.resample {
            None | Some(3) => Filter::Bicubic,
            Some(1) => Filter::Lanczos,
            Some(other) => {
                return Err(format!(
                    "resample {other} is not supported: only 3 (BICUBIC) and 1 (LANCZOS) are reproduced"
                ))
            }
        };
        if let Some(mean) = &raw.image_mean {
            config.image_mean = parse_channels("image_mean", mean)?;
        }
        if let Some(std) = &raw.image_std {
            config.image_std = parse_channels("image_std", std)?;
        }
        let zero_size = |s: Size| s.width == 0 || s.height == 0;
        if matches!(config.size, ClipResize::ShortestEdge(0))
            || matches!(config.size, ClipResize::Exact(s) if zero_size(s))
        {
            return Err(format!("size {:?} must be at least 1 pixel", config.size));
        }
        if zero_size(config.crop_size) {
            return Err(format!("crop_size {:?} must be at least 1x1", config.crop_size));
        }
        Ok(config)
    }

    /// The `[1, 3, H, W]` tensor's spatial size for a `width x height` image: the crop size, or the
    /// resized size without center crop.
    pub fn output_size(&self, width: u32, height: u32) -> Size {
        if self.do_center_crop {
            self.crop_size
        } else if self.do_resize {
            self.resized(width, height)
        } else {
            Size { width, height }
        }
    }

    /// `get_resize_output_image_size(image, size, default_to_square=False)` as (width, height).
    fn resized(&self, width: u32, height: u32) -> Size {
        match self.size {
            ClipResize::Exact(size) => size,
            ClipResize::ShortestEdge(edge) => {
                let (short, long) = if width <= height { (width, height) } else { (height, width) };
                // Python: `int(requested_new_short * long / short)`: the product is exact, the true
                // division rounds once to f64 (as here: both operands are exact below 2^53), and
                // int() truncates.
                let new_long = (f64::from(edge) * f64::from(long) / f64::from(short.max(1))) as u32;
                if width <= height {
                    Size { width: edge, height: new_long }
                } else {
                    Size { width: new_long, height: edge }
                }
            }
        }
    }

    /// Steps 4-5 for every channel and uint8 value.
    fn value_table(&self) -> [[f32; 256]; 3] {
        let mut table = [[0.0_f32; 256]; 3];
        for (c, row) in table.iter_mut().enumerate() {
            let mean = self.image_mean[c] as f32;
            let std = self.image_std[c] as f32;
            for (v, out) in row.iter_mut().enumerate() {
                // Without rescale, normalize casts the uint8 image to float32 (exact).
                let x = if self.do_rescale { (v as f64 * self.rescale_factor) as f32 } else { v as f32 };
                *out = if self.do_normalize { (x - mean) / std } else { x };
            }
        }
        table
    }
}

fn parse_size(value: &Value) -> std::result::Result<ClipResize, String> {
    let int = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok());
    let bad = || format!("size {value} is not an int, {{\"shortest_edge\"}}, {{\"height\", \"width\"}} or [h, w]");
    if let Some(n) = int(value) {
        return Ok(ClipResize::ShortestEdge(n));
    }
    if let Some([h, w]) = value.as_array().map(Vec::as_slice) {
        return Ok(ClipResize::Exact(Size { width: int(w).ok_or_else(bad)?, height: int(h).ok_or_else(bad)? }));
    }
    let obj = value.as_object().ok_or_else(bad)?;
    let key = |k: &str| obj.get(k).filter(|v| !v.is_null());
    if key("longest_edge").is_some() || key("max_height").is_some() {
        return Err(format!("size {value}: longest_edge / max_height resizing is not supported"));
    }
    match (key("shortest_edge"), key("height"), key("width")) {
        (Some(edge), None, None) => Ok(ClipResize::ShortestEdge(int(edge).ok_or_else(bad)?)),
        (None, Some(h), Some(w)) => {
            Ok(ClipResize::Exact(Size { width: int(w).ok_or_else(bad)?, height: int(h).ok_or_else(bad)? }))
        }
        _ => Err(bad()),
    }
}

fn parse_channels(name: &str, value: &Value) -> std::result::Result<[f64; 3], String> {
    if let Some(x) = value.as_f64() {
        return Ok([x; 3]);
    }
    match value.as_array().map(|a| a.iter().map(Value::as_f64).collect::<Option<Vec<f64>>>()) {
        Some(Some(v)) if v.len() == 3 => Ok([v[0], v[1], v[2]]),
        _ => Err(format!("{name} {value} must be a number or 3 numbers (one per RGB channel)")),
    }
}

/// Loads an IP-Adapter reference image as `Image.open(path)` followed by transformers'
/// `convert_to_rgb`: alpha (RGBA, LA, palette or tRNS transparency) is composited onto white with
/// Pillow's integer `alpha_composite`, then dropped. Decoding and mode conversions are those of
/// [`ConditionImage::open`](crate::condition::ConditionImage::open), bit-exact with Pillow for PNG.
///
/// With `config.do_convert_rgb` false, transformers uses the image as it is, which only yields the
/// three channels CLIP needs for RGB images without transparency; anything else is an error here.
///
/// Errors: [`Error::Io`], [`Error::Image`], [`Error::LimitExceeded`] as for condition images.
pub fn load_clip_image(path: &Path, config: &ClipImageConfig, limits: &Limits) -> Result<RgbImage> {
    load_clip_image_as(path, config, limits, "IP-Adapter image")
}

/// [`load_clip_image`], its errors calling the image `what` ("style image").
pub fn load_clip_image_as(path: &Path, config: &ClipImageConfig, limits: &Limits, what: &str) -> Result<RgbImage> {
    let io_error = |e: std::io::Error| Error::Io {
        path: path.to_path_buf(),
        message: match e.kind() {
            ErrorKind::NotFound => format!("{what} not found; check the path"),
            _ => format!("cannot read {what}: {e}"),
        },
    };
    let label = format!("{what} {}", path.display());
    let bytes = read_bounded(
        path,
        limits.max_image_file_bytes,
        &label,
        "max_image_file_bytes",
        "use a smaller file",
        io_error,
    )?;
    decode_at(&bytes, config, limits, path, what)
}

/// [`load_clip_image`] for a PNG or JPEG held in memory; errors name the image "(in memory)".
pub fn decode_clip_image(bytes: &[u8], config: &ClipImageConfig, limits: &Limits) -> Result<RgbImage> {
    decode_at(bytes, config, limits, Path::new("(in memory)"), "IP-Adapter image")
}

fn decode_at(bytes: &[u8], config: &ClipImageConfig, limits: &Limits, path: &Path, what: &str) -> Result<RgbImage> {
    let Decoded { width, height, native, alpha } = decode_pillow(bytes, limits, path, what)?;
    if !config.do_convert_rgb && (alpha.is_some() || matches!(native, Native::L(_))) {
        return Err(Error::Image {
            path: path.to_path_buf(),
            message: "do_convert_rgb is false in the image processor config, and this image is not plain RGB \
                      (it has transparency or is grayscale), which CLIP cannot take without conversion; \
                      save it as an RGB PNG"
                .into(),
        });
    }
    let mut rgb = match native {
        Native::Rgb(px) => px,
        Native::L(px) => px.iter().flat_map(|&v| [v, v, v]).collect(),
    };
    if let Some(alpha) = alpha {
        for (px, &a) in rgb.chunks_exact_mut(3).zip(&alpha) {
            for v in px {
                *v = over_white(*v, a);
            }
        }
    }
    // The decoder produced exactly width x height pixels.
    RgbImage::from_raw(width, height, rgb)
        .ok_or_else(|| Error::Image { path: path.to_path_buf(), message: "decoded size mismatch".into() })
}

/// One channel of Pillow's `ImagingAlphaComposite` (`libImaging/AlphaComposite.c`) of a pixel with
/// alpha `a` over opaque white, in its 7-bit-extended integer arithmetic.
fn over_white(v: u8, a: u8) -> u8 {
    const PRECISION_BITS: u32 = 7;
    const DST: u32 = 255; // white, alpha 255
    if a == 0 {
        return DST as u8;
    }
    let (v, a) = (u32::from(v), u32::from(a));
    let blend = DST * (255 - a);
    let outa255 = a * 255 + blend;
    let coef1 = a * 255 * 255 * (1 << PRECISION_BITS) / outa255;
    let coef2 = 255 * (1 << PRECISION_BITS) - coef1;
    let tmp = v * coef1 + DST * coef2 + (0x80 << PRECISION_BITS);
    // SHIFTFORDIV255: ((a >> 8) + a) >> 8, a division by 255 for these ranges.
    ((((tmp >> 8) + tmp) >> 8) >> PRECISION_BITS) as u8
}

/// `CLIPImageProcessor(**config)(images=image, return_tensors="np").pixel_values` for an RGB image:
/// `[1, 3, H, W]` f32, (H, W) = [`ClipImageConfig::output_size`] (224x224 by default).
///
/// Only the part of the resized image that survives the center crop is computed, so extreme aspect
/// ratios (a 1-pixel-wide image resizes to 224 x 224*height) cost no more than others.
///
/// Errors: [`Error::Image`] (named "(in memory)") for an image with no pixels, which transformers
/// cannot resize either (a division by zero).
pub fn clip_pixel_values(image: &RgbImage, config: &ClipImageConfig) -> Result<Array4<f32>> {
    let (width, height) = image.dimensions();
    if width == 0 || height == 0 {
        return Err(Error::Image {
            path: "(in memory)".into(),
            message: format!("IP-Adapter image is {width}x{height}; it needs at least one pixel"),
        });
    }
    let resized = if config.do_resize { config.resized(width, height) } else { Size { width, height } };
    let out = config.output_size(width, height);
    // center_crop: output pixel (i, j) is resized pixel (i + top, j + left), zero outside.
    let (top, left) = if config.do_center_crop {
        (floor_half(resized.height, out.height), floor_half(resized.width, out.width))
    } else {
        (0, 0)
    };
    let (y0, y1) = overlap(top, out.height, resized.height);
    let (x0, x1) = overlap(left, out.width, resized.width);
    let region = Region { x: x0, y: y0, width: x1 - x0, height: y1 - y0 };
    let pixels = if region.width == 0 || region.height == 0 {
        Vec::new()
    } else if config.do_resize {
        resize_region(image.as_raw(), 3, width, height, resized.width, resized.height, config.resample, region)
    } else {
        let stride = width as usize * 3;
        (y0..y1)
            .flat_map(|y| &image.as_raw()[y as usize * stride + x0 as usize * 3..x1 as usize * 3 + y as usize * stride])
            .copied()
            .collect()
    };

    let table = config.value_table();
    let (oh, ow) = (out.height as usize, out.width as usize);
    let rw = region.width as usize;
    Ok(Array4::from_shape_fn((1, 3, oh, ow), |(_, c, i, j)| {
        let (y, x) = (i as i64 + top, j as i64 + left);
        let inside = (i64::from(y0)..i64::from(y1)).contains(&y) && (i64::from(x0)..i64::from(x1)).contains(&x);
        let v = if inside { pixels[((y as usize - y0 as usize) * rw + (x as usize - x0 as usize)) * 3 + c] } else { 0 };
        table[c][usize::from(v)]
    }))
}

/// `(size - crop) // 2` with Python's floor division (negative when the crop pads).
fn floor_half(size: u32, crop: u32) -> i64 {
    (i64::from(size) - i64::from(crop)).div_euclid(2)
}

/// The rows (or columns) `[lo, hi)` of a `size`-long axis that the crop window `[offset, offset +
/// len)` covers.
fn overlap(offset: i64, len: u32, size: u32) -> (u32, u32) {
    let lo = offset.clamp(0, i64::from(size));
    let hi = (offset + i64::from(len)).clamp(lo, i64::from(size));
    (lo as u32, hi as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(width: u32, height: u32) -> RgbImage {
        RgbImage::from_fn(width, height, |x, y| image::Rgb([(x * 7) as u8, (y * 5) as u8, ((x + y) * 3) as u8]))
    }

    #[test]
    fn long_side_is_truncated_not_rounded() {
        let c = ClipImageConfig { size: ClipResize::ShortestEdge(48), ..ClipImageConfig::default() };
        // 48 * 27 / 20 = 64.8: int() gives 64.
        assert_eq!(c.resized(27, 20), Size { width: 64, height: 48 });
        assert_eq!(c.resized(20, 27), Size { width: 48, height: 64 });
        assert_eq!(ClipImageConfig::default().resized(300, 200), Size { width: 336, height: 224 });
        assert_eq!(ClipImageConfig::default().resized(1, 3), Size { width: 224, height: 672 });
    }

    #[test]
    fn one_pixel_wide_and_high_images_do_not_panic() {
        let config = ClipImageConfig::default();
        for (w, h) in [(1, 1), (1, 3), (5, 1), (1, 5000)] {
            let t = clip_pixel_values(&gradient(w, h), &config).unwrap();
            assert_eq!(t.shape(), &[1, 3, 224, 224]);
            assert!(t.iter().all(|v| v.is_finite()));
        }
        assert!(clip_pixel_values(&RgbImage::new(0, 4), &config).is_err());
    }

    #[test]
    fn smaller_than_crop_is_zero_padded() {
        // No resize: 3x2 into a 5x4 crop. top = (2 - 4) // 2 = -1, left = (3 - 5) // 2 = -1.
        let config = ClipImageConfig {
            do_resize: false,
            crop_size: Size { width: 5, height: 4 },
            do_normalize: false,
            ..ClipImageConfig::default()
        };
        let image = RgbImage::from_fn(3, 2, |x, y| image::Rgb([(10 * (y * 3 + x) + 10) as u8; 3]));
        let t = clip_pixel_values(&image, &config).unwrap();
        assert_eq!(t.shape(), &[1, 3, 4, 5]);
        let plane: Vec<u8> = t.index_axis(ndarray::Axis(1), 0).iter().map(|&v| (v * 255.0).round() as u8).collect();
        #[rustfmt::skip]
        assert_eq!(plane, [
            0, 0, 0, 0, 0,
            0, 10, 20, 30, 0,
            0, 40, 50, 60, 0,
            0, 0, 0, 0, 0,
        ]);
        // Padding normalizes like a black pixel.
        let normalized = clip_pixel_values(&image, &ClipImageConfig { do_normalize: true, ..config }).unwrap();
        assert_eq!(normalized[[0, 0, 0, 0]], (0.0 - 0.48145466_f32) / 0.26862954_f32);
    }

    #[test]
    fn composite_over_white_extremes() {
        for v in 0..=255 {
            assert_eq!(over_white(v, 0), 255);
            assert_eq!(over_white(v, 255), v);
        }
        assert_eq!(over_white(0, 128), 127);
    }

    #[test]
    fn config_forms() {
        let c = ClipImageConfig::from_json(r#"{"size": 336, "crop_size": 336}"#).unwrap();
        assert_eq!(c.size, ClipResize::ShortestEdge(336));
        assert_eq!(c.crop_size, Size { width: 336, height: 336 });
        let c = ClipImageConfig::from_json(r#"{"size": {"height": 10, "width": 20}, "image_mean": 0.5}"#).unwrap();
        assert_eq!(c.size, ClipResize::Exact(Size { width: 20, height: 10 }));
        assert_eq!(c.image_mean, [0.5; 3]);
        assert_eq!(ClipImageConfig::from_json("{}").unwrap(), ClipImageConfig::default());
        assert_eq!(ClipImageConfig::for_image_size(224), ClipImageConfig::default());
        // The legacy CLIPFeatureExtractor form SD 1.x repositories ship in feature_extractor/
        // (int sizes, extra keys); transformers reads it as the default (checked in Python).
        let legacy = r#"{
          "crop_size": 224, "do_center_crop": true, "do_convert_rgb": true, "do_normalize": true,
          "do_resize": true, "feature_extractor_type": "CLIPFeatureExtractor",
          "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
          "resample": 3, "size": 224
        }"#;
        assert_eq!(ClipImageConfig::from_json(legacy).unwrap(), ClipImageConfig::default());
        for bad in [
            r#"{"resample": 0}"#,
            r#"{"size": {"shortest_edge": 0}}"#,
            r#"{"crop_size": {"shortest_edge": 4}}"#,
            r#"{"image_std": [1, 2]}"#,
            r#"{"size": {"shortest_edge": 224, "longest_edge": 448}}"#,
            "[",
        ] {
            assert!(ClipImageConfig::from_json(bad).is_err(), "{bad}");
        }
    }
}
