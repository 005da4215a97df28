//! Resource bounds: a request, or a file it names, that would exhaust memory or time is refused
//! up front with [`Error::LimitExceeded`], which names the `Limits` field to raise; a service sets
//! its own limits when it loads a model. Decompression bombs are refused from their header.

mod common;

use std::io::Write;
use std::path::PathBuf;

use t2i_rt::condition::{ConditionImage, ConditionKind};
use t2i_rt::{AdapterRequest, ConditionSource, Error, Limits, Manifest, Request};

fn limit_of(result: t2i_rt::Result<impl Sized>) -> &'static str {
    match result {
        Err(Error::LimitExceeded { limit, .. }) => limit,
        Err(other) => panic!("expected a limit error, got {other}"),
        Ok(_) => panic!("expected a limit error, got success"),
    }
}

/// A baseline JPEG header declaring 65535 × 65535 pixels, with no scan data.
fn jpeg_bomb() -> Vec<u8> {
    let mut jpeg = vec![0xff, 0xd8];
    // DQT, one table of ones.
    jpeg.extend([0xff, 0xdb, 0x00, 0x43, 0x00]);
    jpeg.extend([1u8; 64]);
    // SOF0: 8-bit, 65535 x 65535, one component.
    jpeg.extend([0xff, 0xc0, 0x00, 0x0b, 0x08, 0xff, 0xff, 0xff, 0xff, 0x01, 0x01, 0x11, 0x00]);
    // DHT: a DC and an AC table with one 1-bit code each (symbol 0).
    for class in [0x00, 0x10] {
        jpeg.extend([0xff, 0xc4, 0x00, 0x14, class, 1]);
        jpeg.extend([0u8; 15]);
        jpeg.push(0);
    }
    // SOS for the one component, then a few bytes of scan and the end.
    jpeg.extend([0xff, 0xda, 0x00, 0x08, 0x01, 0x01, 0x00, 0x00, 0x3f, 0x00, 0x00, 0x00]);
    jpeg.extend([0xff, 0xd9]);
    jpeg
}

#[test]
fn decompression_bombs_are_refused_from_their_header() {
    let limits = Limits::default();
    for kind in [ConditionKind::Gray, ConditionKind::Rgb] {
        let bomb = common::png_bomb(100_000, 100_000);
        assert!(bomb.len() < 100);
        let result = ConditionImage::decode(&bomb, kind, &limits);
        let message = result.as_ref().err().map(ToString::to_string).unwrap_or_default();
        assert_eq!(limit_of(result), "max_image_pixels");
        assert!(message.contains("100000x100000") && message.contains("downscale"), "{message}");
        assert_eq!(limit_of(ConditionImage::decode(&jpeg_bomb(), kind, &limits)), "max_image_pixels");
    }
    // Under the limit, the same lie is a truncated file, not an allocation of the declared size.
    let small_lie = common::png_bomb(4000, 4000);
    match ConditionImage::decode(&small_lie, ConditionKind::Gray, &limits) {
        Err(Error::Image { message, .. }) => assert!(message.contains("cannot decode PNG"), "{message}"),
        other => panic!("{other:?}"),
    }
}

fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("t2i-limits-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::File::create(&path).unwrap().write_all(bytes).unwrap();
    path
}

#[test]
fn files_are_read_within_their_limits() {
    let limits = Limits { max_image_file_bytes: 1000, max_npy_bytes: 1000, ..Limits::default() };
    let big = temp_file("big.png", &vec![0u8; 5000]);
    let result = ConditionImage::open_within(&big, ConditionKind::Gray, &limits);
    assert!(matches!(result, Err(Error::LimitExceeded { value: 5000, max: 1000, .. })), "{:?}", result.err());
    // A device that never ends is read no further than the limit.
    let zero = std::path::Path::new("/dev/zero");
    if zero.exists() {
        assert_eq!(limit_of(ConditionImage::open_within(zero, ConditionKind::Gray, &limits)), "max_image_file_bytes");
        assert_eq!(limit_of(t2i_rt::npy::read_latents(zero, &limits)), "max_npy_bytes");
    }
    let npy = temp_file("big.npy", &vec![0u8; 5000]);
    assert_eq!(limit_of(t2i_rt::npy::read_latents(&npy, &limits)), "max_npy_bytes");
    let _ = std::fs::remove_dir_all(big.parent().unwrap());
}

