// A bfloat16 matmul for XLA:CPU through PyTorch's oneDNN: an XLA FFI handler
// (genflax/models/onednn.py builds and registers it). at::mm on bfloat16 runs
// oneDNN's matmul, which uses the CPU's AVX512-BF16 or AMX units, and
// accumulates in float32. The buffers are XLA's own, wrapped without copies.
// Below it, a convolution's patches (im2col) and their adjoint (col2im).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

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

// The patches of a convolution's input, and their adjoint, in bfloat16 (XLA:CPU
// gathers them element by element in float32, many times slower than the matmul
// they feed). x: [B, H, W, C]; cols: [B, Ho, Wo, kh kw C], tap (i, j) of output
// (oh, ow) reading x at (oh sh + i - pad_h, ow sw + j - pad_w), zeros outside.
struct Taps {
  int64_t b, h, w, c, ho, wo, kh, kw, sh, sw, pad_h, pad_w;
};

static bool ReadTaps(ffi::Span<const int64_t> x, ffi::Span<const int64_t> cols, int64_t kh,
                     int64_t kw, int64_t sh, int64_t sw, int64_t pad_h, int64_t pad_w, Taps* t) {
  if (x.size() != 4 || cols.size() != 4 || cols[0] != x[0] || cols[3] != kh * kw * x[3]) {
    return false;
  }
  *t = {x[0], x[1], x[2], x[3], cols[1], cols[2], kh, kw, sh, sw, pad_h, pad_w};
  return true;
}

static ffi::Error Im2col(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> cols, int64_t kh,
                         int64_t kw, int64_t sh, int64_t sw, int64_t pad_h, int64_t pad_w) {
  Taps t;
  if (!ReadTaps(x.dimensions(), cols->dimensions(), kh, kw, sh, sw, pad_h, pad_w, &t)) {
    return ffi::Error::InvalidArgument("onednn_im2col: x [B, H, W, C], cols [B, Ho, Wo, kh kw C]");
  }
  auto* src = static_cast<const uint16_t*>(x.untyped_data());
  auto* dst = static_cast<uint16_t*>(cols->untyped_data());
  at::parallel_for(0, t.b * t.ho, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {  // one output row (b, oh)
      int64_t b = r / t.ho, oh = r % t.ho;
      for (int64_t ow = 0; ow < t.wo; ++ow) {
        uint16_t* out = dst + ((r * t.wo) + ow) * t.kh * t.kw * t.c;
        for (int64_t i = 0; i < t.kh; ++i) {
          int64_t hi = oh * t.sh + i - t.pad_h;
          for (int64_t j = 0; j < t.kw; ++j, out += t.c) {
            int64_t wi = ow * t.sw + j - t.pad_w;
            if (hi < 0 || hi >= t.h || wi < 0 || wi >= t.w) {
              std::memset(out, 0, t.c * sizeof(uint16_t));
            } else {
              std::memcpy(out, src + ((b * t.h + hi) * t.w + wi) * t.c, t.c * sizeof(uint16_t));
            }
          }
        }
      }
    }
  });
  return ffi::Error::Success();
}

static inline float Bf16ToFloat(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

static inline uint16_t FloatToBf16(float f) {  // round to nearest even, as XLA's convert
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

// The adjoint of Im2col: each tap's values added (in float32, rounded once) to the
// input pixel it read. Images run in parallel, each into its own part of x.
static ffi::Error Col2im(ffi::AnyBuffer cols, ffi::Result<ffi::AnyBuffer> x, int64_t kh,
                         int64_t kw, int64_t sh, int64_t sw, int64_t pad_h, int64_t pad_w) {
  Taps t;
  if (!ReadTaps(x->dimensions(), cols.dimensions(), kh, kw, sh, sw, pad_h, pad_w, &t)) {
    return ffi::Error::InvalidArgument("onednn_col2im: cols [B, Ho, Wo, kh kw C], x [B, H, W, C]");
  }
  auto* src = static_cast<const uint16_t*>(cols.untyped_data());
  auto* dst = static_cast<uint16_t*>(x->untyped_data());
  at::parallel_for(0, t.b, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(t.h * t.w * t.c);
    for (int64_t b = begin; b < end; ++b) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t oh = 0; oh < t.ho; ++oh) {
        for (int64_t ow = 0; ow < t.wo; ++ow) {
          const uint16_t* in = src + ((b * t.ho + oh) * t.wo + ow) * t.kh * t.kw * t.c;
          for (int64_t i = 0; i < t.kh; ++i) {
            int64_t hi = oh * t.sh + i - t.pad_h;
            for (int64_t j = 0; j < t.kw; ++j, in += t.c) {
              int64_t wi = ow * t.sw + j - t.pad_w;
              if (hi < 0 || hi >= t.h || wi < 0 || wi >= t.w) continue;
              float* a = acc.data() + (hi * t.w + wi) * t.c;
              for (int64_t c = 0; c < t.c; ++c) a[c] += Bf16ToFloat(in[c]);
            }
          }
        }
      }
      uint16_t* out = dst + b * t.h * t.w * t.c;
      for (int64_t k = 0; k < t.h * t.w * t.c; ++k) out[k] = FloatToBf16(acc[k]);
    }
  });
  return ffi::Error::Success();
}

#define GENFLAX_TAPS_HANDLER(name, fn)                                              \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, fn,                                          \
                                ffi::Ffi::Bind()                                   \
                                    .Arg<ffi::AnyBuffer>()                         \
                                    .Ret<ffi::AnyBuffer>()                         \
                                    .Attr<int64_t>("kh")                           \
                                    .Attr<int64_t>("kw")                           \
                                    .Attr<int64_t>("sh")                           \
                                    .Attr<int64_t>("sw")                           \
                                    .Attr<int64_t>("pad_h")                        \
                                    .Attr<int64_t>("pad_w"));

GENFLAX_TAPS_HANDLER(GenflaxOnednnIm2col, Im2col)
GENFLAX_TAPS_HANDLER(GenflaxOnednnCol2im, Col2im)
