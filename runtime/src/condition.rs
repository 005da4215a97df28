//! Condition images for T2I-Adapters: decode a PNG or JPEG, convert it to the adapter's channels
//! and resize it exactly as diffusers does with Pillow.
//!
//! The reference is `Image.open(path).convert(mode)` followed by diffusers'
//! `_preprocess_adapter_image` (`pipelines/t2i_adapter/pipeline_stable_diffusion_adapter.py`):
//! `np.array(img.resize((width, height), resample=PIL.Image.LANCZOS)).astype(np.float32) / 255.0`,
//! laid out NCHW. Decoding uses the `image` crate; the mode conversions below reproduce what Pillow
//! does with each PNG colour type and bit depth (see [`ConditionImage::open`]).

use std::io::{Cursor, ErrorKind};
use std::path::Path;

use image::{DynamicImage, ImageFormat};
use ndarray::Array4;

use crate::error::{Error, Field, Result};
use crate::limits::{exceeds, read_bounded, Limits};
use crate::resample::resize_lanczos;

/// Which channels an adapter expects its condition image in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConditionKind {
    /// Three channels, Pillow's `convert("RGB")` (color, canny-as-RGB, depth-as-RGB adapters...).
    Rgb,
    /// One channel, Pillow's `convert("L")` (sketch, canny, depth adapters trained on gray input).
    Gray,
}

impl ConditionKind {
    /// Channels of the tensor: 3 for [`ConditionKind::Rgb`], 1 for [`ConditionKind::Gray`].
    pub fn channels(self) -> usize {
        match self {
            ConditionKind::Rgb => 3,
            ConditionKind::Gray => 1,
        }
    }

    /// The Pillow mode this kind corresponds to (`"RGB"` or `"L"`).
    pub fn pil_mode(self) -> &'static str {
        match self {
            ConditionKind::Rgb => "RGB",
            ConditionKind::Gray => "L",
        }
    }
}

/// An 8-bit image in Pillow mode "RGB" or "L": HWC, row-major, `kind.channels()` samples per pixel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConditionImage {
    width: u32,
    height: u32,
    kind: ConditionKind,
    pixels: Vec<u8>,
}

/// Loads a condition image as the adapter input tensor: `[1, C, height, width]`, `f32` in `[0, 1]`,
/// C = `kind.channels()`. Equal to diffusers' `_preprocess_adapter_image` applied to
/// `Image.open(path).convert(kind.pil_mode())`, bit for bit (see [`ConditionImage::open`] for the
/// formats this holds for).
///
/// Errors: [`Error::Io`] if the file cannot be read, [`Error::Image`] if it is not a PNG or JPEG or
/// cannot be decoded, [`Error::InvalidRequest`] (about `field`) if `width` or `height` is zero.
pub fn load_condition(path: &Path, kind: ConditionKind, width: u32, height: u32) -> Result<Array4<f32>> {
    load_condition_within(path, kind, width, height, &Limits::default())
}

/// [`load_condition`] with the image file held to `limits` ([`ConditionImage::open_within`]).
pub fn load_condition_within(
    path: &Path,
    kind: ConditionKind,
    width: u32,
    height: u32,
    limits: &Limits,
) -> Result<Array4<f32>> {
    if width == 0 || height == 0 {
        return Err(Error::request(
            Field::Size,
            format!("condition image {}: target size {width}x{height} must be at least 1x1", path.display()),
        ));
    }
    Ok(ConditionImage::open_within(path, kind, limits)?.resized(width, height).to_tensor())
}

impl ConditionImage {
    /// Wraps 8-bit pixels (HWC, `kind.channels()` per pixel). Returns `None` if the buffer length
    /// is not `width * height * channels`.
    pub fn from_pixels(width: u32, height: u32, kind: ConditionKind, pixels: Vec<u8>) -> Option<Self> {
        let expected = (width as usize).checked_mul(height as usize)?.checked_mul(kind.channels())?;
        (pixels.len() == expected).then_some(ConditionImage { width, height, kind, pixels })
    }

