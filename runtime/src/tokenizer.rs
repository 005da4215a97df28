//! Prompt tokenization with the checkpoint's own tokenizer (`tokenizer.json`, HF `tokenizers`
//! format, or `tokenizer.json.gz`), padded and truncated like diffusers:
//! `padding="max_length", truncation=True`.

use std::io::Read;
use std::path::Path;

use tokenizers::{
    PaddingDirection, PaddingParams, PaddingStrategy, TruncationDirection, TruncationParams, TruncationStrategy,
};

use crate::error::{Error, Result};
use crate::manifest::TokenizerSpec;

/// Largest tokenizer file, unpacked, the runtime reads (CLIP's is 1.7 MB).
const MAX_TOKENIZER_BYTES: u64 = 64 << 20;

/// The tokenizer JSON at `path`, gunzipped when the name ends in `.gz`, at most
/// [`MAX_TOKENIZER_BYTES`] either way.
fn read_tokenizer(path: &Path) -> Result<Vec<u8>> {
    let error = |e: std::io::Error| Error::Tokenizer(format!("cannot read {}: {e}", path.display()));
    let file = std::fs::File::open(path).map_err(error)?;
    let mut reader: Box<dyn Read> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::GzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let mut bytes = Vec::new();
    reader.by_ref().take(MAX_TOKENIZER_BYTES + 1).read_to_end(&mut bytes).map_err(error)?;
    if bytes.len() as u64 > MAX_TOKENIZER_BYTES {
        return Err(Error::Tokenizer(format!(
            "{} unpacks to more than {MAX_TOKENIZER_BYTES} bytes; a tokenizer is a few megabytes, re-export the graph set",
            path.display()
        )));
    }
    Ok(bytes)
}

/// Turns prompts into fixed-length token id rows.
pub struct PromptTokenizer {
    inner: tokenizers::Tokenizer,
    max_length: usize,
}

impl PromptTokenizer {
    /// Loads `path` and configures padding to `spec.max_length` with `spec.pad_token_id`, and
    /// truncation that keeps the special tokens (BOS + first tokens + EOS), as transformers does.
    pub fn load(path: &Path, spec: &TokenizerSpec) -> Result<Self> {
        let bytes = read_tokenizer(path)?;
        let mut inner = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| Error::Tokenizer(format!("cannot load {}: {e}; re-export the graph set", path.display())))?;
        let pad_token = inner.id_to_token(spec.pad_token_id).ok_or_else(|| {
            Error::Tokenizer(format!("pad_token_id {} is not in {}'s vocabulary", spec.pad_token_id, path.display()))
        })?;
        inner
            .with_truncation(Some(TruncationParams {
                max_length: spec.max_length,
                strategy: TruncationStrategy::LongestFirst,
                direction: TruncationDirection::Right,
                stride: 0,
            }))
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        inner.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(spec.max_length),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id: spec.pad_token_id,
            pad_type_id: 0,
            pad_token,
        }));
        Ok(PromptTokenizer { inner, max_length: spec.max_length })
    }

    /// Token ids of `prompt`: exactly `max_length` of them, special tokens included.
    pub fn encode(&self, prompt: &str) -> Result<Vec<i64>> {
        let encoding =
            self.inner.encode(prompt, true).map_err(|e| Error::Tokenizer(format!("cannot encode {prompt:?}: {e}")))?;
        let ids: Vec<i64> = encoding.get_ids().iter().map(|&id| i64::from(id)).collect();
        if ids.len() != self.max_length {
            return Err(Error::Tokenizer(format!("encoded {} ids, expected {}", ids.len(), self.max_length)));
        }
        Ok(ids)
    }

    /// The fixed sequence length.
    pub fn max_length(&self) -> usize {
        self.max_length
    }
}
