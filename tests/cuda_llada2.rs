//! LLaDA2 (`llada2_moe`) on the CUDA backend (the emulated device where
//! there is no GPU): QK-norm and partial RoPE in kv_update, the router and
//! the routed experts grouped by expert (src/cuda/moe.rs), on the golden
//! tiny model's bf16 checkpoint.
//!
//! What is asserted: one forward's logits against the CPU backend rounding
//! to bf16 where the device does; every robust golden case of both samplers
//! decoding to completion; graphs replaying MoE steps to the same tokens;
//! and requests batched by the engine, arriving at different steps, giving
//! exactly what they give alone. What is only printed: how many cases come
//! out as on the CPU backend. The model's random weights are chaotic: a
//! rounding difference in a near-tie changes a decision, and everything
//! after it (tests/cuda.rs's header).

mod common;

use std::sync::OnceLock;

use common::{block_logits, golden_dir, logits_error, robust_cases, Case};
use dllm::backend::Backend;
use dllm::cpu::{CpuBackend, Rounding};
use dllm::cuda::{CudaBackend, Driver, Gpu};
use dllm::{synthetic, DecodeOptions, Engine, EngineOptions, Event, Model};

fn bf16_model() -> Model {
    Model::open(&golden_dir("llada2_tiny_s1").join("bf16")).unwrap()
}

fn cuda(model: &Model) -> dllm::Result<CudaBackend> {
    static DRIVER: OnceLock<Driver> = OnceLock::new();
    let driver = *DRIVER.get_or_init(|| Driver::for_tests().unwrap());
    CudaBackend::on(Gpu::open(driver)?, model)
}

/// A well-conditioned LLaDA2 for synthetic::model (random bf16 weights of
/// variance 1/fan_in: activations keep unit scale) with the real head and
/// expert layout at small width: 256 wide, 4 heads of 64 over 2 key/value
/// heads rotating 32 dims, one dense layer and two MoE layers of 16 experts
/// in 4 groups, top 4 of the best 2 groups.
fn synthetic_config() -> dllm::ModelConfig {
    let mini = synthetic::preset("llada2-mini").unwrap();
    dllm::ModelConfig {
        d_model: 256,
        n_layers: 3,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 64,
        partial_rotary_dim: Some(32),
        ffn_hidden: 512,
        vocab_size: 512,
        mask_id: Some(510),
        eos_id: Some(511),
        moe: Some(dllm::MoeConfig {
            experts: 16,
            experts_per_token: 4,
            groups: 4,
            groups_per_token: 2,
            expert_hidden: 64,
            ..mini.moe.clone().unwrap()
        }),
        ..mini
    }
}

/// CUDA against the CPU backend with device rounding, a 64-token prompt and
/// a block of masks after it in blocks of 32 (a dense layer and two MoE
/// layers over 32 rows, then against the cache). Both round to bf16 at the
/// same points, so they differ by summation order alone (the emulated
/// cuBLASLt sums as the CPU does; the grouped expert GEMM and the combine in
/// their own order), about 1e-7 relative, which each rounding point can
/// grow towards the bf16 noise of the model (tests/cuda.rs,
/// REAL_WIDTH_LOGITS), printed beside as the f32 reference's distance from
/// the rounding one. The bound, on the well-conditioned synthetic model, is
/// tests/cuda.rs's 1.5e-2 of a row's scale (measured: 7.5e-3); a wrong
/// expert, weight or sum moves logits by their own scale. The golden model
/// is printed only: its random weights make the f32 and rounding references
/// differ by the logits' own scale, so no bound on it tells a bug.
#[test]
fn block_logits_match_the_cpu_backend_rounding_as_the_device() {
    for (what, model, assert) in [
        (
            "synthetic",
            synthetic::model(synthetic_config(), 0x11ada2),
            true,
        ),
        ("golden bf16", bf16_model(), false),
    ] {
        let c = &model.config;
        let mut tokens: Vec<u32> = (0..64u32).map(|i| (i * 37 + 11) % 500).collect();
        tokens.resize(96, c.mask_id.unwrap());
        let got = block_logits(&mut cuda(&model).unwrap(), &tokens, 32, |_| {});
        let rounding = block_logits(
            &mut CpuBackend::with_rounding(&model, Rounding::Device).unwrap(),
            &tokens,
            32,
            |_| {},
        );
        let f32_reference =
            block_logits(&mut CpuBackend::new(&model).unwrap(), &tokens, 32, |_| {});
        let (err, row) = logits_error(&got, &rounding, c.vocab_size);
        let (noise, _) = logits_error(&f32_reference, &rounding, c.vocab_size);
        eprintln!(
            "{what}: CUDA vs rounding reference {err:.2e} of a row's scale (row {row}); \
             f32 vs rounding {noise:.2e}"
        );
        if assert {
            assert!(err < 1.5e-2, "{what}: row {row} off by {err} of its scale");
        }
    }
}

/// Tokens and NFE of `case` decoded by `backend`.
fn decode(backend: &mut dyn Backend, model: &Model, case: &Case) -> dllm::decode::Generation {
    dllm::decode::generate(
        backend,
        &model.config,
        &case.prompt,
        &case.options,
        &mut |_| {},
    )
    .unwrap_or_else(|e| panic!("{}: {e}", case.label))
}

