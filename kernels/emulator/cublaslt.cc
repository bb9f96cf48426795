// The cuBLASLt entry points the backend calls, answered on the host:
// D = alpha op(A) op(B) + beta C for column-major bf16 or f32 A and B, f32 C
// and D, f32 compute and scale, host-pointer alpha/beta, the default
// epilogue, no batches. The descriptors are read exactly as cuBLASLt reads
// them, so a wrong transpose, leading dimension, type or beta in the backend
// gives a wrong result here too. Operands are widened to f32 and multiplied
// by the GEMM the loading program registers (dllm_emu_set_sgemm: the
// `matrixmultiply` crate), since bf16 products are exact in f32. Any other
// setting fails with CUBLAS_STATUS_NOT_SUPPORTED, naming it.
#include <cstddef>
#include <cstdint>
#include <algorithm>
#include <atomic>
#include <cstring>
#include <string>
#include <vector>

#include "stream.h"

namespace {

enum Status {
  SUCCESS = 0,
  NOT_INITIALIZED = 1,
  INVALID_VALUE = 7,
  EXECUTION_FAILED = 13,
  NOT_SUPPORTED = 15,
};
enum DataType { R_32F = 0, R_16BF = 14 };
constexpr int COMPUTE_32F = 68;
enum DescAttribute { COMPUTE_TYPE = 0, SCALE_TYPE = 1, POINTER_MODE = 2, TRANSA = 3, TRANSB = 4,
                     TRANSC = 5, EPILOGUE = 7 };
enum LayoutAttribute { LAYOUT_TYPE = 0, ORDER = 1, ROWS = 2, COLS = 3, LD = 4, BATCH_COUNT = 5 };
constexpr int PREF_MAX_WORKSPACE_BYTES = 1;
constexpr int EPILOGUE_DEFAULT = 1;
constexpr int OP_N = 0, OP_T = 1;
// The CUDA 13.0 library this emulates (cublasLtGetVersion's encoding).
constexpr size_t VERSION = 130000;

using Sgemm = void (*)(size_t m, size_t k, size_t n, float alpha, const float* a, ptrdiff_t rsa,
                       ptrdiff_t csa, const float* b, ptrdiff_t rsb, ptrdiff_t csb, float beta,
                       float* c, ptrdiff_t rsc, ptrdiff_t csc);
// Set once by the loading program, read by every thread that multiplies.
std::atomic<Sgemm> sgemm{nullptr};

Status fail(Status status, const char* entry_point, const std::string& why) {
  emu::fail(CUDA_ERROR_INVALID_VALUE, entry_point, why);
  return status;
}

}  // namespace

struct Handle {};
struct MatmulDesc {
  int compute, scale, transa = OP_N, transb = OP_N;
};
struct Layout {
  int type;
  uint64_t rows, cols;
  int64_t ld;
  // Elements from the first to one past the last.
  uint64_t extent() const { return cols == 0 ? 0 : ld * (cols - 1) + rows; }
  size_t element_bytes() const { return type == R_16BF ? 2 : 4; }
};
struct Preference {
  size_t max_workspace = 0;
};
// What the heuristic returns: the shape it chose for, checked at the call.
struct Algo {
  uint64_t m, n, k, magic;
  uint64_t unused[4];
};
constexpr uint64_t ALGO_MAGIC = 0x646c6c6d656d75;  // "dllmemu"
struct HeuristicResult {
  Algo algo;
  size_t workspace_size;
  int state;
  float waves;
  int reserved[4];
};

