//! Resource bounds: how large a request, and the files it names, may be. A request is checked
//! against them before anything is allocated for it, so a hostile or mistaken request gets
//! [`Error::LimitExceeded`] instead of exhausting a server's memory or time.
//!
//! The defaults serve one image up to 2048×2048 (four times SDXL's native size) and a batch of up
//! to 16 SDXL-size images. A service sets its own through [`LoadOptions::limits`](crate::LoadOptions).

use crate::error::{Error, Result};

/// Bounds a request must stay within (see the module docs). Each field names what it bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest image side, in pixels.
    pub max_side: u32,
    /// Pixels of one output image (width × height). A UNet's activations, and its attention
    /// (quadratic in the latent area), grow with it.
    pub max_pixels: u64,
    /// Images per request (`n_samples`).
    pub max_samples: usize,
    /// Pixels of all the images of a request together (`n_samples` × width × height).
    pub max_batch_pixels: u64,
    /// Denoising steps per request.
    pub max_steps: usize,
    /// Adapters attached to one request.
    pub max_adapters: usize,
    /// ControlNets attached to one request (each runs at every step).
    pub max_controls: usize,
    /// Length of a prompt or negative prompt, in bytes (text encoders read at most 77 tokens, so
    /// longer text only costs tokenizer time).
    pub max_prompt_bytes: usize,
    /// Size of a condition image file, in bytes.
    pub max_image_file_bytes: u64,
    /// Pixels of a condition image once decoded (width × height): a small PNG or JPEG can declare
    /// a huge image (a decompression bomb).
    pub max_image_pixels: u64,
    /// Size of a `.npy` latents file, in bytes.
    pub max_npy_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_side: 8192,
            max_pixels: 2048 * 2048,
            max_samples: 16,
            max_batch_pixels: 16 * 1024 * 1024,
            max_steps: 1000,
            max_adapters: 16,
            max_controls: 16,
            max_prompt_bytes: 64 * 1024,
            max_image_file_bytes: 256 * 1024 * 1024,
            max_image_pixels: 8192 * 8192,
            max_npy_bytes: 1024 * 1024 * 1024,
        }
    }
}

impl Limits {
    /// No practical bound (for tests and trusted batch jobs); allocations can still fail.
    pub fn unbounded() -> Self {
        Limits {
            max_side: u32::MAX,
            max_pixels: u64::MAX,
            max_samples: usize::MAX,
            max_batch_pixels: u64::MAX,
            max_steps: usize::MAX,
            max_adapters: usize::MAX,
            max_controls: usize::MAX,
            max_prompt_bytes: usize::MAX,
            max_image_file_bytes: u64::MAX,
            max_image_pixels: u64::MAX,
            max_npy_bytes: u64::MAX,
        }
    }

    /// Checks an output size and sample count against `max_side`, `max_pixels` and
    /// `max_batch_pixels` / `max_samples`.
    pub fn check_images(&self, width: u32, height: u32, samples: usize) -> Result<()> {
        let side = width.max(height);
        exceeds("the image side", side.into(), self.max_side.into(), "max_side", "request a smaller size")?;
        let pixels = u64::from(width) * u64::from(height);
        exceeds(
            &format!("the pixel count of a {width}x{height} image"),
            pixels,
            self.max_pixels,
            "max_pixels",
            "request a smaller size",
        )?;
        exceeds("the number of samples", samples as u64, self.max_samples as u64, "max_samples", "split the request")?;
        exceeds(
            &format!("the pixel count of {samples} sample(s) of {width}x{height}"),
            pixels.saturating_mul(samples as u64),
            self.max_batch_pixels,
            "max_batch_pixels",
            "split the request or request a smaller size",
        )
    }

    /// Checks a step count against `max_steps`.
    pub fn check_steps(&self, steps: usize) -> Result<()> {
        exceeds("the number of steps", steps as u64, self.max_steps as u64, "max_steps", "request fewer steps")
    }

