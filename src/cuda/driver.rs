//! Which CUDA driver the process talks to: the GPU's, or the host emulation
//! of the device built from the same kernel sources (kernels/emulator/,
//! docs/cuda.md "The emulated device").
//!
//! The emulator is a pair of shared libraries, embedded in this binary, that
//! export the driver and cuBLASLt entry points the backend calls. Loading them
//! under the sonames cudarc looks for (`libcuda.so`, `libcublasLt.so`) before
//! cudarc's first call makes cudarc bind to them: the dynamic linker answers
//! a `dlopen` of a bare name with an already loaded library of that soname.
//! From there on every call of `CudaBackend` (allocations, copies, launches
//! with their parameter buffers, cuBLASLt descriptors, graphs) takes the same
//! path as on a GPU. The choice is made once per process.

use std::sync::OnceLock;

use crate::error::{Error, Result};

/// The environment variable that selects the emulated device.
const ENV: &str = "DLLM_CUDA";

/// The driver this process activated, or why it could not.
static ACTIVE: OnceLock<std::result::Result<Driver, String>> = OnceLock::new();

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    /// The NVIDIA driver and CUDA 13's cuBLASLt of this machine.
    Hardware,
    /// The host emulation of an H100-class device (tests, kernel debugging).
    Emulated,
}

impl Driver {
    /// `DLLM_CUDA=emulated` selects the emulator; unset (or `hardware`) the GPU.
    pub fn from_env() -> Result<Driver> {
        match std::env::var(ENV) {
            Err(std::env::VarError::NotPresent) => Driver::parse(None),
            Ok(v) => Driver::parse(Some(&v)),
            Err(e) => Err(Error::invalid(format!("{ENV}: {e}"))),
        }
    }

    fn parse(value: Option<&str>) -> Result<Driver> {
        match value {
            None | Some("hardware") => Ok(Driver::Hardware),
            Some("emulated") => Ok(Driver::Emulated),
            Some(other) => Err(Error::invalid(format!(
                "{ENV}={other:?}: expected \"emulated\" or \"hardware\""
            ))),
        }
    }

    /// For test suites: `DLLM_CUDA` when set, else the GPU where a driver is
    /// installed, else the emulator, so that a machine without a GPU runs
    /// every CUDA test instead of skipping it. Decided once per process, by
    /// the first caller: once the emulator is loaded it is the libcuda.so
    /// every later look-up would find.
    pub fn for_tests() -> Result<Driver> {
        static CHOICE: OnceLock<std::result::Result<Driver, String>> = OnceLock::new();
        CHOICE
            .get_or_init(|| {
                if std::env::var_os(ENV).is_some() {
                    return Driver::from_env().map_err(|e| e.to_string());
                }
                // SAFETY: only tries to dlopen the driver library.
                Ok(if unsafe { cudarc::driver::sys::is_culib_present() } {
                    Driver::Hardware
                } else {
                    Driver::Emulated
                })
            })
            .clone()
            .map_err(Error::Device)
    }

    /// Makes this process's CUDA calls go to this driver. The first driver
    /// activated stays for the life of the process.
    pub fn activate(self) -> Result<()> {
        let active = ACTIVE.get_or_init(|| match self {
            Driver::Hardware => Ok(Driver::Hardware),
            Driver::Emulated => emulator::load().map(|()| Driver::Emulated),
        });
        match active {
            Ok(driver) if *driver == self => Ok(()),
            Ok(driver) => Err(Error::Device(format!(
                "this process already uses the {driver:?} CUDA driver; it cannot switch to {self:?}"
            ))),
            Err(e) => Err(Error::Device(e.clone())),
        }
    }
}

#[cfg(dllm_emulator)]
mod emulator {
    use std::ffi::c_void;
    use std::path::{Path, PathBuf};

