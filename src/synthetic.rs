//! Synthetic models: random bf16 weights in a real checkpoint layout, made in
//! memory, so benchmarks run at real shapes with nothing downloaded.

use std::path::PathBuf;

use half::bf16;
use rayon::prelude::*;

use crate::checkpoint::{Checkpoint, Dtype};
use crate::config::{Family, ModelConfig, MoeConfig};
use crate::convert::{convert_tensor, WeightFormat};
use crate::error::{Error, Result};
use crate::model::{expected_tensors, is_quantizable, Model};

/// Named shapes for benchmarks.
pub const PRESETS: [&str; 4] = ["small", "llada-8b", "dream-7b", "llada2-mini"];

pub fn preset(name: &str) -> Result<ModelConfig> {
    let base = ModelConfig {
        family: Family::Llada,
        d_model: 1024,
        n_layers: 8,
        n_heads: 16,
        n_kv_heads: 16,
        head_dim: 64,
        ffn_hidden: 3072,
        vocab_size: 32768,
        rope_theta: 500000.0,
        rms_eps: 1e-5,
        max_seq_len: 4096,
        qkv_bias: false,
        partial_rotary_dim: None,
        qk_norm: false,
        moe: None,
        mask_id: Some(32000),
        eos_id: Some(32001),
    };
    Ok(match name {
        // d_model 1024, 8 layers: the CPU benchmark model of the README.
        "small" => base,
        "llada-8b" => ModelConfig {
            d_model: 4096,
            n_layers: 32,
            n_heads: 32,
            n_kv_heads: 32,
            head_dim: 128,
            ffn_hidden: 12288,
            vocab_size: 126464,
            mask_id: Some(126336),
            eos_id: Some(126081),
            ..base
        },
        "dream-7b" => ModelConfig {
            family: Family::Dream,
            d_model: 3584,
            n_layers: 28,
            n_heads: 28,
            n_kv_heads: 4,
            head_dim: 128,
            ffn_hidden: 18944,
            vocab_size: 152064,
            rope_theta: 1e6,
            rms_eps: 1e-6,
            qkv_bias: true,
            mask_id: Some(151666),
            eos_id: Some(151643),
            ..base
        },
        // LLaDA2.0-mini / LLaDA2.1-mini (LLADA2.md §1).
        "llada2-mini" => ModelConfig {
            family: Family::Llada2,
            d_model: 2048,
            n_layers: 20,
            n_heads: 16,
            n_kv_heads: 4,
            head_dim: 128,
            partial_rotary_dim: Some(64),
            ffn_hidden: 5120,
            vocab_size: 157184,
            rope_theta: 600000.0,
            rms_eps: 1e-6,
            max_seq_len: 16384,
            qk_norm: true,
            moe: Some(MoeConfig {
                first_dense_layers: 1,
                experts: 256,
                experts_per_token: 8,
                groups: 8,
                groups_per_token: 4,
                expert_hidden: 512,
                shared_experts: 1,
                routed_scaling: 2.5,
            }),
            mask_id: Some(156895),
            eos_id: Some(156892),
            ..base
        },
        other => {
            return Err(Error::invalid(format!(
                "unknown synthetic model {other:?}: expected one of {}",
                PRESETS.join(", ")
            )))
        }
    })
}

/// A model of `config`'s shapes with seeded random weights: norms are one,
/// matrices uniform with variance 1/fan_in so activations keep their scale.
pub fn model(config: ModelConfig, seed: u64) -> Model {
    model_in(config, seed, WeightFormat::BF16)
}