#[test]
fn requests_are_checked_against_the_limits_before_anything_runs() {
    let manifest = Manifest::load(&common::tiny_sd1(), false).unwrap();
    let limits = Limits::default();
    let check = |edit: &dyn Fn(&mut Request), limits: &Limits| {
        let mut r = Request::new("a red square");
        r.steps = 2;
        edit(&mut r);
        r.check(&manifest, limits).map(|_| ())
    };
    type Edit<'a> = &'a dyn Fn(&mut Request);
    let cases: [(&str, Edit); 8] = [
        ("max_steps", &|r| r.steps = 1_000_000_000),
        ("max_samples", &|r| r.n_samples = 1_000_000),
        ("max_pixels", &|r| (r.width, r.height) = (Some(4096), Some(4096))),
        ("max_side", &|r| (r.width, r.height) = (Some(1 << 30), Some(64))),
        ("max_batch_pixels", &|r| ((r.width, r.height), r.n_samples) = ((Some(2048), Some(2048)), 8)),
        ("max_prompt_bytes", &|r| r.prompt = "a".repeat(100_000)),
        ("max_prompt_bytes", &|r| r.negative_prompt = Some("b".repeat(100_000))),
        ("max_adapters", &|r| {
            let pixels = ConditionImage::from_pixels(1, 1, ConditionKind::Gray, vec![0]).unwrap();
            let adapter = AdapterRequest {
                name: "sketch".into(),
                image: ConditionSource::Pixels(pixels),
                weight: 1.0,
                preprocess: Vec::new(),
            };
            r.adapters = vec![adapter; 100];
        }),
    ];
    for (limit, edit) in cases {
        assert_eq!(limit_of(check(edit, &limits)), limit);
    }
    // A service raises what it needs: 4096² is then accepted (nothing runs here).
    let large = Limits { max_pixels: 4096 * 4096, max_batch_pixels: 4096 * 4096, ..Limits::default() };
    check(&|r| (r.width, r.height) = (Some(4096), Some(4096)), &large).unwrap();
    // And a tighter one is enforced.
    let tight = Limits { max_steps: 10, ..Limits::default() };
    assert_eq!(limit_of(check(&|r| r.steps = 11, &tight)), "max_steps");
}

#[test]
fn manifest_sizes_are_bounded() {
    let text = std::fs::read_to_string(common::tiny_sd1().join("manifest.json")).unwrap();
    let dir = common::tiny_sd1();
    assert!(Manifest::parse(&text, &dir).is_ok());
    for (from, to, expect) in [
        (
            "\"channels\": 4,\n    \"downscale\": 8",
            "\"channels\": 4000000000,\n    \"downscale\": 8",
            "latent.channels",
        ),
        ("\"max_length\": 77", "\"max_length\": 100000000", "tokenizer.max_length"),
        ("\"size_multiple\": 64", "\"size_multiple\": 0", "size_multiple"),
    ] {
        assert!(text.contains(from), "{from} not in the tiny manifest");
        let message = Manifest::parse(&text.replace(from, to), &dir).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains(expect), "{expect}: {message:?}");
    }
    let mut value: serde_json::Value = serde_json::from_str(&text).unwrap();
    value["scheduler"]["num_train_timesteps"] = 10_000_000_000i64.into();
    let m = Manifest::parse(&value.to_string(), &dir).unwrap();
    let mut r = Request::new("x");
    r.steps = 2;
    match r.check(&m, &Limits::default()) {
        Err(Error::Scheduler { message, .. }) => assert!(message.contains("num_train_timesteps"), "{message}"),
        other => panic!("{:?}", other.map(|_| ())),
    }
}
