//! Conditions made from photos, so that users need no Python preprocessing: canny edges, TencentARC's
//! spatial color palette, and inversion (sketches drawn dark on light). Each runs on the condition
//! image after it is resized to the output size, on the 8-bit pixels the model's tensor is made from.
//!
//! - `canny[:LOW:HIGH]`: imageproc's Canny, white edges on black, on each channel of the image (the
//!   union for RGB: OpenCV keeps the strongest channel's gradient), replicated to RGB for RGB
//!   conditions. Defaults 100 and 200, as controlnet_aux's `CannyDetector`, which calls OpenCV.
//!   imageproc blurs first (Gaussian, σ 1.4), so the thresholds are scaled by
//!   [`CANNY_BLUR_RESPONSE`]; OpenCV does not blur, and thresholds the L1 gradient. The edge maps are
//!   close, not equal: docs/conditions.md has the measured agreement.
//! - `palette`: TencentARC's color condition (`ldm/modules/extra_condition/api.py`, `get_cond_color`,
//!   and controlnet_aux's `apply_color`): `cv2.resize` to (W / 64, H / 64) with `INTER_CUBIC`, then
//!   back to (W, H) with `INTER_NEAREST`. The cubic step is OpenCV's fixed-point 8-bit path
//!   (A = −0.75, 11-bit coefficients, replicated borders), equal to `cv2.resize` on every integer
//!   factor and within one level otherwise.
//! - `invert`: 255 − v.

use std::str::FromStr;

use image::GrayImage;

use crate::condition::{ConditionImage, ConditionKind};
use crate::error::{Error, Field, Result};

/// controlnet_aux's `CannyDetector` thresholds.
pub const CANNY_LOW: f32 = 100.0;
pub const CANNY_HIGH: f32 = 200.0;
/// imageproc's Canny blurs first (Gaussian, σ 1.4), which halves a step edge's Sobel response
/// (the central difference of a step blurred with σ 1.4 is 2Φ(1/1.4) − 1 ≈ 0.52 of the step's); OpenCV
/// does not blur. Thresholds are scaled by this so that `canny:100:200` finds OpenCV's edges at
/// 100:200. Measured on graphs/fixtures/conditions (runtime/tests/condition_preprocessing.rs): the
/// edges found do not change between 0.3 and 0.7, at 1.0 most of them are lost.
pub const CANNY_BLUR_RESPONSE: f32 = 0.5;
/// TencentARC's palette cell: one color per 64 × 64 pixels.
pub const PALETTE_CELL: u32 = 64;

/// One transformation of a condition image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Preprocess {
    /// Canny edges with hysteresis thresholds `low` < `high` on the gradient magnitude.
    Canny { low: f32, high: f32 },
    /// TencentARC's spatial color palette (bicubic down by 64, nearest up).
    Palette,
    /// 255 − v: a dark-on-light drawing becomes the light-on-dark one sketch models expect.
    Invert,
}

impl FromStr for Preprocess {
    type Err = Error;

    /// `canny`, `canny:LOW:HIGH`, `palette` or `invert`.
    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::request(
                Field::Preprocess,
                format!(
                    "preprocessing {s:?} is not one of canny, canny:LOW:HIGH (e.g. canny:100:200), palette, invert"
                ),
            )
        };
        let mut parts = s.split(':');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("canny"), None, None, None) => Ok(Preprocess::Canny { low: CANNY_LOW, high: CANNY_HIGH }),
            (Some("canny"), Some(low), Some(high), None) => {
                let (low, high) = (low.parse::<f32>().map_err(|_| bad())?, high.parse::<f32>().map_err(|_| bad())?);
                if !(low.is_finite() && high.is_finite() && 0.0 <= low && low <= high) {
                    return Err(Error::request(
                        Field::Preprocess,
                        format!("canny thresholds {low} and {high}: need 0 ≤ LOW ≤ HIGH (controlnet_aux uses 100:200)"),
                    ));
                }
                Ok(Preprocess::Canny { low, high })
            }
            (Some("palette"), None, None, None) => Ok(Preprocess::Palette),
            (Some("invert"), None, None, None) => Ok(Preprocess::Invert),
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for Preprocess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Preprocess::Canny { low, high } => write!(f, "canny:{low}:{high}"),
            Preprocess::Palette => f.write_str("palette"),
            Preprocess::Invert => f.write_str("invert"),
        }
    }
}

