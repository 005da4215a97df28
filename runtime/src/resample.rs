//! Pillow-exact LANCZOS and BICUBIC resampling of 8-bit images.
//!
//! diffusers resizes condition images with `img.resize((w, h), resample=PIL.Image.LANCZOS)`
//! (`_preprocess_adapter_image` in `pipelines/t2i_adapter/pipeline_stable_diffusion_adapter.py`),
//! and transformers' PIL-backed `CLIPImageProcessor` resizes IP-Adapter reference images with
//! `resample=PIL.Image.BICUBIC` ([`crate::clip_image`]). So this is a transcription of Pillow 13's
//! `src/libImaging/Resample.c` for the 8-bit path: the same double-precision filter weights, the
//! same rounding to 22-bit fixed point, the same choice of which pass runs first, the same row
//! cropping, and the same integer accumulation and clipping. The result is bit-identical to Pillow
//! for modes "L" and "RGB" (`tests/image_parity.rs`).

use std::f64::consts::PI;

/// A Pillow resampling filter (`Image.Resampling`), with the support radius Pillow gives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Filter {
    /// `Image.LANCZOS` (1): Lanczos-3, `{lanczos_filter, 3.0}`.
    Lanczos,
    /// `Image.BICUBIC` (3): Keys cubic convolution with `a = -0.5`, `{bicubic_filter, 2.0}`.
    Bicubic,
}

impl Filter {
    /// Support radius in source pixels at scale 1.
    fn support(self) -> f64 {
        match self {
            Filter::Lanczos => 3.0,
            Filter::Bicubic => 2.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Filter::Lanczos => lanczos(x),
            Filter::Bicubic => bicubic(x),
        }
    }
}

/// Fixed-point fraction bits of the coefficients: 8 bits for the result, 2 for overflow of filters
/// with negative lobes, the rest for precision (Pillow's `PRECISION_BITS = 32 - 8 - 2`).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// [`resize`] with [`Filter::Lanczos`]: `Image.resize((new_width, new_height), Image.LANCZOS)`.
///
/// # Panics
/// As [`resize`].
pub fn resize_lanczos(
    pixels: &[u8],
    channels: usize,
    width: u32,
    height: u32,
    new_width: u32,
    new_height: u32,
) -> Vec<u8> {
    resize(pixels, channels, width, height, new_width, new_height, Filter::Lanczos)
}

/// Resizes an 8-bit interleaved image (HWC, row-major, `channels` samples per pixel) with a Pillow
/// filter, as `Image.resize((new_width, new_height), resample=filter)` does (no `reducing_gap`).
///
/// Every channel is filtered independently, which is what Pillow does for modes "L" and "RGB"
/// (1 and 3 channels). For RGBA, Pillow premultiplies alpha first (it resizes "RGBa"); this
/// function does not, so convert to RGB or L before calling it when Pillow parity matters.
///
/// Same-size resizes return a copy, as Pillow's `Image.resize` does. A zero-sized source yields
/// zeros; a zero-sized target yields an empty buffer.
///
/// # Panics
/// If `pixels.len() != width * height * channels` (a caller bug, like slice indexing out of range).
pub fn resize(
    pixels: &[u8],
    channels: usize,
    width: u32,
    height: u32,
    new_width: u32,
    new_height: u32,
    filter: Filter,
) -> Vec<u8> {
    let all = Region { x: 0, y: 0, width: new_width, height: new_height };
    resize_region(pixels, channels, width, height, new_width, new_height, filter, all)
}

/// A rectangle of a resized image, in its pixel coordinates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

