//! IP-Adapter image preprocessing parity with transformers' PIL-backed `CLIPImageProcessor` and
//! Pillow's BICUBIC resize.
//!
//! Fixtures come from `python -m t2i_export.clip_image_fixtures --out ../graphs/fixtures/clip_image`
//! (run in `export/`); `cases.tsv` lists the checks. Tolerance: none. Every comparison is of bits
//! (uint8 samples, f32 bit patterns), since the processor's float steps are elementwise IEEE
//! operations on 256 possible inputs per channel and the resize is integer arithmetic.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use t2i_rt::clip_image::{clip_pixel_values, load_clip_image, ClipImageConfig};
use t2i_rt::resample::{resize, Filter};
use t2i_rt::Limits;

fn fixtures() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../graphs/fixtures/clip_image");
    assert!(
        dir.join("cases.tsv").is_file(),
        "missing {}: in export/, run \
         `python -m t2i_export.clip_image_fixtures --out ../graphs/fixtures/clip_image`",
        dir.display()
    );
    dir
}

/// One row of `cases.tsv`: kind, source, config or mode, width, height, expected.
struct Case {
    source: String,
    config: String,
    size: Option<(u32, u32)>,
    expected: String,
}

fn cases(kind: &str) -> Vec<Case> {
    let text = fs::read_to_string(fixtures().join("cases.tsv")).unwrap();
    let selected: Vec<Case> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split('\t').collect::<Vec<&str>>())
        .filter(|f| f[0] == kind)
        .map(|f| {
            assert_eq!(f.len(), 6, "bad cases.tsv line {f:?}");
            Case {
                source: f[1].to_string(),
                config: f[2].to_string(),
                size: (f[3] != "-").then(|| (f[3].parse().unwrap(), f[4].parse().unwrap())),
                expected: f[5].to_string(),
            }
        })
        .collect();
    assert!(!selected.is_empty(), "no {kind} cases in cases.tsv");
    selected
}

/// A C-order `.npy` (or gzipped `.npy.gz`) array: dtype, shape and raw little-endian data.
struct Npy {
    descr: String,
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn read_npy(name: &str) -> Npy {
    let mut bytes = fs::read(fixtures().join(name)).unwrap();
    if name.ends_with(".gz") {
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(&bytes[..]).read_to_end(&mut raw).unwrap();
        bytes = raw;
    }
    assert_eq!(&bytes[..6], b"\x93NUMPY", "{name}: not a .npy file");
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        _ => (u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize, 12),
    };
    let header = std::str::from_utf8(&bytes[start..start + header_len]).unwrap();
    assert!(header.contains("'fortran_order': False"), "{name}: Fortran order");
    let field = |key: &str| {
        let at = header.find(key).unwrap() + key.len();
        header[at..].trim_start_matches([':', ' ']).to_string()
    };
    let descr = field("'descr'").split('\'').nth(1).unwrap().to_string();
    let shape_text = field("'shape'");
    let shape = shape_text[1..shape_text.find(')').unwrap()]
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    Npy { descr, shape, data: bytes[start + header_len..].to_vec() }
}

impl Npy {
    fn u8(&self) -> &[u8] {
        assert_eq!(self.descr, "|u1");
        &self.data
    }

    fn f32_bits(&self) -> Vec<u32> {
        assert_eq!(self.descr, "<f4");
        self.data.chunks_exact(4).map(|b| u32::from_le_bytes(b.try_into().unwrap())).collect()
    }
}

fn first_mismatch<T: PartialEq + Copy>(got: &[T], want: &[T]) -> Option<(usize, T, T)> {
    got.iter().zip(want).enumerate().find(|(_, (g, w))| g != w).map(|(i, (&g, &w))| (i, g, w))
}

fn config(name: &str) -> ClipImageConfig {
    ClipImageConfig::from_file(&fixtures().join(name).join("preprocessor_config.json")).unwrap()
}

#[test]
fn saved_default_config_is_the_default() {
    assert_eq!(config("default"), ClipImageConfig::default());
}

#[test]
fn convert_to_rgb_matches_transformers() {
    for case in cases("convert") {
        let got =
            load_clip_image(&fixtures().join(&case.source), &ClipImageConfig::default(), &Limits::default()).unwrap();
        let want = read_npy(&case.expected);
        assert_eq!([got.height() as usize, got.width() as usize, 3], want.shape[..], "{}", case.source);
        assert_eq!(first_mismatch(got.as_raw(), want.u8()), None, "{}: (index, ours, transformers)", case.source);
    }
}

#[test]
fn bicubic_resize_matches_pillow() {
    let src = image::open(fixtures().join("bicubic_100x75.png")).unwrap().to_rgb8();
    // Pillow's RGB -> L: (19595 R + 38470 G + 7471 B + 0x8000) >> 16.
    let gray: Vec<u8> = src
        .pixels()
        .map(|p| ((u32::from(p[0]) * 19595 + u32::from(p[1]) * 38470 + u32::from(p[2]) * 7471 + 0x8000) >> 16) as u8)
        .collect();
    for case in cases("bicubic") {
        let (w, h) = case.size.unwrap();
        let (pixels, channels) = match case.config.as_str() {
            "RGB" => (src.as_raw().as_slice(), 3),
            _ => (gray.as_slice(), 1),
        };
        let got = resize(pixels, channels, src.width(), src.height(), w, h, Filter::Bicubic);
        assert_eq!(first_mismatch(&got, read_npy(&case.expected).u8()), None, "{}", case.expected);
    }
}

#[test]
fn pixel_values_match_clip_image_processor() {
    for case in cases("pixels") {
        let config = config(&case.config);
        let image = load_clip_image(&fixtures().join(&case.source), &config, &Limits::default()).unwrap();
        let got = clip_pixel_values(&image, &config).unwrap();
        let want = read_npy(&case.expected);
        assert_eq!(got.shape(), &want.shape[..], "{}", case.expected);
        let got: Vec<u32> = got.iter().map(|v| v.to_bits()).collect();
        let want = want.f32_bits();
        assert_eq!(
            first_mismatch(&got, &want).map(|(i, g, w)| (i, f32::from_bits(g), f32::from_bits(w))),
            None,
            "{} with config {}: (flat index, ours, transformers)",
            case.source,
            case.config
        );
    }
}