    /// Decodes a PNG or JPEG file and converts it like Pillow's `Image.open(path).convert(mode)`.
    ///
    /// Conversions (Pillow's `PngImagePlugin._MODES` and `libImaging/Convert.c`):
    /// - alpha (RGBA, LA, tRNS transparency) is dropped, not composited;
    /// - RGB to L is ITU-R 601-2 luma in 16-bit fixed point,
    ///   `(19595 R + 38470 G + 7471 B + 0x8000) >> 16`; L to RGB replicates the gray value;
    ///   palettes are looked up first;
    /// - 1-, 2- and 4-bit gray are scaled to 0..=255 (0/255, x85, x17);
    /// - 16-bit RGB, RGBA and gray+alpha keep the high byte of each sample (Pillow's `;16B` raw
    ///   modes truncate, they do not round);
    /// - 16-bit gray (Pillow mode "I;16") is **clipped** to 255, not scaled: Pillow's I;16 to L/RGB
    ///   conversions clip, so a 16-bit depth map comes out nearly white in diffusers too. Save such
    ///   maps as 8-bit PNGs.
    ///
    /// All of the above is bit-exact with Pillow 13. JPEG is decoded by the `image` crate
    /// (zune-jpeg), not libjpeg-turbo as in Pillow, and is not: samples differ by about one level
    /// (IDCT rounding), by more at sharp colour edges of 4:2:0 files (chroma upsampling; up to 13
    /// levels in the parity fixtures). Use PNG condition images where exact parity matters. EXIF
    /// orientation is ignored, as `Image.open` ignores it.
    pub fn open(path: &Path, kind: ConditionKind) -> Result<Self> {
        Self::open_within(path, kind, &Limits::default())
    }

    /// [`open`](Self::open) with the file size and decoded pixel count held to `limits`
    /// (`max_image_file_bytes`, `max_image_pixels`), checked before the pixels are decoded.
    pub fn open_within(path: &Path, kind: ConditionKind, limits: &Limits) -> Result<Self> {
        let io_error = |e: std::io::Error| Error::Io {
            path: path.to_path_buf(),
            message: match e.kind() {
                ErrorKind::NotFound => "condition image not found; check the path".to_string(),
                _ => format!("cannot read condition image: {e}"),
            },
        };
        let bytes = read_bounded(
            path,
            limits.max_image_file_bytes,
            &format!("condition image {}", path.display()),
            "max_image_file_bytes",
            "use a smaller file",
            io_error,
        )?;
        Self::decode_at(&bytes, kind, limits, path)
    }

    /// Decodes a PNG or JPEG held in memory (a service's upload) like [`open`](Self::open), within
    /// `limits`. Errors name the image "(in memory)".
    pub fn decode(bytes: &[u8], kind: ConditionKind, limits: &Limits) -> Result<Self> {
        Self::decode_at(bytes, kind, limits, Path::new("(in memory)"))
    }

    fn decode_at(bytes: &[u8], kind: ConditionKind, limits: &Limits, path: &Path) -> Result<Self> {
        // Condition images drop alpha: diffusers calls `convert(mode)`, which ignores it.
        let Decoded { width, height, native, .. } = decode_pillow(bytes, limits, path, "condition image")?;
        let pixels = match (native, kind) {
            (Native::L(px), ConditionKind::Gray) | (Native::Rgb(px), ConditionKind::Rgb) => px,
            (Native::L(px), ConditionKind::Rgb) => px.iter().flat_map(|&v| [v, v, v]).collect(),
            (Native::Rgb(px), ConditionKind::Gray) => px.chunks_exact(3).map(|p| luma(p[0], p[1], p[2])).collect(),
        };
        Ok(ConditionImage { width, height, kind, pixels })
    }

    /// Width in pixels.
    pub fn width(&self) -> u32 {
        self.width
    }

    /// Height in pixels.
    pub fn height(&self) -> u32 {
        self.height
    }

    /// Channel layout (1 for gray, 3 for RGB).
    pub fn kind(&self) -> ConditionKind {
        self.kind
    }

    /// Samples, HWC row-major.
    pub fn pixels(&self) -> &[u8] {
        &self.pixels
    }

    /// Pillow's `img.resize((width, height), resample=Image.LANCZOS)`; same size is a copy.
    pub fn resized(&self, width: u32, height: u32) -> ConditionImage {
        let pixels = resize_lanczos(&self.pixels, self.kind.channels(), self.width, self.height, width, height);
        ConditionImage { width, height, kind: self.kind, pixels }
    }

    /// `[1, C, H, W]` with `f32::from(v) / 255.0`, as `np.array(img).astype(np.float32) / 255.0`
    /// transposed to NCHW (the division is in f32 in both).
    pub fn to_tensor(&self) -> Array4<f32> {
        let (c, h, w) = (self.kind.channels(), self.height as usize, self.width as usize);
        Array4::from_shape_fn((1, c, h, w), |(_, ch, y, x)| f32::from(self.pixels[(y * w + x) * c + ch]) / 255.0)
    }
}

/// Pixels as Pillow holds them after `Image.open`, alpha apart.
pub(crate) enum Native {
    L(Vec<u8>),
    Rgb(Vec<u8>),
}

/// A decoded image: Pillow's "L" or "RGB" samples, and the alpha that `convert("RGBA")` would give.
pub(crate) struct Decoded {
    pub width: u32,
    pub height: u32,
    pub native: Native,
    /// One sample per pixel; `None` where Pillow's image has neither an alpha band nor a
    /// `transparency` entry in `info`.
    pub alpha: Option<Vec<u8>>,
}