/// The pixels inside `region` of [`resize`]'s result, computed without the rest: equal to resizing
/// and then cropping, bit for bit (each output pixel depends only on its own taps, and the pass
/// order is chosen from the full sizes, as Pillow does), at the cost of the region only. A center
/// crop of an extreme aspect ratio (a 1x2000 source resized to 224x448000 before a 224x224 crop)
/// needs this not to allocate the whole resized image.
///
/// # Panics
/// If `pixels.len() != width * height * channels`, or `region` is not inside
/// `new_width x new_height` (caller bugs).
#[allow(clippy::too_many_arguments)] // Pillow's own argument list, plus the region
pub fn resize_region(
    pixels: &[u8],
    channels: usize,
    width: u32,
    height: u32,
    new_width: u32,
    new_height: u32,
    filter: Filter,
    region: Region,
) -> Vec<u8> {
    let (w, h) = (width as usize, height as usize);
    assert_eq!(
        pixels.len(),
        w * h * channels,
        "resize: buffer holds {} bytes, expected {width}x{height}x{channels}",
        pixels.len()
    );
    let (x0, y0, rw, rh) = (region.x as usize, region.y as usize, region.width as usize, region.height as usize);
    assert!(
        x0 + rw <= new_width as usize && y0 + rh <= new_height as usize,
        "resize: {region:?} is outside the {new_width}x{new_height} result"
    );
    let (nw, nh) = (new_width as usize, new_height as usize);
    if rw == 0 || rh == 0 {
        return Vec::new();
    }
    let need_horizontal = nw != w;
    let need_vertical = nh != h;
    // Image.resize: `if self.size == size and box == (0, 0, *self.size): return self.copy()`.
    if !need_horizontal && !need_vertical {
        return crop(pixels, channels, w, x0, y0, rw, rh);
    }
    if !need_vertical {
        return horizontal(pixels, channels, w, y0, rh, &Coeffs::new(width, nw, x0..x0 + rw, filter));
    }
    let vert = Coeffs::new(height, nh, y0..y0 + rh, filter);
    if !need_horizontal {
        let columns = crop(pixels, channels, w, x0, 0, rw, h);
        return vertical(&columns, channels, rw, &vert, 0);
    }
    let horiz = Coeffs::new(width, nw, x0..x0 + rw, filter);

    // Pillow 13's ImagingResample (read from the 13.0 wheel's machine code; Pillow PR #9549, "If
    // height is scaled down significantly more than width, resize vertically first") runs the
    // vertical pass first when the height shrinks by more than twice as many pixels as the width
    // does (a growing width counts as a negative shrink). The two orders round the 8-bit
    // intermediate differently, so the order is part of the result. Older Pillow always went
    // horizontal first.
    let shrink_h = i64::from(height) - i64::from(new_height);
    let shrink_w = i64::from(width) - i64::from(new_width);
    if shrink_h > 0 && shrink_h > 2 * shrink_w {
        let temp = vertical(pixels, channels, w, &vert, 0);
        return horizontal(&temp, channels, w, 0, rh, &horiz);
    }

    // Horizontal first (ImagingResampleInner), producing only the source rows the vertical pass
    // reads: from the first tap of the first output row to the last tap of the last one.
    let ybox_first = vert.bounds.first().map_or(0, |&(lo, _)| lo);
    let ybox_last = vert.bounds.last().map_or(0, |&(lo, n)| lo + n);
    let rows = ybox_last.saturating_sub(ybox_first);
    let temp = horizontal(pixels, channels, w, ybox_first, rows, &horiz);
    vertical(&temp, channels, rw, &vert, ybox_first)
}

/// The `rw x rh` block at `(x0, y0)` of an HWC image `width` pixels wide.
fn crop(pixels: &[u8], channels: usize, width: usize, x0: usize, y0: usize, rw: usize, rh: usize) -> Vec<u8> {
    let stride = width * channels;
    (y0..y0 + rh).flat_map(|y| &pixels[y * stride + x0 * channels..][..rw * channels]).copied().collect()
}

/// Pillow's `sinc_filter`.
fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    let x = x * PI;
    x.sin() / x
}

