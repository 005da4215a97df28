//! Decoder output to images: diffusers' post-processing, atomic PNG writing and image grids.

use std::io::Write;
use std::path::Path;

use image::codecs::png::PngEncoder;
use image::{ExtendedColorType, ImageEncoder, RgbImage};
use ndarray::ArrayView4;

use crate::atomic_file::write_atomically;
use crate::error::{Error, Result};

/// Converts VAE decoder output (`[N, 3, H, W]`, nominally in `[-1, 1]`) to `N` RGB images the way
/// diffusers' adapter pipeline does with `output_type="pil"` (`decode_latents` and `numpy_to_pil`
/// in `pipelines/t2i_adapter/pipeline_stable_diffusion_adapter.py`): `(x / 2 + 0.5).clamp(0, 1)`
/// in f32, then `(x * 255).round().astype("uint8")`, where numpy rounds half to even. Bit-exact
/// for f32 decoder output (diffusers with an fp16 VAE does the first step in fp16, which this does
/// not model). NaN maps to 0 (what numpy's cast of NaN gives on x86), as in diffusers; the
/// pipeline never gets here with one ([`Pipeline::decode`](crate::Pipeline::decode) refuses
/// non-finite decoder output first, so a black image is never a success).
///
/// Errors with [`Error::Backend`] (graph `vae_decoder`) if the tensor is not `[N, 3, H, W]` or `H`/`W` exceed
/// `u32`.
pub fn decoder_output_to_images(x: ArrayView4<f32>) -> Result<Vec<RgbImage>> {
    let (n, c, h, w) = x.dim();
    if c != 3 {
        return Err(Error::Backend {
            backend: "pipeline",
            graph: "vae_decoder".into(),
            message: format!("output must be [N, 3, H, W], got {:?}: the VAE decoder does not produce RGB", x.shape()),
        });
    }
    let (Ok(width), Ok(height)) = (u32::try_from(w), u32::try_from(h)) else {
        return Err(Error::Backend {
            backend: "pipeline",
            graph: "vae_decoder".into(),
            message: format!("output {:?} is too large for an image", x.shape()),
        });
    };
    Ok((0..n)
        .map(|i| {
            RgbImage::from_fn(width, height, |px, py| {
                let (px, py) = (px as usize, py as usize);
                image::Rgb([0, 1, 2].map(|ch| to_u8(x[[i, ch, py, px]])))
            })
        })
        .collect())
}

/// One sample: denormalize, clamp, scale, round half to even (all in f32, as torch/numpy do).
fn to_u8(v: f32) -> u8 {
    // `v / 2` and `v * 0.5` are the same IEEE operation result; keep diffusers' spelling.
    let unit = (v / 2.0 + 0.5).clamp(0.0, 1.0);
    // `as` saturates and maps NaN to 0.
    (unit * 255.0).round_ties_even() as u8
}

/// Writes `img` as a PNG at `path` atomically: the data goes to a temporary file in the same
/// directory, is flushed to disk, then renamed over `path`. On any failure the temporary file is
/// removed and `path` is left as it was (absent or with its previous content).
///
/// The parent directory must exist: it is not created (a mistyped output directory should fail, not
/// appear). Errors with [`Error::Io`] naming the path and what to fix.
pub fn write_png(path: &Path, img: &RgbImage) -> Result<()> {
    write_atomically(path, |out| {
        PngEncoder::new(out)
            .write_image(img.as_raw(), img.width(), img.height(), ExtendedColorType::Rgb8)
            .map_err(|e| format!("cannot encode PNG: {e}"))
    })
}

/// Writes `bytes` to `path` atomically, like [`write_png`] (reports, JSON).
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomically(path, |out| out.write_all(bytes).map_err(|e| e.to_string()))
}

/// Writes a condition image as an 8-bit PNG (gray or RGB, as it is) at `path`, atomically.
pub fn write_condition_png(path: &Path, image: &crate::condition::ConditionImage) -> Result<()> {
    let color = match image.kind() {
        crate::condition::ConditionKind::Gray => image::ExtendedColorType::L8,
        crate::condition::ConditionKind::Rgb => image::ExtendedColorType::Rgb8,
    };
    let mut bytes = Vec::new();
    image::ImageEncoder::write_image(
        image::codecs::png::PngEncoder::new(&mut bytes),
        image.pixels(),
        image.width(),
        image.height(),
        color,
    )
    .map_err(|e| crate::error::Error::Io { path: path.to_path_buf(), message: format!("cannot encode PNG: {e}") })?;
    write_file_atomic(path, &bytes)
}

/// Tiles images left to right, top to bottom, `columns` per row, like diffusers'
/// `utils.make_image_grid(images, rows, cols)`. Cells take the largest width and height among the
/// images; smaller images sit at the cell's top-left on black. `columns` is clamped to
/// `1..=images.len()`; an empty slice gives a 0x0 image.
pub fn grid(images: &[RgbImage], columns: usize) -> RgbImage {
    if images.is_empty() {
        return RgbImage::new(0, 0);
    }
    let columns = columns.clamp(1, images.len());
    let rows = images.len().div_ceil(columns);
    let cell_w = images.iter().map(|im| im.width()).max().unwrap_or(0);
    let cell_h = images.iter().map(|im| im.height()).max().unwrap_or(0);
    let mut out = RgbImage::new(cell_w * columns as u32, cell_h * rows as u32);
    for (i, im) in images.iter().enumerate() {
        let (x0, y0) = ((i % columns) as u32 * cell_w, (i / columns) as u32 * cell_h);
        for (x, y, px) in im.enumerate_pixels() {
            out.put_pixel(x0 + x, y0 + y, *px);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array4;

    #[test]
    fn rounding_is_half_to_even() {
        // 0.5 * 255 = 127.5 -> 128 (even); values landing exactly on k + 0.5 go to the even k.
        assert_eq!(to_u8(0.0), 128);
        assert_eq!(to_u8(-1.0), 0);
        assert_eq!(to_u8(1.0), 255);
        assert_eq!(to_u8(-7.0), 0);
        assert_eq!(to_u8(f32::INFINITY), 255);
        assert_eq!(to_u8(f32::NAN), 0);
    }

    #[test]
    fn rejects_non_rgb() {
        let x = Array4::<f32>::zeros((1, 4, 2, 2));
        assert!(matches!(decoder_output_to_images(x.view()), Err(Error::Backend { .. })));
    }

    #[test]
    fn grid_places_cells() {
        let a = RgbImage::from_pixel(2, 1, image::Rgb([1, 1, 1]));
        let b = RgbImage::from_pixel(2, 1, image::Rgb([2, 2, 2]));
        let c = RgbImage::from_pixel(2, 1, image::Rgb([3, 3, 3]));
        let g = grid(&[a, b, c], 2);
        assert_eq!(g.dimensions(), (4, 2));
        assert_eq!(g.get_pixel(2, 0).0, [2, 2, 2]);
        assert_eq!(g.get_pixel(0, 1).0, [3, 3, 3]);
        assert_eq!(g.get_pixel(3, 1).0, [0, 0, 0]);
        assert_eq!(grid(&[], 3).dimensions(), (0, 0));
    }
}