    use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};

    include!(concat!(env!("OUT_DIR"), "/emulator.rs"));

    /// Writes the embedded libraries to a folder named by their content (so
    /// concurrent processes agree on it) and loads them, driver first: the
    /// cuBLASLt emulation links to it.
    pub fn load() -> Result<(), String> {
        let dir = std::env::temp_dir().join(format!("dllm-emulator-{:016x}", fingerprint()));
        let driver = install(&dir, "libcuda.so", DRIVER)?;
        let blas = install(&dir, "libcublasLt.so", CUBLASLT)?;
        // SAFETY: our own libraries; their initialisers only set up tables.
        let (driver, blas) = unsafe {
            (
                Library::open(Some(&driver), RTLD_NOW | RTLD_GLOBAL),
                Library::open(Some(&blas), RTLD_NOW | RTLD_GLOBAL),
            )
        };
        let (driver, blas) = match (driver, blas) {
            (Ok(d), Ok(b)) => (d, b),
            (Err(e), _) | (_, Err(e)) => {
                return Err(format!("cannot load the emulated device: {e}"))
            }
        };
        type SetGemm = unsafe extern "C" fn(*const c_void);
        // SAFETY: the symbol has this signature in kernels/emulator/cublaslt.cc.
        unsafe {
            let set = blas
                .get::<SetGemm>(b"dllm_emu_set_sgemm\0")
                .map_err(|e| format!("emulated cuBLASLt: {e}"))?;
            set(sgemm as *const c_void);
        }
        // Both stay loaded for the life of the process: cudarc holds their
        // symbols from here on.
        std::mem::forget(driver);
        std::mem::forget(blas);
        Ok(())
    }

    fn fingerprint() -> u64 {
        // FNV-1a over both images.
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for byte in DRIVER.iter().chain(CUBLASLT) {
            h = (h ^ *byte as u64).wrapping_mul(0x0100_0000_01b3);
        }
        h
    }

    fn install(dir: &Path, name: &str, image: &[u8]) -> Result<PathBuf, String> {
        let path = dir.join(name);
        if std::fs::read(&path).is_ok_and(|on_disk| on_disk == image) {
            return Ok(path);
        }
        let fail = |e: std::io::Error| {
            format!("cannot write the emulated device to {}: {e}", dir.display())
        };
        std::fs::create_dir_all(dir).map_err(fail)?;
        // Write then rename, so a concurrent process never loads half a file.
        let partial = dir.join(format!("{name}.{}", std::process::id()));
        std::fs::write(&partial, image).map_err(fail)?;
        std::fs::rename(&partial, &path).map_err(fail)?;
        Ok(path)
    }

    /// The f32 GEMM the emulated cuBLASLt runs after widening its bf16
    /// operands: `c = alpha a b + beta c` with explicit element strides, the
    /// `Sgemm` type of kernels/emulator/cublaslt.cc.
    unsafe extern "C" fn sgemm(
        m: usize,
        k: usize,
        n: usize,
        alpha: f32,
        a: *const f32,
        rsa: isize,
        csa: isize,
        b: *const f32,
        rsb: isize,
        csb: isize,
        beta: f32,
        c: *mut f32,
        rsc: isize,
        csc: isize,
    ) {
        // SAFETY: the emulated cuBLASLt passes extents and strides it checked
        // against its layouts.
        unsafe {
            matrixmultiply::sgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
        }
    }
}

#[cfg(not(dllm_emulator))]
mod emulator {
    pub fn load() -> Result<(), String> {
        Err(
            "this dllm was built without the emulated device (build.rs found no nvcc headers): \
             run scripts/install-nvcc.sh, then rebuild"
                .into(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_names_the_driver() {
        assert_eq!(Driver::parse(None).unwrap(), Driver::Hardware);
        assert_eq!(Driver::parse(Some("hardware")).unwrap(), Driver::Hardware);
        assert_eq!(Driver::parse(Some("emulated")).unwrap(), Driver::Emulated);
        let err = Driver::parse(Some("gpu")).unwrap_err().to_string();
        assert!(err.contains("DLLM_CUDA=\"gpu\""), "{err}");
    }
}