/// Pillow's `lanczos_filter`: truncated sinc windowed by a 3x wider sinc, on `[-3, 3)`.
fn lanczos(x: f64) -> f64 {
    if (-3.0..3.0).contains(&x) {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

/// Pillow's `bicubic_filter` (`#define a -0.5`), term for term: the evaluation order is part of
/// the double-precision weight and so of the fixed-point tap.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per-output-pixel filter taps along one axis, in Pillow's fixed point.
struct Coeffs {
    /// Taps per output pixel (`ksize`): the stride of `weights`.
    ksize: usize,
    /// For each output pixel: first source index and number of taps.
    bounds: Vec<(usize, usize)>,
    /// `ksize` weights per output pixel, scaled by `1 << PRECISION_BITS`.
    weights: Vec<i32>,
}

impl Coeffs {
    /// `precompute_coeffs` followed by `normalize_coeffs_8bpc`, for the box `(0, in_size)`, for
    /// the output pixels `outputs` (of `0..out_size`) only; they are indexed from 0.
    fn new(in_size: u32, out_size: usize, outputs: std::ops::Range<usize>, filter: Filter) -> Coeffs {
        // Pillow passes the box as C floats; `(double)(in1 - in0)` with in0 = 0.
        let in0 = 0.0_f32;
        let in1 = in_size as f32;
        let scale = f64::from(in1 - in0) / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = filter.support() * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let ss = 1.0 / filterscale;

        let mut bounds = Vec::with_capacity(outputs.len());
        let mut weights = vec![0_i32; outputs.len() * ksize];
        let mut k = vec![0.0_f64; ksize];
        for (index, xx) in outputs.enumerate() {
            let center = f64::from(in0) + (xx as f64 + 0.5) * scale;
            // `(int)` truncates toward zero; Rust's `as` does too (and saturates instead of UB).
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(i64::from(in_size));
            let n = (xmax - xmin).max(0) as usize;
            let xmin = xmin as usize;
            let mut ww = 0.0;
            for (x, kx) in k.iter_mut().enumerate().take(n) {
                let w = filter.weight(((x + xmin) as f64 - center + 0.5) * ss);
                *kx = w;
                ww += w;
            }
            let row = &mut weights[index * ksize..(index + 1) * ksize];
            for (dst, &w) in row.iter_mut().zip(&k[..n]) {
                let w = if ww != 0.0 { w / ww } else { w };
                // normalize_coeffs_8bpc: round half away from zero, then truncate.
                let scaled = w * f64::from(1_u32 << PRECISION_BITS);
                *dst = if w < 0.0 { (-0.5 + scaled) as i32 } else { (0.5 + scaled) as i32 };
            }
            bounds.push((xmin, n));
        }
        Coeffs { ksize, bounds, weights }
    }

    fn taps(&self, out_index: usize) -> (usize, &[i32]) {
        let (lo, n) = self.bounds[out_index];
        let start = out_index * self.ksize;
        (lo, &self.weights[start..start + n])
    }
}

/// Pillow's `clip8`: drop the fraction bits and saturate to 0..=255.
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Rounding offset every accumulator starts from (`1 << (PRECISION_BITS - 1)`).
const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// `ImagingResampleHorizontal_8bpc`: output rows `0..rows` read source rows `row_offset..`.
fn horizontal(
    src: &[u8],
    channels: usize,
    src_width: usize,
    row_offset: usize,
    rows: usize,
    coeffs: &Coeffs,
) -> Vec<u8> {
    let out_width = coeffs.bounds.len();
    let mut out = vec![0_u8; rows * out_width * channels];
    let mut acc = vec![0_i32; channels];
    for yy in 0..rows {
        let src_row = &src[(yy + row_offset) * src_width * channels..][..src_width * channels];
        let out_row = &mut out[yy * out_width * channels..][..out_width * channels];
        for xx in 0..out_width {
            let (xmin, k) = coeffs.taps(xx);
            acc.fill(HALF);
            for (x, &kx) in k.iter().enumerate() {
                let px = &src_row[(xmin + x) * channels..][..channels];
                for (a, &v) in acc.iter_mut().zip(px) {
                    // C int arithmetic; wrapping mirrors it and cannot trigger in practice
                    // (|taps| sum to well under 2^31 / 255 / 2^22).
                    *a = a.wrapping_add(i32::from(v).wrapping_mul(kx));
                }
            }
            for (dst, &a) in out_row[xx * channels..][..channels].iter_mut().zip(&acc) {
                *dst = clip8(a);
            }
        }
    }
    out
}

/// `ImagingResampleVertical_8bpc`: `src` starts at source row `row_offset` of the coefficients'
/// coordinate system (the horizontal pass only produced the rows the vertical pass reads).
fn vertical(src: &[u8], channels: usize, width: usize, coeffs: &Coeffs, row_offset: usize) -> Vec<u8> {
    let out_height = coeffs.bounds.len();
    let stride = width * channels;
    let mut out = vec![0_u8; out_height * stride];
    let mut acc = vec![0_i32; stride];
    for yy in 0..out_height {
        let (ymin, k) = coeffs.taps(yy);
        acc.fill(HALF);
        for (y, &ky) in k.iter().enumerate() {
            let src_row = &src[(ymin + y - row_offset) * stride..][..stride];
            for (a, &v) in acc.iter_mut().zip(src_row) {
                *a = a.wrapping_add(i32::from(v).wrapping_mul(ky));
            }
        }
        for (dst, &a) in out[yy * stride..][..stride].iter_mut().zip(&acc) {
            *dst = clip8(a);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_size_is_identity() {
        let px: Vec<u8> = (0..5 * 4 * 3).map(|i| (i * 7 % 256) as u8).collect();
        assert_eq!(resize_lanczos(&px, 3, 5, 4, 5, 4), px);
    }

    #[test]
    fn constant_image_stays_constant() {
        // Normalized taps sum to 1 up to fixed-point rounding: a flat field must survive exactly.
        for &v in &[0_u8, 1, 128, 254, 255] {
            let px = vec![v; 17 * 9];
            let out = resize_lanczos(&px, 1, 17, 9, 40, 5);
            assert!(out.iter().all(|&o| o == v), "value {v}: {out:?}");
        }
    }

    #[test]
    fn zero_sizes_do_not_panic() {
        assert!(resize_lanczos(&[], 3, 0, 0, 4, 4).iter().all(|&v| v == 0));
        assert!(resize_lanczos(&[1, 2, 3], 3, 1, 1, 0, 0).is_empty());
        assert_eq!(resize_lanczos(&[1, 2, 3], 3, 1, 1, 2, 0).len(), 0);
    }

    #[test]
    fn bicubic_weights_are_keys_cubic() {
        // a = -0.5: 1 at 0, 0 at the integers, -0.0625 at 1.5, 0.5625 at 0.5, 0 from 2 on.
        assert_eq!(bicubic(0.0), 1.0);
        assert_eq!(bicubic(1.0), 0.0);
        assert_eq!(bicubic(-0.5), 0.5625);
        assert_eq!(bicubic(1.5), -0.0625);
        assert_eq!(bicubic(2.0), 0.0);
        for &v in &[0_u8, 3, 200, 255] {
            let px = vec![v; 11 * 7 * 3];
            let out = resize(&px, 3, 11, 7, 29, 4, Filter::Bicubic);
            assert!(out.iter().all(|&o| o == v), "value {v}: {out:?}");
        }
    }

    #[test]
    fn region_equals_crop_of_full_resize() {
        let (w, h) = (23_u32, 17_u32);
        let px: Vec<u8> = (0..w * h * 3).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        // Horizontal first, vertical first, one axis only, same size; up and down.
        for (nw, nh) in [(40, 30), (9, 5), (23, 40), (31, 17), (23, 17), (60, 3), (7, 16)] {
            for filter in [Filter::Lanczos, Filter::Bicubic] {
                let full = resize(&px, 3, w, h, nw, nh, filter);
                for region in [
                    Region { x: 0, y: 0, width: nw, height: nh },
                    Region { x: 1, y: nh / 3, width: nw - 2, height: nh - nh / 3 },
                    Region { x: nw - 1, y: nh - 1, width: 1, height: 1 },
                ] {
                    let got = resize_region(&px, 3, w, h, nw, nh, filter, region);
                    let want = crop(
                        &full,
                        3,
                        nw as usize,
                        region.x as usize,
                        region.y as usize,
                        region.width as usize,
                        region.height as usize,
                    );
                    assert!(got == want, "{filter:?} {w}x{h} -> {nw}x{nh}, {region:?}");
                }
            }
        }
    }

    #[test]
    fn taps_match_pillow_bounds() {
        // 100 -> 64: scale 1.5625, support 4.6875, ksize 11 (ceil(4.6875) * 2 + 1).
        let c = Coeffs::new(100, 64, 0..64, Filter::Lanczos);
        assert_eq!(c.ksize, 11);
        // center 0.78125: xmin = (int)(0.78125 - 4.6875 + 0.5) = (int)(-3.40625) = -3 -> 0;
        // xmax = (int)(5.96875) = 5.
        assert_eq!(c.bounds[0], (0, 5));
    }
}
