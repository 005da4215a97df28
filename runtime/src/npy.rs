//! `.npy` files for latents: what diffusers users save with `np.save` (float32, C order).

use std::path::Path;

use ndarray::{Array4, ArrayD, ArrayViewD};
use ndarray_npy::ViewNpyExt;

use crate::error::{Error, Result};
use crate::limits::{read_bounded, Limits};

/// Reads a float32 array of rank 4 (NCHW latents), refusing files over `limits.max_npy_bytes`.
pub fn read_latents(path: &Path, limits: &Limits) -> Result<Array4<f32>> {
    let bytes = read_bounded(
        path,
        limits.max_npy_bytes,
        &format!("latents file {}", path.display()),
        "max_npy_bytes",
        "latents are [n_samples, channels, height/8, width/8] float32",
        |e| Error::Io { path: path.to_path_buf(), message: format!("cannot read latents: {e}") },
    )?;
    parse_latents(&bytes).map_err(|message| Error::Npy { path: path.to_path_buf(), message })
}

/// Parses the bytes of a `.npy` file holding a float32 array of rank 4. The header's shape is
/// checked against the data that is really there before anything is allocated for it, so a
/// short file claiming a huge shape costs nothing.
pub fn parse_latents(bytes: &[u8]) -> std::result::Result<Array4<f32>, String> {
    check_header_length(bytes)?;
    // `view_npy` borrows the data in place and needs it aligned for f32; a copy into u32 storage is.
    let mut aligned = vec![0u32; bytes.len().div_ceil(4)];
    let storage: &mut [u8] = bytemuck_bytes(&mut aligned);
    storage[..bytes.len()].copy_from_slice(bytes);
    let view = ArrayViewD::<f32>::view_npy(&storage[..bytes.len()])
        .map_err(|e| format!("{e}; expected a little-endian float32 array saved with numpy.save"))?;
    let shape = view.shape().to_vec();
    let array: ArrayD<f32> = view.to_owned();
    array
        .into_dimensionality()
        .map_err(|_| format!("has shape {shape:?}; latents have 4 dimensions (batch, channels, height, width)"))
}

/// The `.npy` header's declared length must fit in the file: ndarray-npy allocates that length
/// (up to 4 GiB in format 2) before reading it. Layout: magic `\x93NUMPY`, major and minor version,
/// then the header length, 2 bytes little-endian in format 1, 4 bytes in formats 2 and 3.
fn check_header_length(bytes: &[u8]) -> std::result::Result<(), String> {
    let malformed =
        || "not a .npy file (bad magic or header); expected a float32 array saved with numpy.save".to_string();
    if bytes.len() < 10 || !bytes.starts_with(b"\x93NUMPY") {
        return Err(malformed());
    }
    let (start, declared) = match bytes[6] {
        1 => (10, usize::from(u16::from_le_bytes([bytes[8], bytes[9]]))),
        2 | 3 if bytes.len() >= 12 => (12, u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize),
        _ => return Err(malformed()),
    };
    if declared > bytes.len() - start {
        return Err(format!(
            "the header claims {declared} bytes but the file has {} after it; the file is truncated or not a .npy file",
            bytes.len() - start
        ));
    }
    check_header_brackets(&bytes[start..start + declared])
}

/// The header of a plain array is one flat dict with one tuple in it, as numpy writes it:
/// `{'descr': '<f4', 'fortran_order': False, 'shape': (1, 4, 64, 64), }`. ndarray-npy parses it
/// with a backtracking parser that takes exponential time on nested brackets (a 359-byte file of
/// `{{{...` took over 20 s, found by fuzzing), so anything with more brackets is refused first.
fn check_header_brackets(header: &[u8]) -> std::result::Result<(), String> {
    let count = |c: u8| header.iter().filter(|&&b| b == c).count();
    if count(b'{') != 1 || count(b'}') != 1 || count(b'(') > 1 || count(b')') > 1 || count(b'[') + count(b']') > 0 {
        return Err("the header is not numpy's dict of descr, fortran_order and shape; expected a float32 array \
                    saved with numpy.save"
            .to_string());
    }
    Ok(())
}

/// The bytes of a `u32` buffer.
fn bytemuck_bytes(words: &mut [u32]) -> &mut [u8] {
    let len = std::mem::size_of_val(words);
    // SAFETY: u8 has alignment 1 and every bit pattern is valid for both types; the slice covers
    // exactly the words' memory and borrows it mutably for its lifetime.
    unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), len) }
}

/// Writes `array` as float32 `.npy`, atomically: a temporary file in the same directory, renamed
/// into place, so a failure never leaves a partial file at `path`.
pub fn write_f32(path: &Path, array: &ArrayD<f32>) -> Result<()> {
    crate::atomic_file::write_atomically(path, |file| {
        ndarray_npy::WriteNpyExt::write_npy(array, file).map_err(|e| e.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(shape: &[usize], values: &[f32]) -> Vec<u8> {
        let array = ArrayD::from_shape_vec(shape, values.to_vec()).unwrap();
        let mut bytes = Vec::new();
        ndarray_npy::WriteNpyExt::write_npy(&array, &mut bytes).unwrap();
        bytes
    }

    #[test]
    fn reads_what_numpy_writes_and_refuses_lies() {
        let values: Vec<f32> = (0..8).map(|v| v as f32 * 0.5).collect();
        let bytes = npy(&[1, 2, 2, 2], &values);
        let latents = parse_latents(&bytes).unwrap();
        assert_eq!(latents.shape(), &[1, 2, 2, 2]);
        assert_eq!(latents.iter().copied().collect::<Vec<_>>(), values);
        // Unaligned input is copied, not refused.
        let mut shifted = vec![0u8];
        shifted.extend(&bytes);
        assert!(parse_latents(&shifted[1..]).is_ok());
        // A header claiming far more data than the file holds is refused without allocating it.
        let text = String::from_utf8_lossy(&bytes).replace("(1, 2, 2, 2)", "(99999999999, 2, 2, 2)");
        let message = parse_latents(text.as_bytes()).unwrap_err();
        assert!(message.contains("missing") || message.contains("header"), "{message}");
        assert!(parse_latents(&npy(&[8], &values)).unwrap_err().contains("4 dimensions"));
        // Format 2 declares its header length in 4 bytes: a 4 GiB claim in a 16-byte file (found by
        // fuzzing: ndarray-npy allocated the claimed length before reading it).
        let lie = b"\x93NUMPY\x02\x00\xf0\xff\xff\xffabcd";
        assert!(parse_latents(lie).unwrap_err().contains("the header claims 4294967280 bytes"));

        // Nested brackets, which ndarray-npy's header parser takes exponential time on (fuzzing
        // found 80 `{` taking over 20 s), are refused before it sees them.
        let mut nested = npy(&[1, 4, 2, 2], &[0.5; 16]);
        let open = nested.iter().position(|&b| b == b'{').unwrap();
        nested[open + 1] = b'{';
        assert!(parse_latents(&nested).unwrap_err().contains("not numpy's dict"), "nested braces");
        assert!(parse_latents(b"not npy").is_err());
    }
}
