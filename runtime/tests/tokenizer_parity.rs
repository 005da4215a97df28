//! Token ids equal transformers' `CLIPTokenizer(padding="max_length", max_length=77, truncation=True)`
//! on the real 49,408-token CLIP vocabulary, for prompts with punctuation, digits, unicode, odd
//! whitespace and more than 77 tokens (graphs/fixtures/tiny-*/tokenizer*.json), for every text
//! encoder of every tiny set: SD 1.x and SDXL's first tokenizer pad with <|endoftext|>, SD 2.x and
//! SDXL's second with "!" (id 0), which is then also a special token.

mod common;

use serde::Deserialize;
use t2i_rt::manifest::Manifest;
use t2i_rt::tokenizer::PromptTokenizer;

#[derive(Deserialize)]
struct Case {
    prompt: String,
    ids: Vec<i64>,
}

#[test]
fn ids_equal_transformers() {
    let mut pad_ids = Vec::new();
    for set in common::TINY_SETS {
        let manifest = Manifest::load(&common::tiny_set(set), true).unwrap();
        for encoder in &manifest.text_encoders {
            let spec = &encoder.tokenizer;
            let tokenizer = PromptTokenizer::for_set(&manifest, spec).unwrap();
            let fixture = format!("{}.json", encoder.name.replace("text_encoder", "tokenizer"));
            let text = std::fs::read_to_string(common::tiny_fixtures(set).join(fixture)).unwrap();
            let cases: Vec<Case> = serde_json::from_str(&text).unwrap();
            assert!(cases.len() >= 8, "too few tokenizer cases");
            assert!(
                cases.iter().any(|c| c.ids.iter().filter(|&&id| id == 49407).count() == 1),
                "a case must fill all 77 tokens (truncation)"
            );
            for case in &cases {
                assert_eq!(
                    tokenizer.encode(&case.prompt).unwrap(),
                    case.ids,
                    "{set} {}: prompt {:?}",
                    encoder.name,
                    case.prompt
                );
            }
            pad_ids.push(spec.pad_token_id);
        }
    }
    assert!(pad_ids.contains(&49407) && pad_ids.contains(&0), "both padding conventions are covered");
}

/// A tokenizer file (`.json` or `.json.gz`, as format 3 sets and checkpoints with another
/// tokenizer have) reads exactly as the builtin whose JSON it holds.
#[test]
fn a_tokenizer_file_encodes_as_its_builtin() {
    use std::io::Write;
    use t2i_rt::tokenizer::BuiltinTokenizer;

    let manifest = Manifest::load(&common::tiny_set("tiny-sd2"), false).unwrap();
    let spec = manifest.text_encoders[0].tokenizer.clone();
    assert_eq!(spec.builtin, Some(BuiltinTokenizer::OpenClip));
    let text = std::fs::read_to_string(common::tiny_fixtures("tiny-sd2").join("tokenizer.json")).unwrap();
    let cases: Vec<Case> = serde_json::from_str(&text).unwrap();
    let dir = std::env::temp_dir().join(format!("t2i-tokenizer-file-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = BuiltinTokenizer::OpenClip.json();
    std::fs::write(dir.join("tokenizer.json"), &json).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&json).unwrap();
    std::fs::write(dir.join("tokenizer.json.gz"), gz.finish().unwrap()).unwrap();
    for file in ["tokenizer.json", "tokenizer.json.gz"] {
        let tokenizer = PromptTokenizer::load(&dir.join(file), &spec).unwrap();
        for case in &cases {
            assert_eq!(tokenizer.encode(&case.prompt).unwrap(), case.ids, "{file}: prompt {:?}", case.prompt);
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
