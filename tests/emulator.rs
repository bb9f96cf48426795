//! CUDA's execution model as the kernels use it (kernels/conformance.cu),
//! and launches the hardware refuses. On a GPU these check the hardware
//! against the stated rules; on the emulated device (where there is none)
//! they check the emulation against the same rules, and that it reports the
//! breaches a GPU would leave undefined.

use std::sync::Arc;

use dllm::cuda::cudarc::driver::sys::CUfunction_attribute;
use dllm::cuda::cudarc::driver::{CudaFunction, CudaModule, LaunchConfig, PushKernelArg};
use dllm::cuda::kernels::{launch, load_module};
use dllm::cuda::{Driver, Gpu};

fn gpu() -> (Gpu, Driver) {
    let driver = Driver::for_tests().unwrap();
    (
        Gpu::open(driver).expect("a CUDA device, real or emulated"),
        driver,
    )
}

fn conformance(gpu: &Gpu) -> Arc<CudaModule> {
    load_module(&gpu.ctx, "conformance").unwrap()
}

fn function(module: &Arc<CudaModule>, name: &str) -> CudaFunction {
    module.load_function(name).unwrap()
}

fn threads(grid: (u32, u32, u32), block: (u32, u32, u32)) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid,
        block_dim: block,
        shared_mem_bytes: 0,
    }
}

#[derive(Clone, Copy, Debug)]
enum Shuffle {
    Index = 0,
    Up = 1,
    Down = 2,
    Xor = 3,
}

/// The lane whose value `lane` receives, as CUDA's programming guide states
/// it for the `__shfl*_sync` intrinsics with a `width`-lane segment.
fn shuffle_source(kind: Shuffle, lane: i32, operand: i32, width: i32) -> i32 {
    let segment = lane / width * width;
    match kind {
        Shuffle::Index => segment + operand.rem_euclid(width),
        Shuffle::Up if lane - operand >= segment => lane - operand,
        Shuffle::Down if lane + operand < segment + width => lane + operand,
        Shuffle::Xor if (lane ^ operand) < segment + width => lane ^ operand,
        _ => lane,
    }
}