impl Preprocess {
    /// The transformed image, of the same size and channels.
    pub fn apply(&self, image: &ConditionImage) -> Result<ConditionImage> {
        let (w, h, kind) = (image.width(), image.height(), image.kind());
        let pixels = match *self {
            Preprocess::Invert => image.pixels().iter().map(|v| 255 - v).collect(),
            Preprocess::Canny { low, high } => {
                let (low, high) = (low * CANNY_BLUR_RESPONSE, high * CANNY_BLUR_RESPONSE);
                let cn = kind.channels();
                // OpenCV on a colour image takes, per pixel, the channel with the largest gradient;
                // the union of the channels' edge maps is the closest imageproc gives.
                let mut edges = vec![0u8; (w * h) as usize];
                for c in 0..cn {
                    let channel: Vec<u8> = image.pixels().iter().skip(c).step_by(cn).copied().collect();
                    let channel = GrayImage::from_raw(w, h, channel).expect("one sample per pixel");
                    for (e, v) in edges.iter_mut().zip(imageproc::edges::canny(&channel, low, high).into_raw()) {
                        *e = (*e).max(v);
                    }
                }
                match kind {
                    ConditionKind::Gray => edges,
                    ConditionKind::Rgb => edges.iter().flat_map(|&v| [v, v, v]).collect(),
                }
            }
            Preprocess::Palette => {
                let (pw, ph) = (w / PALETTE_CELL, h / PALETTE_CELL);
                if pw == 0 || ph == 0 {
                    return Err(Error::request(
                        Field::Preprocess,
                        format!("palette needs an image of at least {PALETTE_CELL}x{PALETTE_CELL} (one color per cell), got {w}x{h}"),
                    ));
                }
                let cn = kind.channels();
                let small = resize_cubic_cv(image.pixels(), cn, (w, h), (pw, ph));
                resize_nearest_cv(&small, cn, (pw, ph), (w, h))
            }
        };
        Ok(ConditionImage::from_pixels(w, h, kind, pixels).expect("same size and channels"))
    }
}

/// Applies `steps` in order.
pub fn apply_all(steps: &[Preprocess], image: ConditionImage) -> Result<ConditionImage> {
    steps.iter().try_fold(image, |image, step| step.apply(&image))
}

/// OpenCV's `interpolateCubic` (A = −0.75), in f32 as OpenCV computes it.
fn cubic_coeffs(x: f32) -> [f32; 4] {
    const A: f32 = -0.75;
    let c0 = ((A * (x + 1.0) - 5.0 * A) * (x + 1.0) + 8.0 * A) * (x + 1.0) - 4.0 * A;
    let c1 = ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let c2 = ((A + 2.0) * (1.0 - x) - (A + 3.0)) * (1.0 - x) * (1.0 - x) + 1.0;
    [c0, c1, c2, 1.0 - c0 - c1 - c2]
}

/// Per output index: the first of the 4 source taps and their 11-bit fixed-point weights
/// (`saturate_cast<short>(c × 2048)`, rounding half to even like `cvRound`).
fn cubic_taps(src: u32, dst: u32) -> Vec<(i64, [i64; 4])> {
    let scale = 1.0 / (f64::from(dst) / f64::from(src));
    (0..dst)
        .map(|d| {
            let f = ((f64::from(d) + 0.5) * scale - 0.5) as f32;
            let s = f.floor();
            let coeffs = cubic_coeffs(f - s);
            (s as i64 - 1, coeffs.map(|c| (c * 2048.0).round_ties_even().clamp(-32768.0, 32767.0) as i64))
        })
        .collect()
}

/// `cv2.resize(src, (dw, dh), interpolation=cv2.INTER_CUBIC)` for 8-bit HWC pixels: a horizontal
/// pass into integers (× 2048), a vertical one (× 2048 again), then `(v + 2^21) >> 22` saturated,
/// with source indices clamped at the borders.
fn resize_cubic_cv(src: &[u8], cn: usize, (sw, sh): (u32, u32), (dw, dh): (u32, u32)) -> Vec<u8> {
    let clamp = |i: i64, n: u32| i.clamp(0, i64::from(n) - 1) as usize;
    let (xs, ys) = (cubic_taps(sw, dw), cubic_taps(sh, dh));
    let (sw_us, dw_us) = (sw as usize, dw as usize);
    let rows: Vec<Vec<i64>> = (0..sh as usize)
        .map(|y| {
            let row = &src[y * sw_us * cn..(y + 1) * sw_us * cn];
            let mut out = vec![0i64; dw_us * cn];
            for (dx, (first, weights)) in xs.iter().enumerate() {
                for (k, weight) in weights.iter().enumerate() {
                    let sx = clamp(first + k as i64, sw);
                    for c in 0..cn {
                        out[dx * cn + c] += i64::from(row[sx * cn + c]) * weight;
                    }
                }
            }
            out
        })
        .collect();
    let mut out = Vec::with_capacity(dw_us * dh as usize * cn);
    for (first, weights) in &ys {
        let taps: Vec<(&[i64], i64)> =
            weights.iter().enumerate().map(|(k, &w)| (rows[clamp(first + k as i64, sh)].as_slice(), w)).collect();
        out.extend((0..dw_us * cn).map(|i| {
            let acc: i64 = taps.iter().map(|(row, w)| row[i] * w).sum();
            ((acc + (1 << 21)) >> 22).clamp(0, 255) as u8
        }));
    }
    out
}

