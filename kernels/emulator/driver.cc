// The CUDA driver API entry points the backend reaches through cudarc, answered
// on the host for one emulated H100-class device (sm_90, 132 multiprocessors,
// 80 GiB). Device memory is host memory between guard pages; a stream runs
// its work in order when it is submitted; module images are matched to the
// kernels compiled for the host by name; a captured stream records graph
// nodes that a graph launch replays. Anything else fails loudly, naming the
// entry point.
#include <cuda.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "runtime.h"
#include "stream.h"

struct CUctx_st {};
struct CUstream_st {
  CUgraph capture = nullptr;
  CUstreamCaptureMode mode = CU_STREAM_CAPTURE_MODE_GLOBAL;
};
struct CUmod_st {};
struct CUfunc_st {
  const emu::Kernel* kernel;
  size_t max_dynamic_shared = emu::DEFAULT_DYNAMIC_SHARED;
};
struct CUgraph_st {
  std::vector<emu::Operation> nodes;
};
struct CUgraphExec_st {
  std::vector<emu::Operation> nodes;
};
struct CUevent_st {
  std::chrono::steady_clock::time_point at;
  bool recorded = false;
};

namespace {

constexpr int SMS = 132;
constexpr size_t TOTAL_MEMORY = size_t(80) << 30;
constexpr size_t PAGE = 4096;
// Allocations start 16-byte aligned (what vector loads need) and end as
// close to a guard page as that allows; the few bytes between are a canary.
constexpr size_t ALIGN = 16;
constexpr unsigned char CANARY = 0xA5;

CUctx_st primary_context;
thread_local CUcontext current_context = nullptr;
// Captures begun by this thread in thread-local mode: they forbid this
// thread's allocations.
thread_local size_t thread_captures = 0;
std::atomic<bool> initialised{false};

struct Allocation {
  char* mapping;
  size_t mapping_bytes;
  size_t bytes;
  char* end() const { return mapping + mapping_bytes - PAGE; }
};

// Device memory, by start address.
struct Memory {
  std::mutex mutex;
  std::map<uintptr_t, Allocation> allocations;
  size_t used = 0;
  // Captures that forbid allocations on every thread (global mode).
  size_t global_captures = 0;

  const Allocation* find(uintptr_t address) {
    auto it = allocations.upper_bound(address);
    if (it == allocations.begin()) return nullptr;
    --it;
    return address < it->first + it->second.bytes ? &it->second : nullptr;
  }

