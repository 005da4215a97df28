//! Image I/O parity with Pillow and diffusers.
//!
//! Fixtures come from `python -m t2i_export.image_fixtures --out ../graphs/fixtures/image` (run in
//! `export/`); `cases.tsv` lists the checks. Tolerances: none, everything is bit-exact, except JPEG
//! decoding (the `image` crate's zune-jpeg against Pillow's libjpeg-turbo), which is bounded and
//! reported; the resize after a JPEG decode is checked bit-exact on Pillow's decoded pixels.

use std::fs;
use std::path::{Path, PathBuf};

use image::RgbImage;
use ndarray::{Array4, ArrayView4};
use t2i_rt::condition::{load_condition, ConditionImage, ConditionKind};
use t2i_rt::output::{decoder_output_to_images, grid, write_png};
use t2i_rt::resample::resize_lanczos;
use t2i_rt::Error;

fn fixtures() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../graphs/fixtures/image");
    assert!(
        dir.join("cases.tsv").is_file(),
        "missing {}: in export/, run \
         `python -m t2i_export.image_fixtures --out ../graphs/fixtures/image`",
        dir.display()
    );
    dir
}

/// One row of `cases.tsv`.
struct Case {
    kind: String,
    source: String,
    mode: ConditionKind,
    size: Option<(u32, u32)>,
    expected: String,
}

fn cases(kind: &str) -> Vec<Case> {
    let text = fs::read_to_string(fixtures().join("cases.tsv")).unwrap();
    let all: Vec<Case> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            assert_eq!(f.len(), 6, "bad cases.tsv line {l:?}");
            Case {
                kind: f[0].to_string(),
                source: f[1].to_string(),
                mode: match f[2] {
                    "L" => ConditionKind::Gray,
                    _ => ConditionKind::Rgb,
                },
                size: (f[3] != "-").then(|| (f[3].parse().unwrap(), f[4].parse().unwrap())),
                expected: f[5].to_string(),
            }
        })
        .collect();
    let selected: Vec<Case> = all.into_iter().filter(|c| c.kind == kind).collect();
    assert!(!selected.is_empty(), "no {kind} cases in cases.tsv");
    selected
}

