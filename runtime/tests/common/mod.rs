//! Shared by the parity tests: where the committed fixtures are, and how results are compared.
#![allow(dead_code)]

pub mod combo_cases;

use std::path::PathBuf;

use ndarray::ArrayD;

/// `graphs/` at the repository root.
pub fn graphs_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("graphs")
}

/// What `scripts/generate-sets.sh` writes to `graphs/generated` (and `graphs/generated/fixtures`).
pub const GENERATED_SETS: [&str; 6] =
    ["tiny-sd1-ip", "tiny-sd1-ip-plus", "tiny-sdxl-ip", "tiny-sdxl-ip-plus", "tiny-sd1-style", "tiny-sd1-ip-style"];

/// `graphs/generated`: the sets and fixtures `scripts/generate-sets.sh` writes (not committed).
pub fn generated_dir() -> PathBuf {
    let dir = graphs_dir().join("generated");
    for set in GENERATED_SETS {
        assert!(
            dir.join(set).join("manifest.json").is_file(),
            "{} lacks {set}: the IP-Adapter and style sets are generated, not committed; run \
             `bash scripts/generate-sets.sh` (scripts/test.sh does)",
            dir.display()
        );
    }
    dir
}

/// The tiny SD 1.x graph set.
pub fn tiny_sd1() -> PathBuf {
    graphs_dir().join("tiny-sd1")
}

/// The diffusers fixtures for the tiny SD 1.x set.
pub fn tiny_sd1_fixtures() -> PathBuf {
    graphs_dir().join("fixtures").join("tiny-sd1")
}

/// The tiny zoo: one graph set per family (`tiny-sd1`, `tiny-sd2`, `tiny-sdxl`) and the SD 1.x
/// inpainting set (9-channel UNet).
pub const TINY_SETS: [&str; 4] = ["tiny-sd1", "tiny-sd2", "tiny-sdxl", "tiny-sd1-inpaint"];

/// `graphs/NAME`.
pub fn tiny_set(name: &str) -> PathBuf {
    graphs_dir().join(name)
}

/// `graphs/fixtures/NAME`.
pub fn tiny_fixtures(name: &str) -> PathBuf {
    graphs_dir().join("fixtures").join(name)
}

/// The fixture cases of a fixtures folder (its `cases.json`), as JSON.
#[allow(dead_code)] // not every test binary reads cases
pub fn fixture_cases(fixtures: &std::path::Path) -> Vec<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(fixtures.join("cases.json")).unwrap()).unwrap()
}

/// ‖actual − expected‖₂ / ‖expected‖₂.
pub fn rel_l2(actual: &ArrayD<f32>, expected: &ArrayD<f32>) -> f64 {
    assert_eq!(actual.shape(), expected.shape(), "shape mismatch");
    let (mut diff, mut norm) = (0f64, 0f64);
    for (a, e) in actual.iter().zip(expected) {
        diff += (f64::from(*a) - f64::from(*e)).powi(2);
        norm += f64::from(*e).powi(2);
    }
    assert!(norm > 0.0, "expected tensor is all zeros: the comparison would be meaningless");
    (diff / norm).sqrt()
}

/// max |actual − expected|.
pub fn max_abs(actual: &ArrayD<f32>, expected: &ArrayD<f32>) -> f64 {
    assert_eq!(actual.shape(), expected.shape(), "shape mismatch");
    actual.iter().zip(expected).map(|(a, e)| (f64::from(*a) - f64::from(*e)).abs()).fold(0.0, f64::max)
}

/// A valid PNG header declaring `width` × `height` 8-bit gray pixels, followed by a few bytes of
/// compressed data: a decompression bomb of a few dozen bytes.
pub fn png_bomb(width: u32, height: u32) -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8; 4], data: &[u8]| {
        png.extend((data.len() as u32).to_be_bytes());
        let body: Vec<u8> = kind.iter().chain(data).copied().collect();
        png.extend(&body);
        png.extend(crc32(&body).to_be_bytes());
    };
    let mut ihdr = width.to_be_bytes().to_vec();
    ihdr.extend(height.to_be_bytes());
    ihdr.extend([8, 0, 0, 0, 0]);
    chunk(b"IHDR", &ihdr);
    // A zlib stream holding one stored block of a few zero bytes, far short of the declared size.
    chunk(b"IDAT", &[0x78, 0x01, 0x01, 0x04, 0x00, 0xfb, 0xff, 0, 0, 0, 0]);
    chunk(b"IEND", &[]);
    png
}