    /// Checks a prompt's length against `max_prompt_bytes`.
    pub fn check_prompt(&self, which: &str, prompt: &str) -> Result<()> {
        exceeds(
            &format!("the {which} length in bytes"),
            prompt.len() as u64,
            self.max_prompt_bytes as u64,
            "max_prompt_bytes",
            "shorten it (text encoders read only the first 77 tokens)",
        )
    }

    /// Checks the number of ControlNets against `max_controls`.
    pub fn check_controls(&self, controls: usize) -> Result<()> {
        exceeds(
            "the number of ControlNets",
            controls as u64,
            self.max_controls as u64,
            "max_controls",
            "attach fewer ControlNets",
        )
    }

    /// Checks the number of adapters against `max_adapters`.
    pub fn check_adapters(&self, adapters: usize) -> Result<()> {
        exceeds(
            "the number of adapters",
            adapters as u64,
            self.max_adapters as u64,
            "max_adapters",
            "attach fewer adapters",
        )
    }

    /// Checks a condition image's declared size (before it is decoded) against `max_image_pixels`;
    /// `name` says which image.
    pub fn check_image_pixels(&self, name: &str, width: u32, height: u32) -> Result<()> {
        let pixels = u64::from(width) * u64::from(height);
        exceeds(
            &format!("the pixel count of condition image {name} ({width}x{height})"),
            pixels,
            self.max_image_pixels,
            "max_image_pixels",
            "downscale the image; it is resized to the output size anyway",
        )
    }
}

/// Reads at most `max` bytes of the file at `path`: a larger file is [`Error::LimitExceeded`] on
/// `limit`, found without reading more than `max + 1` bytes (so device files such as /dev/zero and
/// files growing while read are bounded too). `what` names the file in the error; `io_error` turns
/// a failure to read it into the caller's error.
pub(crate) fn read_bounded(
    path: &std::path::Path,
    max: u64,
    what: &str,
    limit: &'static str,
    fix: &'static str,
    io_error: impl Fn(std::io::Error) -> Error,
) -> Result<Vec<u8>> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(&io_error)?;
    let mut bytes = Vec::new();
    file.take(max.saturating_add(1)).read_to_end(&mut bytes).map_err(&io_error)?;
    let read = bytes.len() as u64;
    if read > max {
        // The real size where the file has one (reading stopped one byte past the limit).
        let size = std::fs::metadata(path).map(|m| m.len()).ok().filter(|&len| len > max).unwrap_or(read);
        return Err(Error::LimitExceeded {
            what: format!("the size in bytes of {what}"),
            value: size,
            max,
            limit,
            fix,
        });
    }
    Ok(bytes)
}

/// `Err(LimitExceeded)` when `value > max`.
pub(crate) fn exceeds(what: &str, value: u64, max: u64, limit: &'static str, fix: &'static str) -> Result<()> {
    if value > max {
        return Err(Error::LimitExceeded { what: what.to_string(), value, max, limit, fix });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_name_the_field_to_raise() {
        let limits = Limits::default();
        assert!(limits.check_images(2048, 2048, 4).is_ok());
        let message = limits.check_images(4096, 4096, 1).unwrap_err().to_string();
        assert!(message.contains("limits.max_pixels") && message.contains("4096x4096"), "{message}");
        let message = limits.check_images(1024, 1024, 17).unwrap_err().to_string();
        assert!(message.contains("limits.max_samples"), "{message}");
        let message = limits.check_images(2048, 2048, 16).unwrap_err().to_string();
        assert!(message.contains("limits.max_batch_pixels"), "{message}");
        assert!(limits.check_images(9000, 64, 1).unwrap_err().to_string().contains("limits.max_side"));
        assert!(limits.check_steps(1001).unwrap_err().to_string().contains("limits.max_steps"));
        assert!(Limits::unbounded().check_images(u32::MAX, u32::MAX, usize::MAX).is_ok());
    }
}
