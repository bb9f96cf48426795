//! Chat templates: turn a conversation into the prompt text a model was
//! instruction-tuned on.
//!
//! The template is the Jinja source in a checkpoint's `tokenizer_config.json`.
//! It is rendered with minijinja configured the way Hugging Face transformers
//! configures jinja2 in `apply_chat_template`, so the prompt is byte-identical
//! to what the Python reference feeds the model (a single stray space or
//! newline changes the token ids and therefore the output).

use std::path::Path;

use minijinja::{context, Environment, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::Error;

/// Name under which the template is stored in the private environment.
const TEMPLATE_NAME: &str = "chat_template";

/// One turn of a conversation (`role` is "system", "user" or "assistant").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// A compiled chat template plus the special tokens it may refer to.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

/// The fields of `tokenizer_config.json` that rendering needs.
#[derive(Deserialize)]
struct TokenizerConfig {
    chat_template: Option<String>,
    bos_token: Option<SpecialToken>,
    eos_token: Option<SpecialToken>,
}

/// transformers writes a special token either as a plain string or as a
/// serialized `AddedToken` object whose text is in `content`.
#[derive(Deserialize)]
#[serde(untagged)]
enum SpecialToken {
    Text(String),
    Added { content: String },
}

impl SpecialToken {
    fn into_content(self) -> String {
        match self {
            SpecialToken::Text(s) | SpecialToken::Added { content: s } => s,
        }
    }
}

impl ChatTemplate {
    /// Loads and compiles the `chat_template` of a Hugging Face
    /// `tokenizer_config.json`.
    pub fn from_tokenizer_config(path: &Path) -> Result<ChatTemplate, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let config: TokenizerConfig =
            serde_json::from_str(&text).map_err(|source| Error::Json {
                path: path.to_path_buf(),
                source,
            })?;
        let source = config.chat_template.ok_or_else(|| {
            Error::ChatTemplate(format!(
                "{} has no \"chat_template\" field (not an instruction-tuned checkpoint?)",
                path.display()
            ))
        })?;

        let mut env = Environment::new();
        // transformers renders with trim_blocks and lstrip_blocks on; both
        // templates rely on them to drop the newlines and indentation around
        // `{% %}` tags. keep_trailing_newline stays off (the jinja2 default,
        // and minijinja's), which drops the template file's final newline.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        // transformers provides this global so templates can reject
        // conversations they do not support (e.g. misordered roles).
        env.add_function("raise_exception", |message: String| -> Result<(), _> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
        });
        env.add_template_owned(TEMPLATE_NAME, source)
            .map_err(|e| Error::ChatTemplate(format!("{}: {e}", path.display())))?;

        Ok(ChatTemplate {
            env,
            bos_token: config.bos_token.map(SpecialToken::into_content),
            eos_token: config.eos_token.map(SpecialToken::into_content),
        })
    }

    /// Renders `messages` into prompt text. `add_generation_prompt` appends
    /// the header that opens the assistant's reply, for templates that honour
    /// it (LLaDA's always appends it).
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, Error> {
        let render_error = |e: minijinja::Error| Error::ChatTemplate(e.to_string());
        self.env
            .get_template(TEMPLATE_NAME)
            .map_err(render_error)?
            .render(context! {
                messages,
                add_generation_prompt,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
            })
            .map_err(render_error)
    }
}
