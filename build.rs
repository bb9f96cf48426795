//! Compiles `kernels/*.cu` into fatbins that the CUDA backend embeds and loads
//! through the driver API (see docs/cuda.md for why there is no C linking).
//!
//! nvcc is looked for in `$NVCC`, `$CUDA_HOME/bin`, `$CUDA_PATH/bin`, `$PATH`,
//! then in PyPI wheels (`nvidia/cu13/bin/nvcc`): `$DLLM_NVCC_WHEEL_DIR`, the
//! repository's `.nvcc/` (what `scripts/install-nvcc.sh` fills), and the
//! site-packages of `python3`. Compiling a kernel needs no GPU. Without nvcc
//! the crate still builds, with a warning, and the CUDA backend reports that it
//! has no kernels when it is asked for.
//!
//! Targets: sm_90a (H100/H200), plus sm_80 with `DLLM_CUDA_SM80=1`. Every
//! compiler and assembler warning is an error.

use std::env;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

const WHEEL_NVCC: &str = "nvidia/cu13/bin/nvcc";

fn main() {
    println!("cargo::rustc-check-cfg=cfg(dllm_kernels)");
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=kernels");
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "DLLM_NVCC_WHEEL_DIR",
        "DLLM_CUDA_SM80",
    ] {
        println!("cargo::rerun-if-env-changed={var}");
    }

    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    let sources = kernel_sources(&manifest.join("kernels"));

    let Some(nvcc) = find_nvcc(&manifest) else {
        println!(
            "cargo::warning=nvcc not found: building without CUDA kernels (the CUDA backend will \
             refuse to start). Run scripts/install-nvcc.sh, or set NVCC or CUDA_HOME, then rebuild."
        );
        return;
    };
    // Watch the compiler itself, so that replacing it recompiles the kernels.
    println!("cargo::rerun-if-changed={}", nvcc.display());

    let sm80 = env::var("DLLM_CUDA_SM80").is_ok_and(|v| v == "1");
    let mut targets = vec!["-gencode=arch=compute_90a,code=sm_90a"];
    if sm80 {
        targets.push("-gencode=arch=compute_80,code=sm_80");
    }

    // The files are independent and nvcc is single-threaded: one thread each.
    let fatbins: Vec<(String, PathBuf)> = std::thread::scope(|scope| {
        let jobs: Vec<_> = sources
            .iter()
            .map(|src| {
                let (nvcc, targets, out) = (&nvcc, &targets, &out);
                scope.spawn(move || compile(nvcc, src, targets, out))
            })
            .collect();
        jobs.into_iter()
            .map(|job| job.join().expect("nvcc thread panicked"))
            .collect()
    });

    let mut table = String::from(
        "/// Fatbins compiled from `kernels/*.cu` by build.rs: (file stem, image).\n\
         pub(crate) const FATBINS: &[(&str, &[u8])] = &[\n",
    );
    for (stem, path) in &fatbins {
        writeln!(
            table,
            "    ({stem:?}, include_bytes!({:?})),",
            path.display().to_string()
        )
        .expect("writing to a String");
    }
    table.push_str("];\n");
    std::fs::write(out.join("kernels.rs"), table).expect("cannot write OUT_DIR/kernels.rs");
    println!("cargo::rustc-cfg=dllm_kernels");
}

fn kernel_sources(dir: &Path) -> Vec<PathBuf> {
    let mut sources: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| entry.expect("readable kernels/ entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    sources.sort();
    sources
}

fn compile(nvcc: &Path, src: &Path, targets: &[&str], out: &Path) -> (String, PathBuf) {
    let stem = src
        .file_stem()
        .expect("a .cu file has a stem")
        .to_string_lossy()
        .into_owned();
    let fatbin = out.join(format!("{stem}.fatbin"));
    let output = Command::new(nvcc)
        .args([
            "-fatbin",
            "-std=c++17",
            "-lineinfo",
            "-Werror",
            "all-warnings",
        ])
        .args(["-Xptxas", "-Werror"])
        .args(targets)
        .arg("-o")
        .arg(&fatbin)
        .arg(src)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", nvcc.display()));
    if !output.status.success() {
        panic!(
            "nvcc failed on {}:\n{}{}",
            src.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    (stem, fatbin)
}

fn find_nvcc(manifest: &Path) -> Option<PathBuf> {
    let from_env =
        |var: &str, suffix: &str| env::var_os(var).map(|v| PathBuf::from(v).join(suffix));
    let on_path: Vec<PathBuf> = env::var_os("PATH")
        .map(|paths| env::split_paths(&paths).map(|p| p.join("nvcc")).collect())
        .unwrap_or_default();
    let candidates = [
        env::var_os("NVCC").map(PathBuf::from),
        from_env("CUDA_HOME", "bin/nvcc"),
        from_env("CUDA_PATH", "bin/nvcc"),
    ]
    .into_iter()
    .flatten()
    .chain(on_path)
    .chain(from_env("DLLM_NVCC_WHEEL_DIR", WHEEL_NVCC))
    .chain([manifest.join(".nvcc").join(WHEEL_NVCC)]);
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .or_else(python_wheel_nvcc)
}

/// nvcc from the `nvidia-cuda-nvcc` wheel in python3's site-packages, if any.
fn python_wheel_nvcc() -> Option<PathBuf> {
    let output = Command::new("python3")
        .args(["-c", "import nvidia; print('\\n'.join(nvidia.__path__))"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|dir| Path::new(dir).join("cu13/bin/nvcc"))
        .find(|p| p.is_file())
}