extern "C" {

// The loading program's GEMM, with the signature of Sgemm.
__attribute__((visibility("default"))) void dllm_emu_set_sgemm(const void* gemm) {
  sgemm = reinterpret_cast<Sgemm>(gemm);
}

size_t cublasLtGetVersion() { return VERSION; }

Status cublasLtCreate(Handle** handle) {
  *handle = new Handle;
  return SUCCESS;
}

Status cublasLtDestroy(Handle* handle) {
  delete handle;
  return SUCCESS;
}

Status cublasLtMatmulDescCreate(MatmulDesc** desc, int compute, int scale) {
  if (compute != COMPUTE_32F || scale != R_32F)
    return fail(NOT_SUPPORTED, "cublasLtMatmulDescCreate",
                "compute type " + std::to_string(compute) + " with scale type " +
                    std::to_string(scale) + " (only CUBLAS_COMPUTE_32F with CUDA_R_32F)");
  *desc = new MatmulDesc{compute, scale};
  return SUCCESS;
}

Status cublasLtMatmulDescDestroy(MatmulDesc* desc) {
  delete desc;
  return SUCCESS;
}

Status cublasLtMatmulDescSetAttribute(MatmulDesc* desc, int attribute, const void* value,
                                      size_t size) {
  int32_t v = 0;
  if (size != sizeof v)
    return fail(INVALID_VALUE, "cublasLtMatmulDescSetAttribute",
                "attribute " + std::to_string(attribute) + " given " + std::to_string(size) +
                    " bytes");
  std::memcpy(&v, value, sizeof v);
  switch (attribute) {
    case TRANSA:
    case TRANSB:
      if (v != OP_N && v != OP_T)
        return fail(NOT_SUPPORTED, "cublasLtMatmulDescSetAttribute",
                    "operation " + std::to_string(v) + " (only N and T)");
      (attribute == TRANSA ? desc->transa : desc->transb) = v;
      return SUCCESS;
    case POINTER_MODE:
    case EPILOGUE:
    case TRANSC:
      if (v == (attribute == EPILOGUE ? EPILOGUE_DEFAULT : 0)) return SUCCESS;
      break;
    default:
      break;
  }
  return fail(NOT_SUPPORTED, "cublasLtMatmulDescSetAttribute",
              "attribute " + std::to_string(attribute) + " = " + std::to_string(v) +
                  " is not emulated");
}

Status cublasLtMatrixLayoutCreate(Layout** layout, int type, uint64_t rows, uint64_t cols,
                                  int64_t ld) {
  if (type != R_16BF && type != R_32F)
    return fail(NOT_SUPPORTED, "cublasLtMatrixLayoutCreate",
                "data type " + std::to_string(type) + " (only CUDA_R_16BF and CUDA_R_32F)");
  if (ld < (int64_t)std::max<uint64_t>(rows, 1))
    return fail(INVALID_VALUE, "cublasLtMatrixLayoutCreate",
                "leading dimension " + std::to_string(ld) + " below " + std::to_string(rows) +
                    " rows");
  *layout = new Layout{type, rows, cols, ld};
  return SUCCESS;
}

Status cublasLtMatrixLayoutDestroy(Layout* layout) {
  delete layout;
  return SUCCESS;
}

Status cublasLtMatrixLayoutSetAttribute(Layout*, int attribute, const void*, size_t) {
  return fail(NOT_SUPPORTED, "cublasLtMatrixLayoutSetAttribute",
              "attribute " + std::to_string(attribute) +
                  " is not emulated (column-major, no batches)");
}

Status cublasLtMatmulPreferenceCreate(Preference** preference) {
  *preference = new Preference;
  return SUCCESS;
}

Status cublasLtMatmulPreferenceDestroy(Preference* preference) {
  delete preference;
  return SUCCESS;
}

Status cublasLtMatmulPreferenceSetAttribute(Preference* preference, int attribute,
                                            const void* value, size_t size) {
  if (attribute != PREF_MAX_WORKSPACE_BYTES || size != sizeof(uint64_t))
    return fail(NOT_SUPPORTED, "cublasLtMatmulPreferenceSetAttribute",
                "attribute " + std::to_string(attribute) + " is not emulated");
  std::memcpy(&preference->max_workspace, value, sizeof(uint64_t));
  return SUCCESS;
}

}  // extern "C"

namespace {

// The (m, n, k) of D = op(A) op(B), after checking that the layouts agree.
Status shape(const MatmulDesc* d, const Layout* a, const Layout* b, const Layout* c,
             const Layout* dl, const char* entry_point, uint64_t* m, uint64_t* n, uint64_t* k) {
  const uint64_t am = d->transa == OP_T ? a->cols : a->rows, ak = d->transa == OP_T ? a->rows : a->cols;
  const uint64_t bk = d->transb == OP_T ? b->cols : b->rows, bn = d->transb == OP_T ? b->rows : b->cols;
  if (ak != bk || c->rows != am || c->cols != bn || dl->rows != am || dl->cols != bn)
    return fail(INVALID_VALUE, entry_point,
                "op(A) is " + std::to_string(am) + "x" + std::to_string(ak) + ", op(B) " +
                    std::to_string(bk) + "x" + std::to_string(bn) + ", C " +
                    std::to_string(c->rows) + "x" + std::to_string(c->cols) + ", D " +
                    std::to_string(dl->rows) + "x" + std::to_string(dl->cols));
  if (c->type != R_32F || dl->type != R_32F || a->type != b->type || c->ld != dl->ld)
    return fail(NOT_SUPPORTED, entry_point,
                "only equal A and B types with f32 C and D of one leading dimension");
  *m = am;
  *n = bn;
  *k = ak;
  return SUCCESS;
}

// The operand widened to f32, in its own layout.
std::vector<float> widen(const void* data, const Layout* l) {
  std::vector<float> out(l->extent());
  if (l->type == R_32F) {
    std::memcpy(out.data(), data, out.size() * 4);
  } else {
    const uint16_t* bits = static_cast<const uint16_t*>(data);
    for (size_t i = 0; i < out.size(); ++i) {
      const uint32_t w = (uint32_t)bits[i] << 16;
      std::memcpy(&out[i], &w, 4);
    }
  }
  return out;
}

}  // namespace