/// Every fourth robust case (35 of 139, both samplers and every setting):
/// 35 take the emulated device 13 minutes on two shared cores, all of them
/// would take most of an hour.
#[test]
fn robust_cases_decode_through_cuda() {
    let model = bf16_model();
    let cases: Vec<Case> = robust_cases("llada2_tiny_s1")
        .into_iter()
        .step_by(4)
        .collect();
    let mut backend = cuda(&model).unwrap();
    let mut reference = CpuBackend::with_rounding(&model, Rounding::Device).unwrap();
    let (mut same_tokens, mut same_nfe, mut as_golden) = (0, 0, 0);
    for case in &cases {
        let got = decode(&mut backend, &model, case);
        let want = decode(&mut reference, &model, case);
        // The steps a block may take: LLaDA2.0's quota spends at most
        // `steps`; LLaDA2.1's edits at most max_post_steps more per block,
        // and its commits at least one token a step.
        let blocks =
            (case.prompt.len() + case.options.gen_length).div_ceil(case.options.block_length);
        let most = blocks * (case.options.steps + case.options.block_length + 16);
        assert!(
            (1..=most).contains(&got.nfe),
            "{}: NFE {}",
            case.label,
            got.nfe
        );
        assert!(
            got.tokens.len() <= case.options.gen_length,
            "{}",
            case.label
        );
        same_tokens += (got.tokens == want.tokens) as usize;
        same_nfe += (got.nfe == want.nfe) as usize;
        as_golden += (got.tokens == case.tokens && got.nfe == case.nfe) as usize;
        eprintln!("{}: NFE {} (CPU {})", case.label, got.nfe, want.nfe);
    }
    eprintln!(
        "{} robust cases through CUDA: tokens as the CPU backend's (bf16 rounding) {same_tokens}, \
         NFE {same_nfe}; tokens and NFE as the f32 reference's {as_golden}",
        cases.len()
    );
}

/// One case of each sampler with graphs and without: a step of block
/// diffusion repeats its geometry (one block against the cache), so MoE
/// steps are captured and replayed, and must give the eager tokens.
#[test]
fn moe_steps_replay_as_graphs_to_the_eager_tokens() {
    let model = bf16_model();
    let cases = robust_cases("llada2_tiny_s1");
    let picks = [
        cases
            .iter()
            .find(|c| c.label.starts_with("\"llada20\""))
            .unwrap(),
        cases
            .iter()
            .find(|c| c.label.starts_with("\"llada21\""))
            .unwrap(),
    ];
    let mut eager = cuda(&model).unwrap();
    eager.set_graphs(false);
    let mut graphs = cuda(&model).unwrap();
    for case in picks {
        let (want, got) = (
            decode(&mut eager, &model, case),
            decode(&mut graphs, &model, case),
        );
        assert_eq!(got.tokens, want.tokens, "{}", case.label);
        assert_eq!(got.nfe, want.nfe, "{}", case.label);
    }
    assert_eq!(eager.graph_replays(), 0);
    assert!(graphs.graph_replays() > 0, "no step was replayed");
}

/// Six requests of both samplers and block lengths through the engine: two
/// at once, two more when the first finishes a block, the last two when the
/// second does; their tokens and NFE are, bit for bit, those alone (each
/// row's routing and expert products do not depend on the rows beside it).
#[test]
fn llada2_requests_arriving_at_different_steps_decode_as_alone() {
    let model = bf16_model();
    let cases = robust_cases("llada2_tiny_s1");
    let mut picks: Vec<&Case> = Vec::new();
    for sampler in ["\"llada20\"", "\"llada21\""] {
        for block in [16, 32] {
            picks.extend(
                cases
                    .iter()
                    .filter(|c| c.label.starts_with(sampler) && c.options.block_length == block)
                    .take(if block == 16 { 2 } else { 1 }),
            );
        }
    }
    assert_eq!(picks.len(), 6);
    let options: Vec<DecodeOptions> = picks.iter().map(|c| c.options.clone()).collect();

    let mut backend = cuda(&model).unwrap();
    let alone: Vec<_> = picks
        .iter()
        .map(|case| decode(&mut backend, &model, case))
        .collect();

    let engine = Engine::with_backend(
        bf16_model(),
        Box::new(|model: &Model| -> dllm::Result<Box<dyn Backend>> { Ok(Box::new(cuda(model)?)) }),
        EngineOptions {
            max_batch: 8,
            cache_slots: None,
        },
    )
    .unwrap();
    let submit = |i: usize| engine.submit(&picks[i].prompt, &options[i]).unwrap();
    let mut handles = vec![submit(0), submit(1)];
    for (watched, next) in [(0, 2), (1, 4)] {
        match handles[watched].next_event() {
            Event::Block { .. } => handles.extend([submit(next), submit(next + 1)]),
            Event::Done(result) => panic!("request {watched} ended before a block: {result:?}"),
            Event::Step { .. } => unreachable!("only a request that watches steps hears them"),
        }
    }
    for (i, (handle, alone)) in handles.into_iter().zip(&alone).enumerate() {
        let batched = handle.wait().unwrap();
        assert_eq!(batched.tokens, alone.tokens, "request {i}: tokens");
        assert_eq!(batched.nfe, alone.nfe, "request {i}: NFE");
    }
}

/// 2048 experts, more than the router kernel holds: the backend refuses the
/// model when it is created, saying why, before any weight goes up.
#[test]
fn experts_beyond_the_router_kernel_are_a_clear_error() {
    let mut config = synthetic_config();
    let moe = config.moe.as_mut().unwrap();
    (moe.experts, moe.expert_hidden) = (2048, 8);
    let model = synthetic::model(config, 7);
    match cuda(&model) {
        Err(dllm::Error::Device(msg)) => assert!(
            msg.contains("2048 experts") && msg.contains("at most 1024"),
            "{msg}"
        ),
        Err(other) => panic!("not a device error: {other}"),
        Ok(_) => panic!("2048 experts were accepted"),
    }
}
