//! `dllm info`: what a checkpoint is and what it needs.

use super::resources::{human_bytes, peak_rss_bytes};
use super::ModelArg;

pub fn run(arg: &ModelArg) -> anyhow::Result<()> {
    let dir = arg.resolve();
    let dir = dir.as_path();
    let model = arg.open()?;
    let c = &model.config;
    let params = c.parameter_count();
    let dtypes: Vec<&str> = model.checkpoint.dtypes().iter().map(|d| d.name()).collect();
    // Keys and values of every layer for one position, in bf16 on a GPU.
    let kv_per_position = 2 * c.n_layers * c.kv_dim() * 2;
    println!("model          {}", dir.display());
    println!(
        "architecture   {} ({} layers, d_model {}, {} heads / {} kv heads of {}, ffn {}, vocab {})",
        c.family.name(),
        c.n_layers,
        c.d_model,
        c.n_heads,
        c.n_kv_heads,
        c.head_dim,
        c.ffn_hidden,
        c.vocab_size
    );
    if let Some(moe) = &c.moe {
        println!(
            "experts        {} routed of width {} in {} groups, {} per token from {} groups, shared expert of width {}; layers {}..{} (the first {} dense)",
            moe.experts,
            moe.expert_hidden,
            moe.groups,
            moe.experts_per_token,
            moe.groups_per_token,
            moe.shared_hidden(),
            moe.first_dense_layers,
            c.n_layers,
            moe.first_dense_layers
        );
    }
    if c.rotary_dim() != c.head_dim || c.qk_norm {
        println!(
            "attention      RoPE on {} of {} dims per head{}",
            c.rotary_dim(),
            c.head_dim,
            if c.qk_norm { ", q/k RMSNorm" } else { "" }
        );
    }
    println!("max sequence   {}", c.max_seq_len);
    println!("parameters     {params} ({})", human_count(params));
    if c.moe.is_some() {
        let active = c.active_parameter_count();
        println!(
            "active/token   {active} ({}, embedding and head included)",
            human_count(active)
        );
    }
    println!(
        "stored dtypes  {} ({} on disk)",
        dtypes.join(", "),
        human_bytes(model.checkpoint.total_bytes())
    );
    let tensors = model.tensors()?;
    let streamed = tensors.streamed_bytes();
    println!(
        "weights        {} ({} read whole by every forward: projections, routers and head)",
        match model.quantization {
            Some(q) => format!("quantized, {}", q.name()),
            None => "float".into(),
        },
        human_bytes(streamed)
    );
    println!(
        "on a GPU       {} ({})",
        human_bytes(dllm::cuda::CudaBackend::weight_bytes(&model)? as u64),
        match model.quantization {
            Some(_) => "the CUDA backend keeps the quantized bytes and scales, with a bf16 scratch for its largest layer matrix",
            None => "the CUDA backend's bf16 matrices and f32 vectors",
        }
    );
    println!(
        "special ids    mask {}, eos {}",
        opt(c.mask_id),
        opt(c.eos_id)
    );
    println!(
        "tokenizer      {}",
        if model.tokenizer.is_some() {
            "tokenizer.json"
        } else {
            "none"
        }
    );
    println!(
        "chat template  {}",
        if model.chat_template.is_some() {
            "yes"
        } else {
            "none"
        }
    );
    // The CPU backend copies f32 matrices and computes from all others as
    // stored (memory-mapped); norms and biases are widened to f32.
    let f32_copies: u64 = tensors
        .layers
        .iter()
        .flat_map(|l| [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down])
        .chain([&tensors.embed, &tensors.head])
        .filter(|m| m.encoding == dllm::quant::Encoding::F32)
        .map(|m| m.stored_bytes())
        .sum();
    println!(
        "memory, cpu    {} of weights as stored (mapped){}",
        human_bytes(model.checkpoint.total_bytes()),
        if f32_copies > 0 {
            format!(" + {} of f32 matrices copied", human_bytes(f32_copies))
        } else {
            String::new()
        }
    );
    println!(
        "memory, cuda   {} of bf16 weights + {} of KV cache per 1k positions",
        human_bytes(params * 2),
        human_bytes(kv_per_position as u64 * 1024)
    );
    if let Some(peak) = peak_rss_bytes() {
        println!("peak RSS       {} (this command)", human_bytes(peak));
    }
    Ok(())
}

fn opt(id: Option<u32>) -> String {
    id.map_or("unset".into(), |i| i.to_string())
}

fn human_count(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2} B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1} M", n as f64 / 1e6),
        n => format!("{:.1} K", n as f64 / 1e3),
    }
}
