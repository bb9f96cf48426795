// The emulated device's kernel runtime: the registry of host-compiled kernels
// and the launch that runs a grid on the host (runtime.cc).
#pragma once

#include <cstddef>
#include <string>
#include <utility>
#include <vector>

#include <vector_types.h>

namespace emu {

// A kernel compiled for the host, found by its C name.
struct Kernel {
  const char* name;
  void* function;
  // Calls `function` with cuLaunchKernel's parameter array unpacked by the
  // kernel's signature.
  void (*invoke)(void* function, void* const* params);
  // sizeof each parameter: what a captured launch copies.
  std::vector<size_t> param_sizes;
};

void register_kernel(Kernel kernel);
const Kernel* find_kernel(const char* name);

template <class... Args, size_t... I>
void call(void (*function)(Args...), void* const* params, std::index_sequence<I...>) {
  function(*static_cast<Args*>(params[I])...);
}

template <class... Args>
void invoke(void* function, void* const* params) {
  call(reinterpret_cast<void (*)(Args...)>(function), params, std::index_sequence_for<Args...>{});
}

template <class... Args>
struct Registration {
  Registration(const char* name, void (*function)(Args...)) {
    register_kernel(Kernel{name, reinterpret_cast<void*>(function), &invoke<Args...>, {sizeof(Args)...}});
  }
};

// Registers a kernel under its C name (build.rs appends one line per kernel of
// a file to the translation unit that compiles it).
#define DLLM_EMU_KERNEL(name) static ::emu::Registration dllm_emu_kernel_##name(#name, &name);

// H100 limits a launch is checked against (compute capability 9.0).
constexpr unsigned MAX_THREADS_PER_BLOCK = 1024;
constexpr unsigned MAX_BLOCK_DIM[3] = {1024, 1024, 64};
constexpr unsigned MAX_GRID_DIM[3] = {2147483647u, 65535, 65535};
constexpr size_t DEFAULT_DYNAMIC_SHARED = 48 * 1024;
constexpr size_t MAX_OPT_IN_SHARED = 227 * 1024;
// A launch's dynamic shared memory is followed by this many canary bytes, to
// catch a block writing past the size it was launched with.
constexpr size_t DYNAMIC_SHARED_CANARY = 256;
constexpr size_t DYNAMIC_SHARED_BYTES = MAX_OPT_IN_SHARED + DYNAMIC_SHARED_CANARY;

struct Launch {
  const Kernel* kernel;
  void* const* params;
  dim3 grid, block;
  size_t dynamic_shared;
};

// Runs every block of the launch; an empty string on success, else what went
// wrong (a deadlock, a shuffle with a lane that exited, ...).
std::string run(const Launch& launch);

// The kernel this host thread is running a block of, or null.
const char* running_kernel();

}  // namespace emu