/// A C-order `.npy` array: shape and raw little-endian data.
struct Npy {
    descr: String,
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn read_npy(name: &str) -> Npy {
    let bytes = fs::read(fixtures().join(name)).unwrap();
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

    fn f32(&self) -> Vec<f32> {
        assert_eq!(self.descr, "<f4");
        self.data.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
    }

    /// (height, width) of an HWC or HW image.
    fn hw(&self) -> (u32, u32) {
        (self.shape[0] as u32, self.shape[1] as u32)
    }
}

/// Index and values of the first mismatch, for readable failures.
fn first_mismatch(got: &[u8], want: &[u8]) -> Option<(usize, u8, u8)> {
    got.iter().zip(want).enumerate().find(|(_, (g, w))| g != w).map(|(i, (&g, &w))| (i, g, w))
}

#[test]
fn convert_matches_pillow() {
    for case in cases("convert") {
        let want = read_npy(&case.expected);
        let got = ConditionImage::open(&fixtures().join(&case.source), case.mode).unwrap();
        assert_eq!((got.height(), got.width()), want.hw(), "{}", case.expected);
        assert_eq!(
            first_mismatch(got.pixels(), want.u8()),
            None,
            "{} as {:?}: (index, ours, Pillow)",
            case.source,
            case.mode
        );
    }
}

#[test]
fn lanczos_resize_matches_pillow() {
    for case in cases("resize") {
        let (w, h) = case.size.unwrap();
        let want = read_npy(&case.expected);
        let src = ConditionImage::open(&fixtures().join(&case.source), case.mode).unwrap();
        let got = src.resized(w, h);
        assert_eq!((got.height(), got.width()), want.hw());
        assert_eq!(first_mismatch(got.pixels(), want.u8()), None, "{}", case.expected);
    }
}

#[test]
fn lanczos_resize_of_pillow_decoded_jpeg_matches_pillow() {
    for case in cases("resize_pixels") {
        let (w, h) = case.size.unwrap();
        let src = read_npy(&case.source);
        let (sh, sw) = src.hw();
        let got = resize_lanczos(src.u8(), case.mode.channels(), sw, sh, w, h);
        assert_eq!(first_mismatch(&got, read_npy(&case.expected).u8()), None, "{}", case.expected);
    }
}

#[test]
fn adapter_tensor_matches_diffusers() {
    for case in cases("tensor") {
        let (w, h) = case.size.unwrap();
        let want = read_npy(&case.expected);
        let got = load_condition(&fixtures().join(&case.source), case.mode, w, h).unwrap();
        assert_eq!(got.shape(), &want.shape[..], "{}", case.expected);
        let got: Vec<u32> = got.iter().map(|v| v.to_bits()).collect();
        let want: Vec<u32> = want.f32().iter().map(|v| v.to_bits()).collect();
        assert!(got == want, "{}: tensor differs from _preprocess_adapter_image", case.expected);
    }
}

/// zune-jpeg (the `image` crate) and libjpeg-turbo (Pillow) are different decoders, so decoded
/// samples are not bit-exact: the IDCTs round differently (off by 1 here and there, also in
/// grayscale and 4:4:4 files) and the 4:2:0 chroma upsampling differs (up to ~13 levels at sharp
/// saturated colour edges in these fixtures). The bounds catch a broken decode or colour conversion
/// (channel swap, wrong YCbCr matrix), not rounding; `--nocapture` prints what was measured.
#[test]
fn jpeg_decode_is_close_to_pillow() {
    for case in cases("jpeg_decode") {
        let want = read_npy(&case.expected);
        let got = ConditionImage::open(&fixtures().join(&case.source), case.mode).unwrap();
        assert_eq!((got.height(), got.width()), want.hw());
        let diffs: Vec<u8> = got.pixels().iter().zip(want.u8()).map(|(a, b)| a.abs_diff(*b)).collect();
        let max = diffs.iter().copied().max().unwrap_or(0);
        let mean = diffs.iter().map(|&d| f64::from(d)).sum::<f64>() / diffs.len() as f64;
        let differing = diffs.iter().filter(|&&d| d != 0).count();
        println!(
            "{} as {}: {differing}/{} samples differ from Pillow, max |diff| {max}, \
             mean |diff| {mean:.3}",
            case.source,
            case.mode.pil_mode(),
            diffs.len()
        );
        assert!(max <= JPEG_MAX_DIFF && mean <= JPEG_MAX_MEAN_DIFF, "{}: decode too far from Pillow", case.source);
    }
}

/// Largest per-sample difference from Pillow's JPEG decode allowed (measured: 13, 4:2:0 RGB).
const JPEG_MAX_DIFF: u8 = 20;
/// Largest mean per-sample difference allowed (measured: below 0.5 for every fixture).
const JPEG_MAX_MEAN_DIFF: f64 = 1.0;

#[test]
fn output_rounding_matches_diffusers() {
    let case = cases("output").remove(0);
    let x = read_npy(&case.source);
    let shape: [usize; 4] = x.shape.clone().try_into().unwrap();
    let x = Array4::from_shape_vec(shape, x.f32()).unwrap();
    let want = read_npy(&case.expected);
    let images = decoder_output_to_images(x.view()).unwrap();
    assert_eq!(images.len(), shape[0]);
    let got: Vec<u8> = images.iter().flat_map(|im| im.as_raw().iter().copied()).collect();
    assert_eq!(first_mismatch(&got, want.u8()), None, "(flat NHWC index, ours, diffusers)");
}

// ---------------------------------------------------------------------------------------------
// Errors and file handling.

/// A fresh directory under the system temp dir, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("t2i_image_parity_{}_{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn entries(&self) -> Vec<String> {
        let mut names: Vec<String> =
            fs::read_dir(&self.0).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[test]
fn missing_file_is_an_io_error_naming_it() {
    let path = Path::new("/nonexistent/dir/cond.png");
    let err = load_condition(path, ConditionKind::Rgb, 64, 64).unwrap_err();
    assert!(matches!(&err, Error::Io { path: p, .. } if p.as_path() == path), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("/nonexistent/dir/cond.png") && msg.contains("not found"), "{msg}");
}

#[test]
fn non_images_are_rejected_with_the_reason() {
    let dir = Scratch::new("not_image");
    let text = dir.0.join("notes.png");
    fs::write(&text, "this is not an image\n").unwrap();
    let gif = dir.0.join("anim.gif");
    fs::write(&gif, b"GIF89a\x01\x00\x01\x00\x00\x00\x00;").unwrap();
    let truncated = dir.0.join("truncated.png");
    let png = fs::read(fixtures().join("rgb.png")).unwrap();
    fs::write(&truncated, &png[..png.len() / 2]).unwrap();

    for (path, needle) in [(&text, "not a PNG or JPEG"), (&gif, "not supported"), (&truncated, "cannot decode PNG")] {
        let err = ConditionImage::open(path, ConditionKind::Gray).unwrap_err();
        assert!(matches!(&err, Error::Image { path: p, .. } if p.as_path() == path.as_path()), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(needle) && msg.contains(&*path.to_string_lossy()), "{msg}");
    }
    let err = load_condition(&fixtures().join("rgb.png"), ConditionKind::Rgb, 0, 64).unwrap_err();
    assert!(matches!(err, Error::InvalidRequest { .. }), "{err:?}");
}

fn sample_image() -> RgbImage {
    RgbImage::from_fn(13, 7, |x, y| image::Rgb([(x * 19) as u8, (y * 37) as u8, (x * y) as u8]))
}

#[test]
fn write_png_round_trips_and_replaces() {
    let dir = Scratch::new("write_ok");
    let path = dir.0.join("out.png");
    fs::write(&path, "old content").unwrap();
    let img = sample_image();
    write_png(&path, &img).unwrap();
    assert_eq!(image::open(&path).unwrap().to_rgb8(), img);
    assert_eq!(dir.entries(), ["out.png"], "no temporary file left");
}

#[test]
fn write_png_does_not_create_directories() {
    let dir = Scratch::new("write_nodir");
    let path = dir.0.join("missing").join("out.png");
    let err = write_png(&path, &sample_image()).unwrap_err();
    assert!(matches!(&err, Error::Io { path: p, .. } if p.as_path() == path.as_path()), "{err:?}");
    assert!(err.to_string().contains("does not exist"), "{err}");
    assert!(dir.entries().is_empty());
}

#[test]
fn failed_write_png_leaves_nothing_behind() {
    // The target is a non-empty directory: encoding succeeds, the final rename fails.
    let dir = Scratch::new("write_fail");
    let target = dir.0.join("taken.png");
    fs::create_dir(&target).unwrap();
    fs::write(target.join("keep"), "x").unwrap();
    let err = write_png(&target, &sample_image()).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert_eq!(dir.entries(), ["taken.png"], "temporary file must be removed");
    assert!(target.join("keep").is_file());
}

#[test]
fn grid_tiles_row_major() {
    let a = RgbImage::from_pixel(3, 2, image::Rgb([10, 0, 0]));
    let b = RgbImage::from_pixel(3, 2, image::Rgb([0, 20, 0]));
    let c = RgbImage::from_pixel(3, 2, image::Rgb([0, 0, 30]));
    let g = grid(&[a.clone(), b, c], 2);
    assert_eq!(g.dimensions(), (6, 4));
    assert_eq!(g.get_pixel(0, 0).0, [10, 0, 0]);
    assert_eq!(g.get_pixel(3, 1).0, [0, 20, 0]);
    assert_eq!(g.get_pixel(2, 3).0, [0, 0, 30]);
    assert_eq!(g.get_pixel(5, 3).0, [0, 0, 0]);
    assert_eq!(grid(std::slice::from_ref(&a), 0), a, "columns clamp to at least 1");
    let x = Array4::<f32>::zeros((0, 3, 4, 4));
    let empty: ArrayView4<f32> = x.view();
    assert!(decoder_output_to_images(empty).unwrap().is_empty());
}