/// Decodes a PNG or JPEG the way Pillow's `Image.open` holds it (see [`ConditionImage::open`] for
/// the conversions), within `limits`. `what` names the image in messages ("condition image").
///
/// The alpha is what `image.convert("RGBA")` yields: the alpha band of RGBA, LA and palette images
/// (16-bit: its high byte), and for gray and RGB images with a tRNS colour Pillow's
/// `convert_transparent`, which compares the *converted 8-bit* samples with the tRNS value's low
/// byte (`rgbT2rgba` in `libImaging/Convert.c`; Pillow keeps 1/2/4/16-bit tRNS values unscaled).
pub(crate) fn decode_pillow(bytes: &[u8], limits: &Limits, path: &Path, what: &str) -> Result<Decoded> {
    let image_error = |message: String| Error::Image { path: path.to_path_buf(), message };
    exceeds(
        &format!("the size in bytes of {what} {}", path.display()),
        bytes.len() as u64,
        limits.max_image_file_bytes,
        "max_image_file_bytes",
        "use a smaller file",
    )?;

    let format = image::guess_format(bytes).map_err(|_| {
        image_error(format!("not a PNG or JPEG image (unrecognized file signature); {what}s must be PNG or JPEG"))
    })?;
    let name = match format {
        ImageFormat::Png => "PNG",
        ImageFormat::Jpeg => "JPEG",
        other => {
            let ext = other.extensions_str().first().copied().unwrap_or("this format");
            return Err(image_error(format!(
                "{} images are not supported; convert it to PNG (or JPEG)",
                ext.to_uppercase()
            )));
        }
    };
    let corrupt =
        |e: image::ImageError| image_error(format!("cannot decode {name}: {e} (is the file truncated or corrupt?)"));
    // The header's size first: a decompression bomb is refused before its pixels are allocated.
    let (declared_width, declared_height) =
        image::ImageReader::with_format(Cursor::new(bytes), format).into_dimensions().map_err(corrupt)?;
    limits.check_image_pixels(&path.display().to_string(), declared_width, declared_height)?;
    // 16-bit RGBA is the widest pixel the decoders make; the slack covers their working buffers.
    let budget = u64::from(declared_width) * u64::from(declared_height) * 8 + (64 << 20);
    let mut decoder_limits = image::Limits::default();
    decoder_limits.max_image_width = Some(declared_width);
    decoder_limits.max_image_height = Some(declared_height);
    decoder_limits.max_alloc = Some(budget);
    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), format);
    reader.limits(decoder_limits);
    let decoded = reader.decode().map_err(|e| match e {
        image::ImageError::Limits(limit) => image_error(format!(
            "cannot decode {name}: it needs more memory than its {declared_width}x{declared_height} size \
             allows ({limit}); re-save the image"
        )),
        other => corrupt(other),
    })?;

    let (width, height) = (decoded.width(), decoded.height());
    // PNG colour type from IHDR (after signature 8, length 4, "IHDR" 4, width 4, height 4,
    // depth 1): the `image` crate reports 16-bit gray with a tRNS chunk as gray+alpha, Pillow
    // opens it as "I;16".
    let colour_type = if format == ImageFormat::Png { bytes.get(25).copied() } else { None };
    let png_gray16 = colour_type == Some(0);
    let alpha_of = |samples: &[u8], stride: usize| samples.chunks_exact(stride).map(|p| p[stride - 1]).collect();
    let alpha16_of =
        |samples: &[u16], stride: usize| samples.chunks_exact(stride).map(|p| high_byte(p[stride - 1])).collect();
    let (native, alpha): (Native, Option<Vec<u8>>) = match decoded {
        DynamicImage::ImageLuma8(im) => (Native::L(im.into_raw()), None),
        DynamicImage::ImageLumaA8(im) => {
            let raw = im.into_raw();
            (Native::L(raw.chunks_exact(2).map(|p| p[0]).collect()), Some(alpha_of(&raw, 2)))
        }
        DynamicImage::ImageRgb8(im) => (Native::Rgb(im.into_raw()), None),
        DynamicImage::ImageRgba8(im) => {
            let raw = im.into_raw();
            (Native::Rgb(drop_alpha(&raw, 4, |v| v)), Some(alpha_of(&raw, 4)))
        }
        // "I;16" -> L / RGB clips (Convert.c I16_L, I16_RGB).
        DynamicImage::ImageLuma16(im) => (Native::L(im.into_raw().iter().map(|&v| clip_u16(v)).collect()), None),
        DynamicImage::ImageLumaA16(im) if png_gray16 => {
            (Native::L(im.into_raw().chunks_exact(2).map(|p| clip_u16(p[0])).collect()), None)
        }
        // Pillow opens 16-bit gray+alpha as RGBA through raw mode "LA;16B" (high bytes).
        DynamicImage::ImageLumaA16(im) => {
            let raw = im.into_raw();
            (Native::L(raw.chunks_exact(2).map(|p| high_byte(p[0])).collect()), Some(alpha16_of(&raw, 2)))
        }
        DynamicImage::ImageRgb16(im) => (Native::Rgb(im.into_raw().iter().map(|&v| high_byte(v)).collect()), None),
        DynamicImage::ImageRgba16(im) => {
            let raw = im.into_raw();
            (Native::Rgb(drop_alpha(&raw, 4, high_byte)), Some(alpha16_of(&raw, 4)))
        }
        other => {
            return Err(image_error(format!(
                "unsupported pixel format {:?}; save the image as an 8-bit RGB or grayscale PNG",
                other.color()
            )))
        }
    };
    // Gray and RGB PNGs hold transparency as one tRNS colour, which the `image` crate expands by
    // its own rule (exact 16-bit match, unscaled low-depth gray); Pillow's rule is applied instead.
    let alpha = match colour_type {
        Some(0 | 2) => png_trns_colour(bytes).map(|trns| match &native {
            Native::L(px) => px.iter().map(|&v| if v == trns[0] { 0 } else { 255 }).collect(),
            Native::Rgb(px) => px.chunks_exact(3).map(|p| if p == &trns[..] { 0 } else { 255 }).collect(),
        }),
        _ => alpha,
    };
    Ok(Decoded { width, height, native, alpha })
}

