// Work submitted to an emulated stream: run at once, or recorded into the
// graph the stream is capturing. Shared by the driver and cuBLASLt emulations.
#pragma once

#include <cuda.h>

#include <functional>
#include <string>

namespace emu {

using Operation = std::function<CUresult()>;

// Runs `op` now (the emulated device executes a stream's work in order, at
// submission), or appends it to the graph `stream` is capturing.
__attribute__((visibility("default"))) CUresult submit(CUstream stream, Operation op);

// Whether [address, address + bytes) lies inside one device allocation.
__attribute__((visibility("default"))) bool is_device_range(const void* address, size_t bytes);

// Reports an unsupported or invalid use of an entry point on stderr and
// returns `code`: the emulation fails loudly, never silently.
__attribute__((visibility("default"))) CUresult fail(CUresult code, const char* entry_point,
                                                     const std::string& why);

}  // namespace emu
