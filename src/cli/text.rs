//! Generated ids as text, block by block, shared by `dllm generate` (which
//! prints each block as it completes) and `dllm serve` (which streams it).

use std::sync::Arc;

use dllm::tokenizer::TextTokenizer;

/// Text of `ids`: decoded by the model's tokenizer, special tokens dropped
/// when `skip_special`; without a tokenizer the ids themselves, each
/// followed by a space.
pub fn text_of(
    tokenizer: Option<&TextTokenizer>,
    ids: &[u32],
    skip_special: bool,
) -> dllm::Result<String> {
    match tokenizer {
        Some(tokenizer) => tokenizer.decode(ids, skip_special),
        None => Ok(ids.iter().map(|t| format!("{t} ")).collect()),
    }
}

/// The text of a generation growing block by block. Each block decodes all
/// the ids so far and hands out what is new, so that a character split
/// across blocks decodes whole.
pub struct IncrementalText {
    tokenizer: Option<Arc<TextTokenizer>>,
    ids: Vec<u32>,
    text: String,
}

impl IncrementalText {
    pub fn new(tokenizer: Option<Arc<TextTokenizer>>) -> IncrementalText {
        IncrementalText {
            tokenizer,
            ids: Vec::new(),
            text: String::new(),
        }
    }

    /// Appends a block's ids and returns the text they add (the whole text
    /// again in the rare case that decoding more ids changed earlier text).
    pub fn push(&mut self, ids: &[u32]) -> dllm::Result<String> {
        self.ids.extend_from_slice(ids);
        let text = text_of(self.tokenizer.as_deref(), &self.ids, true)?;
        let new = text
            .strip_prefix(self.text.as_str())
            .unwrap_or(&text)
            .to_string();
        self.text = text;
        Ok(new)
    }
}