  // The first allocation whose canary a kernel overwrote, if any.
  const Allocation* corrupted() {
    for (auto& [start, a] : allocations)
      for (char* p = reinterpret_cast<char*>(start) + a.bytes; p < a.end(); ++p)
        if (static_cast<unsigned char>(*p) != CANARY) return &a;
    return nullptr;
  }
};

Memory& memory() {
  static Memory* m = new Memory;  // never destroyed: cudarc frees at exit
  return *m;
}

// Host memory the OS can still give, so that "free device memory" is honest.
size_t available_host_memory() {
  std::ifstream meminfo("/proc/meminfo");
  std::string key;
  size_t kib = 0;
  while (meminfo >> key >> kib) {
    if (key == "MemAvailable:") return kib * 1024;
    meminfo.ignore(256, '\n');
  }
  return TOTAL_MEMORY;
}

// A segmentation fault in a guard page is a kernel's (or a copy's) access
// out of bounds: say where, then die like a device with an illegal address.
struct sigaction previous_segv;

void on_segv(int signal, siginfo_t* info, void* context) {
  const uintptr_t address = reinterpret_cast<uintptr_t>(info->si_addr);
  for (auto& [start, a] : memory().allocations) {
    const uintptr_t lo = reinterpret_cast<uintptr_t>(a.mapping), hi = lo + a.mapping_bytes;
    if (address < lo || address >= hi) continue;
    char text[256];
    const long offset = (long)(address - start);
    const char* kernel = emu::running_kernel();
    const int n = std::snprintf(
        text, sizeof text,
        "dllm emulated device: illegal address in %s%s: byte %ld of a %zu-byte allocation "
        "(%s its end)\n",
        kernel ? "kernel " : "a host copy", kernel ? kernel : "", offset, a.bytes,
        offset < 0 ? "before" : "past");
    [[maybe_unused]] ssize_t written = write(2, text, (size_t)n);
    std::abort();
  }
  // Not ours: let the previous handler (Rust's stack-overflow report) act.
  sigaction(SIGSEGV, &previous_segv, nullptr);
  (void)signal;
  (void)context;
}

void install_segv_handler() {
  static std::once_flag once;
  std::call_once(once, [] {
    static char alternate[64 * 1024];
    stack_t stack{};
    stack.ss_sp = alternate;
    stack.ss_size = sizeof alternate;
    sigaltstack(&stack, nullptr);
    struct sigaction action {};
    action.sa_sigaction = on_segv;
    action.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigaction(SIGSEGV, &action, &previous_segv);
  });
}

CUresult allocate(CUdeviceptr* out, size_t bytes, const char* entry_point) {
  Memory& m = memory();
  std::lock_guard<std::mutex> lock(m.mutex);
  if (m.global_captures || thread_captures)
    return emu::fail(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, entry_point,
                     "allocation while a stream is capturing a graph");
  const size_t padded = (std::max<size_t>(bytes, 1) + ALIGN - 1) / ALIGN * ALIGN;
  const size_t body = (padded + PAGE - 1) / PAGE * PAGE;
  if (m.used + body > TOTAL_MEMORY) return CUDA_ERROR_OUT_OF_MEMORY;
  void* p = mmap(nullptr, body + 2 * PAGE, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
  char* mapping = static_cast<char*>(p);
  mprotect(mapping, PAGE, PROT_NONE);
  mprotect(mapping + PAGE + body, PAGE, PROT_NONE);
  Allocation a{mapping, body + 2 * PAGE, bytes};
  char* start = a.end() - padded;
  std::memset(start + bytes, CANARY, padded - bytes);
  m.allocations.emplace(reinterpret_cast<uintptr_t>(start), a);
  m.used += body;
  *out = reinterpret_cast<CUdeviceptr>(start);
  return CUDA_SUCCESS;
}

CUresult release(CUdeviceptr ptr, const char* entry_point) {
  Memory& m = memory();
  std::lock_guard<std::mutex> lock(m.mutex);
  auto it = m.allocations.find(ptr);
  if (it == m.allocations.end())
    return emu::fail(CUDA_ERROR_INVALID_VALUE, entry_point, "not the start of an allocation");
  const Allocation a = it->second;
  m.allocations.erase(it);
  m.used -= a.mapping_bytes - 2 * PAGE;
  munmap(a.mapping, a.mapping_bytes);
  return CUDA_SUCCESS;
}

// A host-side copy or fill touching device memory checks its range first,
// as the real driver does.
CUresult check_range(CUdeviceptr ptr, size_t bytes, const char* entry_point) {
  if (bytes == 0 || emu::is_device_range(reinterpret_cast<const void*>(ptr), bytes))
    return CUDA_SUCCESS;
  return emu::fail(CUDA_ERROR_INVALID_VALUE, entry_point,
                   std::to_string(bytes) + " bytes at " + std::to_string(ptr) +
                       " are not inside one device allocation");
}

CUresult copy(void* dst, const void* src, size_t bytes) {
  std::memcpy(dst, src, bytes);
  return CUDA_SUCCESS;
}

// Work that only makes sense outside a capture (the host waits for it).
CUresult not_while_capturing(CUstream stream, const char* entry_point) {
  if (stream && stream->capture)
    return emu::fail(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, entry_point,
                     "the stream is capturing a graph");
  return CUDA_SUCCESS;
}

CUresult launch(const emu::Launch& l) {
  const std::string error = emu::run(l);
  if (!error.empty()) return emu::fail(CUDA_ERROR_LAUNCH_FAILED, l.kernel->name, error);
  Memory& m = memory();
  std::lock_guard<std::mutex> lock(m.mutex);
  if (const Allocation* a = m.corrupted())
    return emu::fail(CUDA_ERROR_ILLEGAL_ADDRESS, l.kernel->name,
                     "wrote past the end of a " + std::to_string(a->bytes) + "-byte allocation");
  return CUDA_SUCCESS;
}

std::string dims(unsigned x, unsigned y, unsigned z) {
  return "(" + std::to_string(x) + ", " + std::to_string(y) + ", " + std::to_string(z) + ")";
}

}  // namespace

namespace emu {

CUresult fail(CUresult code, const char* entry_point, const std::string& why) {
  std::fprintf(stderr, "dllm emulated device: %s: %s\n", entry_point, why.c_str());
  return code;
}

CUresult submit(CUstream stream, Operation op) {
  if (stream && stream->capture) {
    stream->capture->nodes.push_back(std::move(op));
    return CUDA_SUCCESS;
  }
  return op();
}

bool is_device_range(const void* address, size_t bytes) {
  Memory& m = memory();
  std::lock_guard<std::mutex> lock(m.mutex);
  const uintptr_t start = reinterpret_cast<uintptr_t>(address);
  const Allocation* a = m.find(start);
  if (!a) return false;
  auto it = m.allocations.upper_bound(start);
  --it;
  return start + bytes <= it->first + a->bytes;
}

}  // namespace emu

// Initialisation, device and context.

CUresult cuInit(unsigned int flags) {
  if (flags != 0) return emu::fail(CUDA_ERROR_INVALID_VALUE, "cuInit", "flags must be 0");
  install_segv_handler();
  initialised = true;
  return CUDA_SUCCESS;
}

CUresult cuDriverGetVersion(int* version) {
  *version = CUDA_VERSION;
  return CUDA_SUCCESS;
}

CUresult cuDeviceGetCount(int* count) {
  *count = 1;
  return initialised ? CUDA_SUCCESS : CUDA_ERROR_NOT_INITIALIZED;
}

CUresult cuDeviceGet(CUdevice* device, int ordinal) {
  if (!initialised) return CUDA_ERROR_NOT_INITIALIZED;
  if (ordinal != 0) return CUDA_ERROR_INVALID_DEVICE;
  *device = 0;
  return CUDA_SUCCESS;
}

CUresult cuDeviceGetName(char* name, int len, CUdevice) {
  std::snprintf(name, (size_t)len, "dllm emulated device (H100 limits, on the host CPU)");
  return CUDA_SUCCESS;
}

CUresult cuDeviceTotalMem(size_t* bytes, CUdevice) {
  *bytes = TOTAL_MEMORY;
  return CUDA_SUCCESS;
}

CUresult cuDeviceGetAttribute(int* value, CUdevice_attribute attribute, CUdevice) {
  switch (attribute) {
    case CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: *value = SMS; break;
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: *value = 9; break;
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: *value = 0; break;
    case CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED: *value = 1; break;
    case CU_DEVICE_ATTRIBUTE_WARP_SIZE: *value = 32; break;
    case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK: *value = (int)emu::MAX_THREADS_PER_BLOCK; break;
    case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK:
      *value = (int)emu::DEFAULT_DYNAMIC_SHARED;
      break;
    case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN:
      *value = (int)emu::MAX_OPT_IN_SHARED;
      break;
    default:
      return emu::fail(CUDA_ERROR_INVALID_VALUE, "cuDeviceGetAttribute",
                       "attribute " + std::to_string((int)attribute) + " is not emulated");
  }
  return CUDA_SUCCESS;
}

CUresult cuDevicePrimaryCtxRetain(CUcontext* context, CUdevice device) {
  if (device != 0) return CUDA_ERROR_INVALID_DEVICE;
  *context = &primary_context;
  return CUDA_SUCCESS;
}

CUresult cuDevicePrimaryCtxRelease(CUdevice device) {
  return device == 0 ? CUDA_SUCCESS : CUDA_ERROR_INVALID_DEVICE;
}

CUresult cuCtxSetCurrent(CUcontext context) {
  current_context = context;
  return CUDA_SUCCESS;
}

CUresult cuCtxGetCurrent(CUcontext* context) {
  *context = current_context;
  return CUDA_SUCCESS;
}

CUresult cuCtxSynchronize() { return CUDA_SUCCESS; }

// Memory.

CUresult cuMemGetInfo(size_t* free, size_t* total) {
  Memory& m = memory();
  std::lock_guard<std::mutex> lock(m.mutex);
  *total = TOTAL_MEMORY;
  *free = std::min(TOTAL_MEMORY - m.used, available_host_memory());
  return CUDA_SUCCESS;
}

CUresult cuMemAlloc(CUdeviceptr* ptr, size_t bytes) { return allocate(ptr, bytes, "cuMemAlloc"); }

CUresult cuMemAllocAsync(CUdeviceptr* ptr, size_t bytes, CUstream) {
  return allocate(ptr, bytes, "cuMemAllocAsync");
}

CUresult cuMemFree(CUdeviceptr ptr) { return release(ptr, "cuMemFree"); }

CUresult cuMemFreeAsync(CUdeviceptr ptr, CUstream stream) {
  if (CUresult r = not_while_capturing(stream, "cuMemFreeAsync")) return r;
  return release(ptr, "cuMemFreeAsync");
}

CUresult cuMemsetD8Async(CUdeviceptr ptr, unsigned char value, size_t n, CUstream stream) {
  if (CUresult r = check_range(ptr, n, "cuMemsetD8Async")) return r;
  return emu::submit(stream, [=] {
    std::memset(reinterpret_cast<void*>(ptr), value, n);
    return CUDA_SUCCESS;
  });
}

CUresult cuMemsetD8(CUdeviceptr ptr, unsigned char value, size_t n) {
  return cuMemsetD8Async(ptr, value, n, nullptr);
}

CUresult cuMemcpyHtoDAsync(CUdeviceptr dst, const void* src, size_t bytes, CUstream stream) {
  if (CUresult r = check_range(dst, bytes, "cuMemcpyHtoDAsync")) return r;
  return emu::submit(stream, [=] { return copy(reinterpret_cast<void*>(dst), src, bytes); });
}

CUresult cuMemcpyHtoD(CUdeviceptr dst, const void* src, size_t bytes) {
  return cuMemcpyHtoDAsync(dst, src, bytes, nullptr);
}

CUresult cuMemcpyDtoHAsync(void* dst, CUdeviceptr src, size_t bytes, CUstream stream) {
  if (CUresult r = check_range(src, bytes, "cuMemcpyDtoHAsync")) return r;
  return emu::submit(stream, [=] { return copy(dst, reinterpret_cast<const void*>(src), bytes); });
}

CUresult cuMemcpyDtoH(void* dst, CUdeviceptr src, size_t bytes) {
  return cuMemcpyDtoHAsync(dst, src, bytes, nullptr);
}

CUresult cuMemcpyDtoDAsync(CUdeviceptr dst, CUdeviceptr src, size_t bytes, CUstream stream) {
  if (CUresult r = check_range(dst, bytes, "cuMemcpyDtoDAsync")) return r;
  if (CUresult r = check_range(src, bytes, "cuMemcpyDtoDAsync")) return r;
  return emu::submit(stream, [=] {
    return copy(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), bytes);
  });
}

