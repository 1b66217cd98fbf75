// The portable resize passes: Pillow's 32-bit fixed point (kExact), one value at a time.
// They build and run on any CPU (aarch64 included); the tests compare them with Pillow and
// with the AVX2 passes (`_kernels.simd(False)` selects them on an AVX2 machine).
#include "resample.h"

#include <algorithm>
#include <vector>

namespace fastload {
namespace {

inline uint8_t clip8(int32_t acc) {
  const int32_t v = acc >> kPrecisionBits;
  return static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
}

}  // namespace

void resample_rows_scalar(const Image& src, const TapArrays<int32_t>& taps, Index y0, Index y1,
                          uint8_t* __restrict dst) {
  const auto t = taps;
  for (Index y = y0; y < y1; ++y) {
    const uint8_t* in = src.row(y);
    uint8_t* out = dst + (y - y0) * t.size * 3;
    for (Index x = 0; x < t.size; ++x) {
      const uint8_t* p = in + 3 * t.first[x];
      const int32_t* k = t.of(x);
      int32_t r = 1 << (kPrecisionBits - 1), g = r, b = r;
      for (int i = 0; i < t.count[x]; ++i) {
        r += p[3 * i] * k[i];
        g += p[3 * i + 1] * k[i];
        b += p[3 * i + 2] * k[i];
      }
      out[3 * x] = clip8(r);
      out[3 * x + 1] = clip8(g);
      out[3 * x + 2] = clip8(b);
    }
  }
}

// Each output row accumulates whole input rows, one tap at a time.
void resample_cols_scalar(const Image& src, const TapArrays<int32_t>& taps, Index y0, Index y1,
                          uint8_t* __restrict dst) {
  const auto t = taps;
  const Index n = src.width * 3;
  std::vector<int32_t> acc(n);
  for (Index y = y0; y < y1; ++y) {
    const int32_t* k = t.of(y);
    std::fill(acc.begin(), acc.end(), 1 << (kPrecisionBits - 1));
    for (int i = 0; i < t.count[y]; ++i) {
      const uint8_t* p = src.row(t.first[y] + i);
      for (Index x = 0; x < n; ++x) acc[x] += p[x] * k[i];
    }
    uint8_t* out = dst + (y - y0) * n;
    for (Index x = 0; x < n; ++x) out[x] = clip8(acc[x]);
  }
}

}  // namespace fastload
