//! Prompt tokenization with the checkpoint's own tokenizer, padded and truncated like diffusers:
//! `padding="max_length", truncation=True`. The tokenizer is a file of the graph set
//! (`tokenizer.json`, HF `tokenizers` format, or `tokenizer.json.gz`) or, for the CLIP tokenizers
//! every Stable Diffusion checkpoint uses, one built into the runtime ([`BuiltinTokenizer`]), so
//! that graph sets do not each carry the same 1.7 MB vocabulary.

use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tokenizers::{
    PaddingDirection, PaddingParams, PaddingStrategy, TruncationDirection, TruncationParams, TruncationStrategy,
};

use crate::error::{Error, Result};
use crate::manifest::{Manifest, TokenizerSource, TokenizerSpec};

/// Largest tokenizer file, unpacked, the runtime reads (CLIP's is 1.7 MB).
const MAX_TOKENIZER_BYTES: u64 = 64 << 20;

/// The CLIP BPE tokenizer (OpenAI's 49,408-token vocabulary, the one in the open_clip wheel) as the
/// exporter serialises transformers' `CLIPTokenizer` backend: padding and truncation off, gzipped.
const CLIP_TOKENIZER_GZ: &[u8] = include_bytes!("../assets/clip-tokenizer.json.gz");

/// What the OpenCLIP variant adds to [`CLIP_TOKENIZER_GZ`]'s JSON: "!" (id 0) as a special token,
/// inserted first in `added_tokens`, exactly where transformers puts it.
const OPENCLIP_PAD_TOKEN: &str =
    r#"{"id":0,"content":"!","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true},"#;

/// A tokenizer built into the runtime, named by a manifest instead of a file (format 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BuiltinTokenizer {
    /// The CLIP tokenizer of SD 1.x's `tokenizer/` and SDXL's first (`openai/clip-vit-large-patch14`).
    #[serde(rename = "clip")]
    Clip,
    /// The same vocabulary with "!" (id 0) registered as a special token, as in SD 2.x's
    /// `tokenizer/` and SDXL's `tokenizer_2/` (OpenCLIP ViT-H and bigG pad with it).
    #[serde(rename = "openclip")]
    OpenClip,
}

impl BuiltinTokenizer {
    pub fn as_str(self) -> &'static str {
        match self {
            BuiltinTokenizer::Clip => "clip",
            BuiltinTokenizer::OpenClip => "openclip",
        }
    }

    /// SHA-256 of the tokenizer JSON text this builtin stands for, as the exporter writes it (before
    /// gzip): the manifest records it and the runtime refuses a set whose builtin is another one.
    pub fn json_sha256(self) -> &'static str {
        match self {
            BuiltinTokenizer::Clip => "061c0fc253b8b858696ce64e5d3c984b1db7f26fdace336d3e2d0345d4c234fc",
            BuiltinTokenizer::OpenClip => "87d34ee065ca32dc5b0711dd219f8f04b7a9927ce49d7b851a8145ed636ace2a",
        }
    }

    /// The tokenizer JSON text, byte for byte the file the exporter would have written.
    pub fn json(self) -> Vec<u8> {
        let mut text = Vec::new();
        flate2::read::GzDecoder::new(CLIP_TOKENIZER_GZ)
            .read_to_end(&mut text)
            .expect("the built-in CLIP tokenizer is valid gzip (checked by the unit tests)");
        if self == BuiltinTokenizer::OpenClip {
            let marker = br#""added_tokens":["#;
            let at = text
                .windows(marker.len())
                .position(|w| w == marker)
                .expect("the built-in CLIP tokenizer has added_tokens (checked by the unit tests)")
                + marker.len();
            text.splice(at..at, OPENCLIP_PAD_TOKEN.bytes());
        }
        text
    }
}

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
    /// Loads the tokenizer file at `path` and configures padding to `spec.max_length` with
    /// `spec.pad_token_id`, and truncation that keeps the special tokens (BOS + first tokens +
    /// EOS), as transformers does.
    pub fn load(path: &Path, spec: &TokenizerSpec) -> Result<Self> {
        Self::from_json(&read_tokenizer(path)?, &path.display().to_string(), spec)
    }

    /// The tokenizer `spec` (one of `manifest`'s) names: a file of the graph set or a builtin.
    pub fn for_set(manifest: &Manifest, spec: &TokenizerSpec) -> Result<Self> {
        match spec.source().map_err(|why| Error::Tokenizer(format!("a tokenizer entry {why}")))? {
            TokenizerSource::Builtin(builtin) => Self::builtin(builtin, spec),
            TokenizerSource::File(file) => Self::load(&manifest.resolve(file)?, spec),
        }
    }

    /// The built-in tokenizer `builtin`, configured as [`load`](Self::load) does.
    pub fn builtin(builtin: BuiltinTokenizer, spec: &TokenizerSpec) -> Result<Self> {
        Self::from_json(&builtin.json(), &format!("the built-in {} tokenizer", builtin.as_str()), spec)
    }

    fn from_json(bytes: &[u8], source: &str, spec: &TokenizerSpec) -> Result<Self> {
        let mut inner = tokenizers::Tokenizer::from_bytes(bytes)
            .map_err(|e| Error::Tokenizer(format!("cannot load {source}: {e}; re-export the graph set")))?;
        let pad_token = inner.id_to_token(spec.pad_token_id).ok_or_else(|| {
            Error::Tokenizer(format!("pad_token_id {} is not in {source}'s vocabulary", spec.pad_token_id))
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

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    fn sha256_hex(bytes: &[u8]) -> String {
        Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The built-in JSON texts are, byte for byte, the files the exporter writes for CLIP and
    /// OpenCLIP checkpoints (export/t2i_export/tokenizer.py holds the same digests).
    #[test]
    fn builtin_json_is_the_exported_text() {
        for builtin in [BuiltinTokenizer::Clip, BuiltinTokenizer::OpenClip] {
            assert_eq!(sha256_hex(&builtin.json()), builtin.json_sha256(), "{}", builtin.as_str());
        }
    }

    /// "!" is one special token in OpenCLIP's tokenizer and an ordinary byte-level BPE piece in CLIP's.
    #[test]
    fn openclip_splits_on_its_pad_token() {
        let spec = |pad| TokenizerSpec { file: None, sha256: None, builtin: None, max_length: 8, pad_token_id: pad };
        let clip = PromptTokenizer::builtin(BuiltinTokenizer::Clip, &spec(49407)).unwrap();
        let openclip = PromptTokenizer::builtin(BuiltinTokenizer::OpenClip, &spec(0)).unwrap();
        let ids = |t: &PromptTokenizer| t.encode("wow!!").unwrap();
        assert_ne!(ids(&clip), ids(&openclip));
        assert_eq!(&ids(&openclip)[..5], &[49406, 2781, 0, 0, 49407]);
        assert_eq!(ids(&clip)[5..], [49407; 3]);
        assert_eq!(ids(&openclip)[5..], [0; 3]);
    }
}