/// The low bytes of a gray (colour type 0) or RGB (2) PNG's tRNS colour, as Pillow's `rgbT2rgba`
/// compares them (`r & 0xff`, ...); gray fills all three. `None` without a well-formed tRNS chunk
/// before the image data.
fn png_trns_colour(png: &[u8]) -> Option<[u8; 3]> {
    let mut at = 8; // PNG signature
    while let Some(header) = png.get(at..at + 8) {
        let len = u32::from_be_bytes(header[..4].try_into().ok()?) as usize;
        let data = png.get(at + 8..(at + 8).checked_add(len)?)?;
        match &header[4..] {
            b"tRNS" => {
                let low = |i: usize| data.get(2 * i + 1).copied();
                return match data.len() {
                    2 => low(0).map(|g| [g; 3]),
                    6 => Some([low(0)?, low(1)?, low(2)?]),
                    _ => None,
                };
            }
            b"IDAT" | b"IEND" => return None,
            _ => at = at + 12 + len,
        }
    }
    None
}

/// Pillow's `L24(rgb) >> 16`: ITU-R 601-2 luma, weights summing to 65536, rounding half up.
fn luma(r: u8, g: u8, b: u8) -> u8 {
    ((u32::from(r) * 19595 + u32::from(g) * 38470 + u32::from(b) * 7471 + 0x8000) >> 16) as u8
}

fn high_byte(v: u16) -> u8 {
    (v >> 8) as u8
}

fn clip_u16(v: u16) -> u8 {
    v.min(255) as u8
}

/// Keeps the first three samples of each `stride`-sample pixel, mapped through `f`.
fn drop_alpha<T: Copy>(samples: &[T], stride: usize, f: impl Fn(T) -> u8) -> Vec<u8> {
    samples.chunks_exact(stride).flat_map(|p| [f(p[0]), f(p[1]), f(p[2])]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luma_matches_pillow_formula() {
        assert_eq!(luma(255, 255, 255), 255);
        assert_eq!(luma(0, 0, 0), 0);
        assert_eq!(luma(255, 0, 0), 76); // (255 * 19595 + 32768) >> 16 = 76.74.. -> 76
        assert_eq!(luma(0, 255, 0), 150);
        assert_eq!(luma(0, 0, 255), 29);
        for v in 0..=255 {
            assert_eq!(luma(v, v, v), v, "gray must stay gray");
        }
    }

    #[test]
    fn tensor_is_nchw() {
        let im = ConditionImage::from_pixels(2, 1, ConditionKind::Rgb, vec![0, 51, 255, 10, 20, 30]).unwrap();
        let t = im.to_tensor();
        assert_eq!(t.shape(), &[1, 3, 1, 2]);
        assert_eq!(t[[0, 1, 0, 0]], 51.0 / 255.0);
        assert_eq!(t[[0, 2, 0, 0]], 1.0);
        assert_eq!(t[[0, 0, 0, 1]], 10.0 / 255.0);
        assert!(ConditionImage::from_pixels(2, 2, ConditionKind::Gray, vec![0; 3]).is_none());
    }
}
