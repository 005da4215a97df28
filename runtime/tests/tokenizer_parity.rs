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
            let tokenizer = PromptTokenizer::load(&manifest.resolve(&spec.file).unwrap(), spec).unwrap();
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