#[test]
fn shuffles_read_the_lanes_cuda_specifies() {
    let (gpu, _) = gpu();
    let f = function(&conformance(&gpu), "shuffle_lanes");
    let block = 64;
    let mut checked = 0;
    for kind in [Shuffle::Index, Shuffle::Up, Shuffle::Down, Shuffle::Xor] {
        for width in [32, 16, 8, 4] {
            for operand in [0, 1, 3, 7, 13, 16, 31] {
                let mut out = gpu.stream.clone_htod(&vec![-1i32; block]).unwrap();
                let (k, o, w) = (kind as i32, operand, width);
                let mut args = gpu.stream.launch_builder(&f);
                args.arg(&mut out).arg(&k).arg(&o).arg(&w);
                launch(
                    args,
                    "shuffle_lanes",
                    threads((1, 1, 1), (block as u32, 1, 1)),
                )
                .unwrap();
                let got = gpu.stream.clone_dtoh(&out).unwrap();
                for (t, &value) in got.iter().enumerate() {
                    let (warp, lane) = (t as i32 / 32, t as i32 % 32);
                    let want = 1000 * warp + shuffle_source(kind, lane, operand, width);
                    assert_eq!(
                        value, want,
                        "{kind:?} width {width} operand {operand} thread {t}"
                    );
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, 4 * 4 * 7 * block);
}

#[test]
fn warp_sums_are_butterfly_reductions_over_all_lanes() {
    let (gpu, _) = gpu();
    let f = function(&conformance(&gpu), "warp_sums");
    let values: Vec<f32> = (0..96).map(|i| (i * i % 17) as f32 - 8.0).collect();
    let input = gpu.stream.clone_htod(&values).unwrap();
    let mut out = gpu.stream.clone_htod(&vec![f32::NAN; 96]).unwrap();
    let mut args = gpu.stream.launch_builder(&f);
    args.arg(&input).arg(&mut out);
    launch(args, "warp_sums", threads((1, 1, 1), (96, 1, 1))).unwrap();
    let got = gpu.stream.clone_dtoh(&out).unwrap();
    for (t, &sum) in got.iter().enumerate() {
        let warp = &values[t / 32 * 32..][..32];
        // Small integers: every summation order is exact.
        assert_eq!(sum, warp.iter().sum::<f32>(), "thread {t}");
    }
}

#[test]
fn syncthreads_is_a_barrier_for_the_whole_block() {
    let (gpu, _) = gpu();
    let f = function(&conformance(&gpu), "reverse_through_shared");
    for (blocks, n) in [(3usize, 1024usize), (2, 96), (1, 33)] {
        let mut out = gpu.stream.clone_htod(&vec![-1i32; blocks * n]).unwrap();
        let mut args = gpu.stream.launch_builder(&f);
        args.arg(&mut out);
        launch(
            args,
            "reverse_through_shared",
            threads((blocks as u32, 1, 1), (n as u32, 1, 1)),
        )
        .unwrap();
        let got = gpu.stream.clone_dtoh(&out).unwrap();
        for b in 0..blocks {
            for t in 0..n {
                assert_eq!(
                    got[b * n + t],
                    (n - 1 - t + 10000 * b) as i32,
                    "block {b} thread {t}"
                );
            }
        }
    }
}

#[test]
fn extern_shared_arrays_are_the_dynamic_shared_memory_of_the_launch() {
    let (gpu, _) = gpu();
    let f = function(&conformance(&gpu), "reverse_through_dynamic_shared");
    // 64 KiB is past the default 48 KiB: the kernel must opt in first.
    f.set_attribute(
        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        64 << 10,
    )
    .unwrap();
    for (n, bytes) in [(32u32, 128u32), (1024, 4096), (256, 64 << 10)] {
        let mut out = gpu.stream.clone_htod(&vec![-1i32; n as usize]).unwrap();
        let mut args = gpu.stream.launch_builder(&f);
        args.arg(&mut out);
        let config = LaunchConfig {
            shared_mem_bytes: bytes,
            ..threads((1, 1, 1), (n, 1, 1))
        };
        launch(args, "reverse_through_dynamic_shared", config).unwrap();
        let want: Vec<i32> = (0..n as i32).rev().collect();
        assert_eq!(gpu.stream.clone_dtoh(&out).unwrap(), want, "{n} threads");
    }
}

#[test]
fn every_thread_of_a_3d_grid_sees_its_own_indices() {
    let (gpu, _) = gpu();
    let f = function(&conformance(&gpu), "thread_indices");
    let (grid, block) = ((3u32, 2u32, 2u32), (8u32, 4u32, 2u32));
    let total = (3 * 2 * 2 * 8 * 4 * 2) as usize;
    let mut out = gpu.stream.clone_htod(&vec![u32::MAX; total]).unwrap();
    let mut args = gpu.stream.launch_builder(&f);
    args.arg(&mut out);
    launch(args, "thread_indices", threads(grid, block)).unwrap();
    let got = gpu.stream.clone_dtoh(&out).unwrap();
    let mut i = 0;
    for bz in 0..grid.2 {
        for by in 0..grid.1 {
            for bx in 0..grid.0 {
                for tz in 0..block.2 {
                    for ty in 0..block.1 {
                        for tx in 0..block.0 {
                            let want = tx | ty << 8 | tz << 16 | (bx | by << 4 | bz << 8) << 20;
                            assert_eq!(got[i], want, "linear thread {i}");
                            i += 1;
                        }
                    }
                }
            }
        }
    }
}

/// Launches a model kernel with a configuration the hardware refuses.
fn refused(gpu: &Gpu, config: LaunchConfig) -> String {
    let module = load_module(&gpu.ctx, "rms_norm").unwrap();
    let f = function(&module, "rms_norm");
    let (d, eps) = (8i32, 1e-5f32);
    let x = gpu.stream.clone_htod(&[1.0f32; 8]).unwrap();
    let mut out = gpu.stream.alloc_zeros::<half::bf16>(8).unwrap();
    let mut args = gpu.stream.launch_builder(&f);
    args.arg(&x).arg(&x).arg(&mut out).arg(&d).arg(&eps);
    launch(args, "rms_norm", config).unwrap_err().to_string()
}

#[test]
fn launches_past_the_device_limits_are_clear_errors_naming_the_kernel() {
    let (gpu, _) = gpu();
    let too_many_threads = refused(&gpu, threads((1, 1, 1), (2048, 1, 1)));
    let too_much_shared = refused(
        &gpu,
        LaunchConfig {
            shared_mem_bytes: 64 << 10,
            ..threads((1, 1, 1), (256, 1, 1))
        },
    );
    for err in [too_many_threads, too_much_shared] {
        assert!(
            err.contains("rms_norm") && err.contains("CUDA_ERROR_INVALID_VALUE"),
            "{err}"
        );
    }
    // The device still works afterwards.
    let f = function(&conformance(&gpu), "warp_sums");
    let input = gpu.stream.clone_htod(&[1.0f32; 32]).unwrap();
    let mut out = gpu.stream.clone_htod(&[0.0f32; 32]).unwrap();
    let mut args = gpu.stream.launch_builder(&f);
    args.arg(&input).arg(&mut out);
    launch(args, "warp_sums", threads((1, 1, 1), (32, 1, 1))).unwrap();
    assert_eq!(gpu.stream.clone_dtoh(&out).unwrap(), vec![32.0f32; 32]);
}

/// Launches one of the *_fault kernels with 32 threads and `shared` bytes of
/// dynamic shared memory on a buffer of `len` 4-byte elements (and `len`
/// itself, for a kernel that takes it); on the emulated device only: on a GPU
/// their behaviour is undefined, so there the tests have nothing to check and
/// say so.
fn launch_fault(name: &str, len: usize, pass_len: bool, shared: u32) -> Option<String> {
    let (gpu, driver) = gpu();
    if driver != Driver::Emulated {
        eprintln!("{name}: undefined on a GPU; only the emulated device checks it");
        return None;
    }
    let f = function(&conformance(&gpu), name);
    let mut buffer = gpu.stream.alloc_zeros::<i32>(len).unwrap();
    let n = len as i32;
    let mut args = gpu.stream.launch_builder(&f);
    args.arg(&mut buffer);
    if pass_len {
        args.arg(&n);
    }
    let config = LaunchConfig {
        shared_mem_bytes: shared,
        ..threads((1, 1, 1), (32, 1, 1))
    };
    Some(match launch(args, name, config) {
        Ok(()) => "launched".into(),
        Err(e) => e.to_string(),
    })
}

#[test]
fn a_shuffle_naming_a_lane_that_exited_fails_the_launch() {
    if let Some(err) = launch_fault("shuffle_after_exit_fault", 32, false, 0) {
        assert!(err.contains("CUDA_ERROR_LAUNCH_FAILED"), "{err}");
    }
}

#[test]
fn threads_waiting_at_different_barriers_fail_the_launch_instead_of_hanging() {
    if let Some(err) = launch_fault("divergent_barrier_fault", 32, false, 0) {
        assert!(err.contains("CUDA_ERROR_LAUNCH_FAILED"), "{err}");
    }
}

#[test]
fn a_write_past_the_dynamic_shared_memory_of_the_launch_fails_it() {
    if let Some(err) = launch_fault("dynamic_shared_overrun_fault", 32, false, 32 * 4) {
        assert!(err.contains("CUDA_ERROR_LAUNCH_FAILED"), "{err}");
    }
}

#[test]
fn a_write_past_the_end_of_an_allocation_is_an_illegal_address() {
    // 5 elements: the allocation is padded to 32 bytes, so the write lands in
    // the canary between its end and the guard page.
    if let Some(err) = launch_fault("write_past_end_fault", 5, true, 0) {
        assert!(err.contains("CUDA_ERROR_ILLEGAL_ADDRESS"), "{err}");
    }
}

/// The child half of the next test: an access into the guard page after a
/// 16-byte allocation kills the process.
const GUARD_PAGE_CHILD: &str = "DLLM_TEST_GUARD_PAGE_CHILD";

#[test]
fn an_access_into_a_guard_page_stops_the_process_naming_the_kernel() {
    if std::env::var_os(GUARD_PAGE_CHILD).is_some() {
        launch_fault("write_past_end_fault", 4, true, 0);
        return;
    }
    if Driver::for_tests().unwrap() != Driver::Emulated {
        eprintln!("guard pages belong to the emulated device; a GPU reports this asynchronously");
        return;
    }
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "an_access_into_a_guard_page_stops_the_process_naming_the_kernel",
            "--nocapture",
        ])
        .env(GUARD_PAGE_CHILD, "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&child.stderr);
    assert!(!child.status.success(), "the child survived: {stderr}");
    assert!(
        stderr.contains(
            "illegal address in kernel write_past_end_fault: byte 16 of a 16-byte allocation"
        ),
        "{stderr}"
    );
}

/// The child half of the next test: runs the racy kernel.
const RACE_CHILD: &str = "DLLM_TEST_RACE_CHILD";

#[test]
#[ignore = "needs the emulated device built with DLLM_EMU_SANITIZE=thread and libtsan preloaded (.ci/run runs it)"]
fn a_race_in_shared_memory_is_reported_by_the_thread_sanitizer_build() {
    assert_eq!(
        option_env!("DLLM_EMU_SANITIZE"),
        Some("thread"),
        "build with DLLM_EMU_SANITIZE=thread, run with LD_PRELOAD=$(gcc -print-file-name=libtsan.so)"
    );
    if std::env::var_os(RACE_CHILD).is_some() {
        let launched = launch_fault("shared_race_fault", 1, false, 0);
        assert_eq!(launched.as_deref(), Some("launched"));
        return;
    }
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_race_in_shared_memory_is_reported_by_the_thread_sanitizer_build",
            "--include-ignored",
            "--nocapture",
        ])
        .env(RACE_CHILD, "1")
        .env(
            "TSAN_OPTIONS",
            format!(
                "halt_on_error=1:exitcode=66:suppressions={}/kernels/emulator/tsan.supp",
                env!("CARGO_MANIFEST_DIR")
            ),
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&child.stderr);
    assert_eq!(child.status.code(), Some(66), "{stderr}");
    assert!(
        stderr.contains("ThreadSanitizer: data race") && stderr.contains("shared_race_fault"),
        "{stderr}"
    );
}