extern "C" {

Status cublasLtMatmulAlgoGetHeuristic(Handle*, MatmulDesc* desc, Layout* a, Layout* b, Layout* c,
                                      Layout* d, Preference*, int requested,
                                      HeuristicResult* results, int* count) {
  uint64_t m, n, k;
  if (Status s = shape(desc, a, b, c, d, "cublasLtMatmulAlgoGetHeuristic", &m, &n, &k)) return s;
  *count = 0;
  if (requested < 1) return SUCCESS;
  results[0] = HeuristicResult{Algo{m, n, k, ALGO_MAGIC, {}}, 0, SUCCESS, 1.f, {}};
  *count = 1;
  return SUCCESS;
}

Status cublasLtMatmul(Handle*, MatmulDesc* desc, const float* alpha, const void* A,
                      Layout* a, const void* B, Layout* b, const float* beta, const void* C,
                      Layout* c, void* D, Layout* d, const Algo* algo, void* workspace,
                      size_t workspace_bytes, CUstream stream) {
  const char* entry = "cublasLtMatmul";
  const Sgemm gemm = sgemm.load();
  if (!gemm) return fail(NOT_INITIALIZED, entry, "no host GEMM was registered");
  uint64_t m, n, k;
  if (Status s = shape(desc, a, b, c, d, entry, &m, &n, &k)) return s;
  if (!algo || algo->magic != ALGO_MAGIC || algo->m != m || algo->n != n || algo->k != k)
    return fail(INVALID_VALUE, entry, "the algorithm was not chosen for this shape");
  const struct {
    const void* p;
    const Layout* l;
    const char* name;
  } operands[] = {{A, a, "A"}, {B, b, "B"}, {C, c, "C"}, {D, d, "D"}};
  for (const auto& o : operands)
    if (!emu::is_device_range(o.p, o.l->extent() * o.l->element_bytes()))
      return fail(INVALID_VALUE, entry,
                  std::string(o.name) + " does not hold its layout's " +
                      std::to_string(o.l->extent()) + " elements in one device allocation");
  if (workspace_bytes && !emu::is_device_range(workspace, workspace_bytes))
    return fail(INVALID_VALUE, entry, "the workspace is not device memory of its size");
  const float al = *alpha, be = *beta;  // host pointer mode: read at the call
  const MatmulDesc op = *desc;
  const Layout la = *a, lb = *b, lc = *c;
  const CUresult r = emu::submit(stream, [=]() -> CUresult {
    const std::vector<float> a32 = widen(A, &la), b32 = widen(B, &lb);
    float* out = static_cast<float*>(D);
    if (C != D && be != 0.f)
      for (uint64_t j = 0; j < n; ++j)
        std::memcpy(out + j * lc.ld, static_cast<const float*>(C) + j * lc.ld, m * 4);
    // Strides of op(A) (m x k) and op(B) (k x n) over column-major storage.
    const ptrdiff_t lda = la.ld, ldb = lb.ld, ldc = lc.ld;
    const bool ta = op.transa == OP_T, tb = op.transb == OP_T;
    gemm(m, k, n, al, a32.data(), ta ? lda : 1, ta ? 1 : lda, b32.data(), tb ? ldb : 1,
          tb ? 1 : ldb, be, out, 1, ldc);
    return CUDA_SUCCESS;
  });
  return r == CUDA_SUCCESS ? SUCCESS : EXECUTION_FAILED;
}

}  // extern "C"