CUresult cuMemcpyDtoD(CUdeviceptr dst, CUdeviceptr src, size_t bytes) {
  return cuMemcpyDtoDAsync(dst, src, bytes, nullptr);
}

// Streams and events.

CUresult cuStreamCreate(CUstream* stream, unsigned int) {
  *stream = new CUstream_st;
  return CUDA_SUCCESS;
}

CUresult cuStreamDestroy(CUstream stream) {
  if (stream->capture)
    return emu::fail(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, "cuStreamDestroy",
                     "the stream is capturing a graph");
  delete stream;
  return CUDA_SUCCESS;
}

CUresult cuStreamSynchronize(CUstream stream) {
  return not_while_capturing(stream, "cuStreamSynchronize");
}

CUresult cuEventCreate(CUevent* event, unsigned int) {
  *event = new CUevent_st;
  return CUDA_SUCCESS;
}

CUresult cuEventDestroy(CUevent event) {
  delete event;
  return CUDA_SUCCESS;
}

CUresult cuEventRecord(CUevent event, CUstream stream) {
  return emu::submit(stream, [=] {
    event->at = std::chrono::steady_clock::now();
    event->recorded = true;
    return CUDA_SUCCESS;
  });
}

CUresult cuEventSynchronize(CUevent) { return CUDA_SUCCESS; }