/// Like [`model`], the bf16 weights then converted to `format` one tensor
/// at a time, so that no copy of the whole model in another format exists
/// beside them (an 8B model is 16 GB in bf16).
///
/// Converting goes through two scratch buffers (the bf16 draw and its f32
/// widening) kept across tensors: a page fault costs microseconds on a
/// loaded VM, and fresh buffers for every matrix of an 8B model meant
/// faulting in 16 GB of bf16 and 32 GB of f32 temporaries (the widening
/// was also one thread).
pub fn model_in(config: ModelConfig, seed: u64, format: WeightFormat) -> Model {
    let mut drawn: Vec<u8> = Vec::new();
    let mut widened: Vec<f32> = Vec::new();
    let tensors = expected_tensors(&config)
        .into_iter()
        .enumerate()
        .flat_map(|(index, (name, shape))| {
            let len: usize = shape.iter().product();
            let seed = seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let ones = shape.len() == 1 && !name.ends_with(".bias");
            let fill = |bytes: &mut [u8]| {
                if ones {
                    for pair in bytes.chunks_exact_mut(2) {
                        pair.copy_from_slice(&bf16::ONE.to_le_bytes());
                    }
                } else {
                    let fan_in = *shape.last().unwrap() as f32;
                    random_bf16(bytes, (3.0 / fan_in).sqrt(), seed);
                }
            };
            if format == WeightFormat::BF16 {
                // The model keeps these bytes: drawn straight into them.
                let mut bytes = vec![0u8; 2 * len];
                fill(&mut bytes);
                return vec![(name, Dtype::BF16, shape, bytes)];
            }
            drawn.resize(2 * len, 0);
            fill(&mut drawn);
            widened.clear();
            widened.par_extend(
                drawn
                    .par_chunks_exact(2)
                    .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()),
            );
            let quantizable = is_quantizable(&config, &name, &shape);
            convert_tensor(name, shape, &widened, format, quantizable)
        })
        .collect();
    Model {
        dir: PathBuf::from("<synthetic>"),
        config,
        quantization: format.quantization(),
        checkpoint: Checkpoint::from_tensors(tensors),
        tokenizer: None,
        chat_template: None,
    }
}

/// Fills `out` with little-endian bf16 values uniform in [-bound, bound)
/// from SplitMix64, one stream per chunk of values so the result does not
/// depend on the thread count.
fn random_bf16(out: &mut [u8], bound: f32, seed: u64) {
    const CHUNK: usize = 1 << 16;
    out.par_chunks_mut(2 * CHUNK)
        .enumerate()
        .for_each(|(chunk, values)| {
            let mut state = seed ^ (chunk as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
            for v in values.chunks_exact_mut(2) {
                state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^= z >> 31;
                let unit = (z >> 40) as f32 / (1u64 << 24) as f32;
                v.copy_from_slice(&bf16::from_f32((2.0 * unit - 1.0) * bound).to_le_bytes());
            }
        });
}

/// Seeded random prompt ids below the special tokens.
pub fn random_prompt(len: usize, config: &ModelConfig, seed: u64) -> Vec<u32> {
    let limit = config
        .mask_id
        .unwrap_or(config.vocab_size as u32)
        .min(config.vocab_size as u32);
    let mut state = seed;
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) % limit as u64) as u32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_model_has_every_tensor_of_its_layout() {
        for name in PRESETS {
            let mut config = preset(name).unwrap();
            // Keep the test small: same layout, tiny sizes.
            config.n_layers = 2;
            config.d_model = config.n_heads * 4;
            config.head_dim = 4;
            config.ffn_hidden = 16;
            config.vocab_size = 64;
            config.mask_id = Some(60);
            let model = model(config, 7);
            let tensors = model.tensors().unwrap();
            let q = tensors.layers[0].q.to_f32();
            assert!(q.iter().any(|&v| v != 0.0) && q.iter().all(|v| v.abs() <= 0.5));
        }
        assert!(preset("gpt2").is_err());
    }

    #[test]
    fn llada2_mini_has_its_model_card_sizes() {
        // 16B parameters, about 1.4B active per token (embedding and head included).
        let config = preset("llada2-mini").unwrap();
        assert_eq!(config.parameter_count(), 16_255_643_392);
        assert_eq!(config.active_parameter_count(), 1_432_973_056);
    }

    #[test]
    fn random_prompt_stays_below_the_mask_id() {
        let config = preset("small").unwrap();
        let prompt = random_prompt(1000, &config, 1);
        assert!(prompt.iter().all(|&t| t < 32000));
        assert_ne!(prompt[0], prompt[1]);
    }
}
