//! Token ids equal transformers' `CLIPTokenizer(padding="max_length", max_length=77, truncation=True)`
//! on the real 49,408-token CLIP vocabulary, for prompts with punctuation, digits, unicode, odd
//! whitespace and more than 77 tokens (graphs/fixtures/tiny-sd1/tokenizer.json).

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
    let manifest = Manifest::load(&common::tiny_sd1(), true).unwrap();
    let tokenizer =
        PromptTokenizer::load(&manifest.resolve(&manifest.tokenizer.file).unwrap(), &manifest.tokenizer).unwrap();
    let text = std::fs::read_to_string(common::tiny_sd1_fixtures().join("tokenizer.json")).unwrap();
    let cases: Vec<Case> = serde_json::from_str(&text).unwrap();
    assert!(cases.len() >= 8, "too few tokenizer cases");
    assert!(
        cases.iter().any(|c| c.ids.iter().filter(|&&id| id == 49407).count() == 1),
        "a case must fill all 77 tokens (truncation)"
    );
    for case in &cases {
        assert_eq!(tokenizer.encode(&case.prompt).unwrap(), case.ids, "prompt {:?}", case.prompt);
    }
}