CUresult cuEventQuery(CUevent) { return CUDA_SUCCESS; }

CUresult cuStreamWaitEvent(CUstream, CUevent, unsigned int) { return CUDA_SUCCESS; }

CUresult cuEventElapsedTime(float* ms, CUevent start, CUevent end) {
  if (!start->recorded || !end->recorded) return CUDA_ERROR_INVALID_HANDLE;
  *ms = std::chrono::duration<float, std::milli>(end->at - start->at).count();
  return CUDA_SUCCESS;
}

// Modules and launches.

CUresult cuModuleLoadData(CUmodule* module, const void* image) {
  if (!image) return emu::fail(CUDA_ERROR_INVALID_VALUE, "cuModuleLoadData", "no image");
  *module = new CUmod_st;
  return CUDA_SUCCESS;
}

CUresult cuModuleUnload(CUmodule module) {
  delete module;
  return CUDA_SUCCESS;
}

CUresult cuModuleGetFunction(CUfunction* function, CUmodule, const char* name) {
  const emu::Kernel* kernel = emu::find_kernel(name);
  if (!kernel)
    return emu::fail(CUDA_ERROR_NOT_FOUND, "cuModuleGetFunction",
                     std::string("no kernel named ") + name + " was compiled for the host");
  *function = new CUfunc_st{kernel};
  return CUDA_SUCCESS;
}