/// `cv2.resize(src, (dw, dh), interpolation=cv2.INTER_NEAREST)`: source index
/// `min(floor(d × src / dst), src − 1)` on each axis.
fn resize_nearest_cv(src: &[u8], cn: usize, (sw, sh): (u32, u32), (dw, dh): (u32, u32)) -> Vec<u8> {
    let index =
        |d: u32, s: u32, dst: u32| ((f64::from(d) * (1.0 / (f64::from(dst) / f64::from(s)))).floor() as u32).min(s - 1);
    let mut out = Vec::with_capacity(dw as usize * dh as usize * cn);
    for y in 0..dh {
        let sy = index(y, sh, dh) as usize;
        for x in 0..dw {
            let sx = index(x, sw, dw) as usize;
            let p = (sy * sw as usize + sx) * cn;
            out.extend_from_slice(&src[p..p + cn]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_preprocessing() {
        assert_eq!("canny".parse::<Preprocess>().unwrap(), Preprocess::Canny { low: 100.0, high: 200.0 });
        assert_eq!("canny:50:80".parse::<Preprocess>().unwrap(), Preprocess::Canny { low: 50.0, high: 80.0 });
        assert_eq!("palette".parse::<Preprocess>().unwrap(), Preprocess::Palette);
        assert_eq!("invert".parse::<Preprocess>().unwrap(), Preprocess::Invert);
        for bad in ["", "canny:1", "canny:200:100", "canny:x:y", "canny:-1:5", "blur", "invert:1", "canny:1:2:3"] {
            assert!(bad.parse::<Preprocess>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn invert_and_palette_keep_size_and_channels() {
        let pixels: Vec<u8> = (0..128 * 64 * 3).map(|i| (i * 7 % 256) as u8).collect();
        let image = ConditionImage::from_pixels(128, 64, ConditionKind::Rgb, pixels.clone()).unwrap();
        let inverted = Preprocess::Invert.apply(&image).unwrap();
        assert!(inverted.pixels().iter().zip(&pixels).all(|(a, b)| a + b == 255));
        let palette = Preprocess::Palette.apply(&image).unwrap();
        assert_eq!((palette.width(), palette.height(), palette.kind()), (128, 64, ConditionKind::Rgb));
        // Two cells, each one color.
        let px = |x: usize, y: usize| &palette.pixels()[(y * 128 + x) * 3..(y * 128 + x) * 3 + 3];
        assert!((0..64).all(|y| (0..64).all(|x| px(x, y) == px(0, 0))));
        assert!((0..64).all(|y| (64..128).all(|x| px(x, y) == px(64, 0))));
        let tiny = ConditionImage::from_pixels(32, 64, ConditionKind::Gray, vec![0; 32 * 64]).unwrap();
        assert!(Preprocess::Palette.apply(&tiny).is_err());
    }

    #[test]
    fn cubic_of_a_constant_is_the_constant() {
        let src = vec![200u8; 300 * 200];
        assert!(resize_cubic_cv(&src, 1, (300, 200), (7, 5)).iter().all(|&v| v == 200));
        assert!(resize_nearest_cv(&[1, 2, 3, 4], 1, (2, 2), (5, 3)).len() == 15);
    }

    #[test]
    fn canny_marks_the_edge_of_a_square() {
        let mut pixels = vec![0u8; 64 * 64];
        for y in 16..48 {
            for x in 16..48 {
                pixels[y * 64 + x] = 255;
            }
        }
        let image = ConditionImage::from_pixels(64, 64, ConditionKind::Gray, pixels).unwrap();
        let edges = Preprocess::Canny { low: CANNY_LOW, high: CANNY_HIGH }.apply(&image).unwrap();
        let at = |x: usize, y: usize| edges.pixels()[y * 64 + x];
        assert!(edges.pixels().iter().all(|&v| v == 0 || v == 255));
        assert_eq!(at(32, 32), 0, "inside the square");
        assert_eq!(at(4, 4), 0, "far outside");
        assert!((14..=17).any(|x| at(x, 32) == 255), "left edge");
    }
}
