// A bfloat16 matmul for XLA:CPU through PyTorch's oneDNN: an XLA FFI handler
// (genflax/models/onednn.py builds and registers it). at::mm on bfloat16 runs
// oneDNN's matmul, which uses the CPU's AVX512-BF16 or AMX units, and
// accumulates in float32. The buffers are XLA's own, wrapped without copies.
#include <cstdint>

#include <ATen/ATen.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// out [M, N] = op(a) @ op(b) in bfloat16. a: [..., K] (its leading axes are the
// M rows) or, transposed, [K, M]; b: [K, N] or, transposed, [N, K].
static ffi::Error Matmul(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> out,
                         bool transpose_a, bool transpose_b) {
  auto ad = a.dimensions(), bd = b.dimensions();
  if (bd.size() != 2 || (transpose_a && ad.size() != 2) || ad.size() < 1) {
    return ffi::Error::InvalidArgument("onednn_matmul: b and a transposed a must be 2-D");
  }
  int64_t k = transpose_a ? ad[0] : ad[ad.size() - 1];
  int64_t m = transpose_a ? ad[1] : 1;
  if (!transpose_a) {
    for (size_t i = 0; i + 1 < ad.size(); ++i) m *= ad[i];
  }
  int64_t n = transpose_b ? bd[0] : bd[1];
  if ((transpose_b ? bd[1] : bd[0]) != k) {
    return ffi::Error::InvalidArgument("onednn_matmul: the contracted sizes differ");
  }
  auto bf16 = at::TensorOptions().dtype(at::kBFloat16);
  at::Tensor lhs = transpose_a ? at::from_blob(a.untyped_data(), {k, m}, bf16).t()
                               : at::from_blob(a.untyped_data(), {m, k}, bf16);
  at::Tensor rhs = transpose_b ? at::from_blob(b.untyped_data(), {n, k}, bf16).t()
                               : at::from_blob(b.untyped_data(), {k, n}, bf16);
  at::Tensor result = at::from_blob(out->untyped_data(), {m, n}, bf16);
  at::mm_out(result, lhs, rhs);
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(GenflaxOnednnMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<bool>("transpose_a")
                                  .Attr<bool>("transpose_b"));
