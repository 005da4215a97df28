//! `.npy` files for latents: what diffusers users save with `np.save` (float32, C order).

use std::path::Path;

use ndarray::{Array4, ArrayD};

use crate::error::{Error, Result};

/// Reads a float32 array of rank 4 (NCHW latents).
pub fn read_latents(path: &Path) -> Result<Array4<f32>> {
    let err = |message: String| Error::Npy { path: path.to_path_buf(), message };
    let array: ArrayD<f32> =
        ndarray_npy::read_npy(path).map_err(|e| err(format!("{e}; expected a float32 array saved with numpy.save")))?;
    let shape = array.shape().to_vec();
    array
        .into_dimensionality()
        .map_err(|_| err(format!("has shape {shape:?}; latents have 4 dimensions (batch, channels, height, width)")))
}

/// Writes `array` as float32 `.npy`, atomically: a temporary file in the same directory, renamed
/// into place, so a failure never leaves a partial file at `path`.
pub fn write_f32(path: &Path, array: &ArrayD<f32>) -> Result<()> {
    crate::atomic_file::write_atomically(path, |file| {
        ndarray_npy::WriteNpyExt::write_npy(array, file).map_err(|e| e.to_string())
    })
}
