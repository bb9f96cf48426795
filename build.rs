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
//!
//! The same kernel sources are compiled a second time for the host, into the
//! emulated device (kernels/emulator/, docs/cuda.md): a `libcuda.so` with the
//! kernels, their fiber runtime and the driver entry points, and a
//! `libcublasLt.so`, both embedded in the binary. The host compiler comes from
//! the `cc` crate; the CUDA headers (`cuda.h`, `cuda_bf16.h`) from nvcc's
//! installation.

use std::env;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

const WHEEL_NVCC: &str = "nvidia/cu13/bin/nvcc";

fn main() {
    println!("cargo::rustc-check-cfg=cfg(dllm_kernels)");
    println!("cargo::rustc-check-cfg=cfg(dllm_emulator)");
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=kernels");
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "DLLM_NVCC_WHEEL_DIR",
        "DLLM_CUDA_SM80",
        "DLLM_EMU_SANITIZE",
    ] {
        println!("cargo::rerun-if-env-changed={var}");
    }

    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    embed_commit(&manifest);
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

    let include = nvcc
        .parent()
        .and_then(Path::parent)
        .map(|root| root.join("include"))
        .filter(|dir| dir.join("cuda.h").is_file() && dir.join("cuda_bf16.h").is_file());
    match include {
        Some(include) => emulator::build(&manifest.join("kernels"), &sources, &include, &out),
        None => println!(
            "cargo::warning=no cuda.h beside {}: building without the emulated device",
            nvcc.display()
        ),
    }
}

/// The emulated device: see kernels/emulator/device.h.
mod emulator {
    use std::path::{Path, PathBuf};
    use std::process::Command;

    /// Section the host build puts `__global__` functions in (device.h).
    const KERNEL_SECTION: &str = ".text.dllm_kernel";

    pub fn build(kernels: &Path, sources: &[PathBuf], include: &Path, out: &Path) {
        let dir = out.join("emulator");
        std::fs::create_dir_all(&dir).expect("cannot create OUT_DIR/emulator");
        let emulator = kernels.join("emulator");
        let compiler = cc::Build::new().cpp(true).get_compiler();
        let host = Host {
            compiler: compiler.path().to_path_buf(),
            include: include.to_path_buf(),
            kernels: kernels.to_path_buf(),
            emulator: emulator.clone(),
            sanitize: sanitizer(),
        };

        let kernels_and_arrays: Vec<(PathBuf, Vec<String>)> = std::thread::scope(|scope| {
            let jobs: Vec<_> = sources
                .iter()
                .map(|src| {
                    let (host, dir) = (&host, &dir);
                    scope.spawn(move || host.kernel(src, dir))
                })
                .collect();
            jobs.into_iter()
                .map(|job| job.join().expect("host compiler thread panicked"))
                .collect()
        });
        let (mut objects, arrays): (Vec<PathBuf>, Vec<Vec<String>>) =
            kernels_and_arrays.into_iter().unzip();
        objects.push(host.dynamic_shared(&arrays.concat(), &dir));
        let object = |name: &str| host.compile(&emulator.join(name), &dir, &[]);
        let driver = dir.join("libcuda.so");
        objects.extend([object("runtime.cc"), object("driver.cc")]);
        host.link(&driver, "libcuda.so", &objects);
        let blas = dir.join("libcublasLt.so");
        host.link(
            &blas,
            "libcublasLt.so",
            &[object("cublaslt.cc"), driver.clone()],
        );

        std::fs::write(
            out.join("emulator.rs"),
            format!(
                "/// The emulated driver (kernels, fiber runtime, driver API).\n\
                 const DRIVER: &[u8] = include_bytes!({:?});\n\
                 /// The emulated cuBLASLt.\n\
                 const CUBLASLT: &[u8] = include_bytes!({:?});\n",
                driver.display().to_string(),
                blas.display().to_string()
            ),
        )
        .expect("cannot write OUT_DIR/emulator.rs");
        println!("cargo::rustc-cfg=dllm_emulator");
    }

    /// The names of the symbols in binutils' `tool` listing of `object`
    /// whose lines carry every one of `marks`.
    fn symbols(tool: &str, flag: &str, object: &Path, marks: &[&str]) -> Vec<String> {
        let listing = Command::new(tool)
            .arg(flag)
            .arg(object)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {tool} (binutils): {e}"));
        String::from_utf8_lossy(&listing.stdout)
            .lines()
            .filter(|line| marks.iter().all(|mark| line.contains(mark)))
            .filter_map(|line| line.split_whitespace().last().map(str::to_owned))
            .collect()
    }

    struct Host {
        compiler: PathBuf,
        include: PathBuf,
        kernels: PathBuf,
        emulator: PathBuf,
        /// `-fsanitize=...` for compiling and linking, if asked for.
        sanitize: Option<String>,
    }

    /// `DLLM_EMU_SANITIZE=thread` builds the emulated device under
    /// ThreadSanitizer; the program using it must then start with the
    /// sanitizer's runtime preloaded (scripts/tsan.sh, docs/cuda.md).
    fn sanitizer() -> Option<String> {
        let kind = std::env::var("DLLM_EMU_SANITIZE").ok()?;
        assert!(
            kind == "thread",
            "DLLM_EMU_SANITIZE={kind:?}: the emulated device builds under ThreadSanitizer only (thread)"
        );
        println!("cargo::rustc-env=DLLM_EMU_SANITIZE={kind}");
        Some(format!("-fsanitize={kind}"))
    }

