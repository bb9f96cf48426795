//! The embedding API: a loaded model bound to a device.

use crate::backend::Backend;
use crate::chat::Message;
use crate::cpu::CpuBackend;
use crate::decode::{self, DecodeOptions, Generation};
use crate::error::{Error, Result};
use crate::model::Model;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda,
}

/// A model loaded onto a device, ready to serve requests one at a time.
pub struct Engine {
    model: Model,
    backend: Box<dyn Backend>,
}

impl Engine {
    pub fn new(model: Model, device: Device) -> Result<Engine> {
        let backend: Box<dyn Backend> = match device {
            Device::Cpu => Box::new(CpuBackend::new(&model)?),
            Device::Cuda => Box::new(crate::cuda::CudaBackend::new(&model)?),
        };
        Ok(Engine { model, backend })
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn device_name(&self) -> String {
        self.backend.device_name()
    }

    pub fn generate(&mut self, prompt: &[u32], options: &DecodeOptions) -> Result<Generation> {
        self.generate_streaming(prompt, options, &mut |_| {})
    }

    /// Like [`Engine::generate`], handing each block's tokens to `on_block`
    /// as soon as the block is complete.
    pub fn generate_streaming(
        &mut self,
        prompt: &[u32],
        options: &DecodeOptions,
        on_block: &mut dyn FnMut(&[u32]),
    ) -> Result<Generation> {
        decode::generate(
            self.backend.as_mut(),
            &self.model.config,
            prompt,
            options,
            on_block,
        )
    }

    /// Token ids of `text`, wrapped as a single user turn of the model's chat
    /// template when `chat` is set.
    pub fn encode_prompt(&self, text: &str, chat: bool) -> Result<Vec<u32>> {
        let tokenizer = self.tokenizer()?;
        if !chat {
            return tokenizer.encode(text);
        }
        let template = self.model.chat_template.as_ref().ok_or_else(|| {
            Error::ChatTemplate(format!(
                "{} has no tokenizer_config.json with a chat_template",
                self.model.dir.display()
            ))
        })?;
        let rendered = template.render(
            &[Message {
                role: "user".into(),
                content: text.into(),
            }],
            true,
        )?;
        tokenizer.encode(&rendered)
    }

    /// Text of generated ids, special tokens (EOS padding, end of turn) dropped.
    pub fn decode_text(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer()?.decode(ids, true)
    }

    fn tokenizer(&self) -> Result<&crate::tokenizer::TextTokenizer> {
        self.model.tokenizer.as_deref().ok_or_else(|| {
            Error::Tokenizer(format!(
                "{} has no tokenizer.json: pass token ids instead of text",
                self.model.dir.display()
            ))
        })
    }
}