CUresult cuFuncSetAttribute(CUfunction function, CUfunction_attribute attribute, int value) {
  if (attribute != CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES)
    return emu::fail(CUDA_ERROR_INVALID_VALUE, "cuFuncSetAttribute",
                     "attribute " + std::to_string((int)attribute) + " is not emulated");
  if (value < 0 || (size_t)value > emu::MAX_OPT_IN_SHARED)
    return emu::fail(CUDA_ERROR_INVALID_VALUE, "cuFuncSetAttribute",
                     std::to_string(value) + " bytes of dynamic shared memory exceed the " +
                         std::to_string(emu::MAX_OPT_IN_SHARED) + " of an H100");
  function->max_dynamic_shared = (size_t)value;
  return CUDA_SUCCESS;
}

CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                        unsigned by, unsigned bz, unsigned shared, CUstream stream,
                        void** params, void** extra) {
  const std::string where = std::string("cuLaunchKernel(") + f->kernel->name + ")";
  const auto bad = [&](const std::string& why) {
    return emu::fail(CUDA_ERROR_INVALID_VALUE, where.c_str(), why);
  };
  if (extra) return bad("the `extra` parameter form is not emulated");
  const unsigned block[3] = {bx, by, bz}, grid[3] = {gx, gy, gz};
  for (int i = 0; i < 3; ++i) {
    if (block[i] == 0 || block[i] > emu::MAX_BLOCK_DIM[i])
      return bad("block " + dims(bx, by, bz) + " exceeds the limits " +
                 dims(emu::MAX_BLOCK_DIM[0], emu::MAX_BLOCK_DIM[1], emu::MAX_BLOCK_DIM[2]));
    if (grid[i] == 0 || grid[i] > emu::MAX_GRID_DIM[i])
      return bad("grid " + dims(gx, gy, gz) + " exceeds the limits " +
                 dims(emu::MAX_GRID_DIM[0], emu::MAX_GRID_DIM[1], emu::MAX_GRID_DIM[2]));
  }
  if ((size_t)bx * by * bz > emu::MAX_THREADS_PER_BLOCK)
    return bad(std::to_string((size_t)bx * by * bz) + " threads per block exceed the " +
               std::to_string(emu::MAX_THREADS_PER_BLOCK) + " of an H100");
  if (shared > f->max_dynamic_shared)
    return bad(std::to_string(shared) + " bytes of dynamic shared memory exceed the " +
               std::to_string(f->max_dynamic_shared) +
               (f->max_dynamic_shared == emu::DEFAULT_DYNAMIC_SHARED
                    ? " allowed without CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES"
                    : " set for the kernel"));
  const emu::Kernel* kernel = f->kernel;
  const dim3 g(gx, gy, gz), b(bx, by, bz);
  if (!(stream && stream->capture)) return launch(emu::Launch{kernel, params, g, b, shared});
  // A captured launch keeps copies of its arguments, as a graph's kernel node does.
  std::vector<std::vector<char>> copies;
  for (size_t i = 0; i < kernel->param_sizes.size(); ++i) {
    const char* p = static_cast<const char*>(params[i]);
    copies.emplace_back(p, p + kernel->param_sizes[i]);
  }
  auto args = std::make_shared<std::vector<std::vector<char>>>(std::move(copies));
  return emu::submit(stream, [=] {
    std::vector<void*> pointers;
    for (auto& a : *args) pointers.push_back(a.data());
    return launch(emu::Launch{kernel, pointers.data(), g, b, shared});
  });
}