    impl Host {
        fn run(&self, command: &mut Command, what: &Path) {
            let output = command
                .output()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.compiler.display()));
            if !output.status.success() {
                panic!(
                    "host build of {} failed:\n{}{}",
                    what.display(),
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                );
            }
        }

        /// Compiles C++17 `src` for the shared libraries; `extra` flags first.
        fn compile(&self, src: &Path, dir: &Path, extra: &[&str]) -> PathBuf {
            let stem = src.file_name().expect("a source file").to_string_lossy();
            let object = dir.join(format!("{stem}.o"));
            self.run(
                Command::new(&self.compiler)
                    .args(extra)
                    .args(self.sanitize_flags(src))
                    .args(["-x", "c++", "-std=c++17", "-O2", "-g", "-fPIC"])
                    .args(["-Wall", "-Wextra", "-Werror", "-fno-strict-aliasing"])
                    .arg("-I")
                    .arg(&self.include)
                    .arg("-I")
                    .arg(&self.kernels)
                    .arg("-I")
                    .arg(&self.emulator)
                    .arg("-c")
                    .arg(src)
                    .arg("-o")
                    .arg(&object),
                src,
            );
            object
        }

        /// A kernel file compiled for the host with every `__global__`
        /// function registered, and the names of its `extern __shared__`
        /// arrays. A first compile lists the kernels (the functions in
        /// `KERNEL_SECTION`) and the arrays (thread-locals it declares but
        /// does not define, since `__shared__` is `thread_local`); the
        /// second appends one registration per kernel, in the translation
        /// unit that defines it, so that its launcher is typed by the real
        /// signature.
        fn kernel(&self, src: &Path, dir: &Path) -> (PathBuf, Vec<String>) {
            let device = self.emulator.join("device.h");
            let kernel_flags = [
                "-include",
                device.to_str().expect("a UTF-8 path"),
                "-fvisibility=hidden",
                // `#pragma unroll` is a hint for nvcc only.
                "-Wno-unknown-pragmas",
            ];
            let probe = self.compile(src, dir, &kernel_flags);
            let names = symbols("objdump", "-t", &probe, &[KERNEL_SECTION, " F "]);
            assert!(!names.is_empty(), "{} defines no kernel", src.display());
            let arrays = symbols("readelf", "-sW", &probe, &[" TLS ", " UND "]);
            let stem = src.file_stem().expect("a .cu file").to_string_lossy();
            let unit = dir.join(format!("{stem}.registered.cc"));
            let mut text = format!(
                "#include {:?}\n#include \"runtime.h\"\n",
                src.display().to_string()
            );
            for name in &names {
                text.push_str(&format!("DLLM_EMU_KERNEL({name})\n"));
            }
            std::fs::write(&unit, text).expect("cannot write a registration unit");
            (self.compile(&unit, dir, &kernel_flags), arrays)
        }

        /// The block's dynamic shared memory: one buffer per host thread,
        /// which every kernel's `extern __shared__` array names, since on the
        /// device they all start where it does.
        fn dynamic_shared(&self, arrays: &[String], dir: &Path) -> PathBuf {
            let mut text = String::from(
                "#include \"runtime.h\"\n\
                 alignas(16) thread_local unsigned char \
                 dllm_emu_dynamic_shared[emu::DYNAMIC_SHARED_BYTES];\n",
            );
            let mut arrays = arrays.to_vec();
            arrays.sort();
            arrays.dedup();
            for name in arrays {
                text.push_str(&format!(
                    "extern thread_local unsigned char {name}[] \
                     __attribute__((alias(\"dllm_emu_dynamic_shared\")));\n"
                ));
            }
            let unit = dir.join("dynamic_shared.cc");
            std::fs::write(&unit, text).expect("cannot write the dynamic shared memory unit");
            self.compile(&unit, dir, &["-fvisibility=hidden"])
        }

        /// The fiber runtime's bookkeeping is shared by every fiber of a
        /// block by design, so under ThreadSanitizer it stays uninstrumented
        /// and instead tells the sanitizer about fibers and barriers
        /// (runtime.cc); everything else is instrumented.
        fn sanitize_flags(&self, src: &Path) -> Vec<String> {
            match self.sanitize.as_deref() {
                Some("-fsanitize=thread") if src.ends_with("runtime.cc") => {
                    vec!["-DDLLM_EMU_TSAN".into()]
                }
                other => other.map(str::to_owned).into_iter().collect(),
            }
        }

        fn link(&self, library: &Path, soname: &str, inputs: &[PathBuf]) {
            self.run(
                Command::new(&self.compiler)
                    .args(["-shared", "-pthread"])
                    .args(&self.sanitize)
                    .arg(format!("-Wl,-soname,{soname}"))
                    .arg("-o")
                    .arg(library)
                    .args(inputs),
                library,
            );
        }
    }
}

/// `DLLM_COMMIT`: the commit the binary is built from, so that a copy run on
/// a machine without the repository (a GPU host) still says what it is.
fn embed_commit(manifest: &Path) {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(manifest)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        for watched in ["HEAD", "refs/heads", "packed-refs"] {
            println!("cargo::rerun-if-changed={dir}/{watched}");
        }
    }
    println!("cargo::rustc-env=DLLM_COMMIT={commit}");
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
