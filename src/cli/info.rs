//! `dllm info`: what a checkpoint is and what it needs.

use std::path::Path;

use dllm::Model;

pub fn run(dir: &Path) -> anyhow::Result<()> {
    let model = Model::open(dir)?;
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
    println!("memory, cpu    {} of f32 weights", human_bytes(params * 4));
    println!(
        "memory, cuda   {} of bf16 weights + {} of KV cache per 1k positions",
        human_bytes(params * 2),
        human_bytes(kv_per_position as u64 * 1024)
    );
    Ok(())
}

fn opt(id: Option<u32>) -> String {
    id.map_or("unset".into(), |i| i.to_string())
}

fn human_bytes(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < units.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", units[unit])
}

fn human_count(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2} B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1} M", n as f64 / 1e6),
        n => format!("{:.1} K", n as f64 / 1e3),
    }
}
