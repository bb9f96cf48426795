//! Text <-> token ids, through a Hugging Face `tokenizer.json`.
//!
//! A thin wrapper over the `tokenizers` crate so the rest of the runtime sees
//! only `crate::Error` and plain `u32` ids.

use std::path::Path;

use crate::Error;

/// A loaded `tokenizer.json`.
#[derive(Debug)]
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
}

impl TextTokenizer {
    /// Loads a `tokenizer.json`.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::Tokenizer(format!("cannot load {}: {e}", path.display())))?;
        Ok(TextTokenizer { inner })
    }

    /// Encodes `text` without adding special tokens: prompts come from the
    /// chat template, which already spells out every special token it wants
    /// (transformers' `add_special_tokens=False`). Special tokens written in
    /// the text, such as `<|im_start|>`, still map to their single ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, Error> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(format!("cannot encode text: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Decodes ids to text; `skip_special` drops special tokens (mask,
    /// end-of-text, chat markers) from the output.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, Error> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| Error::Tokenizer(format!("cannot decode ids: {e}")))
    }

    /// Number of tokens the tokenizer knows, added tokens included. The
    /// model's embedding table is usually padded beyond this, so this is not
    /// the logits width.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token given by its exact text (e.g. `"<|mask|>"`).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}