// Graphs.

// Which captures forbid allocations: global ones on every thread,
// thread-local ones on the thread that began them, relaxed ones on none.
static void count_capture(CUstreamCaptureMode mode, int delta) {
  if (mode == CU_STREAM_CAPTURE_MODE_THREAD_LOCAL) {
    thread_captures += delta;
  } else if (mode == CU_STREAM_CAPTURE_MODE_GLOBAL) {
    std::lock_guard<std::mutex> lock(memory().mutex);
    memory().global_captures += delta;
  }
}

CUresult cuStreamBeginCapture(CUstream stream, CUstreamCaptureMode mode) {
  if (!stream)
    return emu::fail(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, "cuStreamBeginCapture",
                     "the legacy default stream cannot capture");
  if (stream->capture)
    return emu::fail(CUDA_ERROR_ILLEGAL_STATE, "cuStreamBeginCapture", "already capturing");
  stream->capture = new CUgraph_st;
  stream->mode = mode;
  count_capture(mode, 1);
  return CUDA_SUCCESS;
}

CUresult cuStreamEndCapture(CUstream stream, CUgraph* graph) {
  if (!stream || !stream->capture)
    return emu::fail(CUDA_ERROR_ILLEGAL_STATE, "cuStreamEndCapture", "the stream is not capturing");
  *graph = stream->capture;
  stream->capture = nullptr;
  count_capture(stream->mode, -1);
  return CUDA_SUCCESS;
}

CUresult cuStreamIsCapturing(CUstream stream, CUstreamCaptureStatus* status) {
  *status = stream && stream->capture ? CU_STREAM_CAPTURE_STATUS_ACTIVE
                                      : CU_STREAM_CAPTURE_STATUS_NONE;
  return CUDA_SUCCESS;
}

CUresult cuGraphInstantiateWithFlags(CUgraphExec* exec, CUgraph graph, unsigned long long) {
  *exec = new CUgraphExec_st{graph->nodes};
  return CUDA_SUCCESS;
}

CUresult cuGraphLaunch(CUgraphExec exec, CUstream stream) {
  if (CUresult r = not_while_capturing(stream, "cuGraphLaunch")) return r;
  for (emu::Operation& node : exec->nodes)
    if (CUresult r = node()) return r;
  return CUDA_SUCCESS;
}

CUresult cuGraphExecDestroy(CUgraphExec exec) {
  delete exec;
  return CUDA_SUCCESS;
}

CUresult cuGraphDestroy(CUgraph graph) {
  delete graph;
  return CUDA_SUCCESS;
}

// Errors.

CUresult cuGetErrorName(CUresult code, const char** name) {
  switch (code) {
#define NAME(c) \
  case c:       \
    *name = #c; \
    return CUDA_SUCCESS;
    NAME(CUDA_SUCCESS)
    NAME(CUDA_ERROR_INVALID_VALUE)
    NAME(CUDA_ERROR_OUT_OF_MEMORY)
    NAME(CUDA_ERROR_NOT_INITIALIZED)
    NAME(CUDA_ERROR_INVALID_DEVICE)
    NAME(CUDA_ERROR_INVALID_HANDLE)
    NAME(CUDA_ERROR_ILLEGAL_STATE)
    NAME(CUDA_ERROR_NOT_FOUND)
    NAME(CUDA_ERROR_ILLEGAL_ADDRESS)
    NAME(CUDA_ERROR_LAUNCH_FAILED)
    NAME(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED)
#undef NAME
    default:
      *name = "CUDA_ERROR_UNKNOWN";
      return CUDA_ERROR_INVALID_VALUE;
  }
}

// The names say it; the details went to stderr when the error happened.
CUresult cuGetErrorString(CUresult code, const char** text) { return cuGetErrorName(code, text); }
