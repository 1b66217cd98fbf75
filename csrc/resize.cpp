// The resize: which pass runs first, the bands, and which pass code runs (portable or AVX2).
#include "resize.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu.h"
#include "resample.h"
#include "taps.h"

namespace fastload {
namespace {

// Pass dispatch by the taps' kind. The fast kinds exist only where the AVX2 passes run
// (taps.h); kExact runs the AVX2 passes where `simd`, the portable ones otherwise.
void resample_rows(const Image& src, const Taps& taps, bool simd, Index y0, Index y1, uint8_t* dst) {
#ifdef FASTLOAD_AVX2
  switch (taps.kind) {
    case Kind::kExact:
      if (!simd) break;
      return avx2::resample_rows<Kind::kExact>(src, taps.get<Kind::kExact>(), y0, y1, dst);
    case Kind::kFast16:
      return avx2::resample_rows<Kind::kFast16>(src, taps.get<Kind::kFast16>(), y0, y1, dst);
    case Kind::kFast8:
      return avx2::resample_rows<Kind::kFast8>(src, taps.get<Kind::kFast8>(), y0, y1, dst);
  }
#endif
  resample_rows_scalar(src, taps.get<Kind::kExact>(), y0, y1, dst);
}

void resample_cols(const Image& src, const Taps& taps, bool simd, Index y0, Index y1, uint8_t* dst) {
#ifdef FASTLOAD_AVX2
  switch (taps.kind) {
    case Kind::kExact:
      if (!simd) break;
      return avx2::resample_cols<Kind::kExact>(src, taps.get<Kind::kExact>(), y0, y1, dst);
    case Kind::kFast16:
      return avx2::resample_cols<Kind::kFast16>(src, taps.get<Kind::kFast16>(), y0, y1, dst);
    case Kind::kFast8:
      return avx2::resample_cols<Kind::kFast8>(src, taps.get<Kind::kFast8>(), y0, y1, dst);
  }
#endif
  resample_cols_scalar(src, taps.get<Kind::kExact>(), y0, y1, dst);
}

// Which pass runs first. Pillow (>= 13) runs the vertical pass first when the height
// shrinks by more than twice as many pixels as the width does; the two orders round
// differently, so `exact` follows that rule to stay bit-identical (checked against
// Pillow in tests/test_vision.py). Otherwise (fast mode, already approximate) the
// cheaper order wins: per tap and output pixel, the horizontal pass costs about three
// times the vertical one (the AVX2 passes' ratio, measured: benchmarks/RESULTS.md).
bool vertical_first(const Image& src, Index out_h, Index out_w, bool exact) {
  if (out_h == src.height) return false;
  if (out_w == src.width) return true;  // the vertical pass alone, as Pillow does
  if (exact)
    return out_h < src.height && (src.height - out_h) > 2 * (src.width - out_w);
  const double kh = 4.0 * std::max(1.0, static_cast<double>(src.width) / out_w);
  const double kv = 4.0 * std::max(1.0, static_cast<double>(src.height) / out_h);
  const double h_first = 3 * kh * src.height * out_w + kv * out_h * out_w;
  const double v_first = kv * out_h * src.width + 3 * kh * out_h * out_w;
  return v_first < h_first;
}

}  // namespace

void resize_bands(const Image& src, Index out_h, Index out_w, Index band, bool exact,
                  uint8_t* dst, const EmitRows& emit) {
  const bool simd = simd_enabled();  // read once: the taps' kind depends on it
  const Index row_bytes = out_w * 3;
  std::vector<uint8_t> chunk(dst ? 0 : static_cast<size_t>(band) * row_bytes);
  auto rows_at = [&](Index y) { return dst ? dst + y * row_bytes : chunk.data(); };
  auto band_end = [&](Index y) { return std::min(y + band, out_h); };
  auto done = [&](const uint8_t* rows, Index y0, Index y1) {
    if (emit) emit(rows, y0, y1);
  };
  const bool resize_h = out_w != src.width;
  if (vertical_first(src, out_h, out_w, exact)) {
    // Each band: vertical taps from the source, then the horizontal taps.
    const Taps vtaps(static_cast<int>(src.height), static_cast<int>(out_h), exact, simd);
    const Taps htaps(static_cast<int>(src.width), static_cast<int>(out_w), exact, simd);
    std::vector<uint8_t> tall(resize_h ? static_cast<size_t>(band) * src.width * 3 : 0);
    for (Index y = 0; y < out_h; y += band) {
      const Index y1 = band_end(y);
      uint8_t* out = rows_at(y);
      if (resize_h) {
        resample_cols(src, vtaps, simd, y, y1, tall.data());
        resample_rows(Image{tall.data(), y1 - y, src.width}, htaps, simd, 0, y1 - y, out);
      } else {
        resample_cols(src, vtaps, simd, y, y1, out);
      }
      done(out, y, y1);
    }
    return;
  }
  if (out_h == src.height && !resize_h) {  // nothing to resize
    for (Index y = 0; y < out_h; y += band) {
      const Index y1 = band_end(y);
      if (dst) std::memcpy(rows_at(y), src.row(y), (y1 - y) * row_bytes);
      done(dst ? rows_at(y) : src.row(y), y, y1);
    }
    return;
  }
  if (out_h == src.height) {  // only the width changes
    const Taps htaps(static_cast<int>(src.width), static_cast<int>(out_w), exact, simd);
    for (Index y = 0; y < out_h; y += band) {
      const Index y1 = band_end(y);
      resample_rows(src, htaps, simd, y, y1, rows_at(y));
      done(rows_at(y), y, y1);
    }
    return;
  }
  // Horizontal pass over a sliding window of input rows: each band computes only the rows
  // it newly needs, and the window stays small enough to remain in cache for the vertical taps.
  const Taps htaps(static_cast<int>(src.width), static_cast<int>(out_w), exact, simd);
  const Taps vtaps(static_cast<int>(src.height), static_cast<int>(out_h), exact, simd);
  Index span = 0;  // the most input rows one band reads
  for (Index y = 0; y < out_h; y += band) {
    const Index y1 = band_end(y) - 1;
    span = std::max<Index>(span, vtaps.first[y1] + vtaps.count[y1] - vtaps.first[y]);
  }
  std::vector<uint8_t> window(static_cast<size_t>(span) * row_bytes);
  Index lo = 0, hi = 0;  // input rows [lo, hi) are in the window
  for (Index y = 0; y < out_h; y += band) {
    const Index y1 = band_end(y);
    const Index need_lo = vtaps.first[y], need_hi = vtaps.first[y1 - 1] + vtaps.count[y1 - 1];
    const Index keep = std::max<Index>(0, hi - need_lo);
    if (keep > 0) std::memmove(window.data(), window.data() + (need_lo - lo) * row_bytes, keep * row_bytes);
    const Index from = std::max(hi, need_lo);
    resample_rows(src, htaps, simd, from, need_hi, window.data() + (from - need_lo) * row_bytes);
    lo = need_lo;
    hi = need_hi;
    uint8_t* out = rows_at(y);
    resample_cols(Image{window.data(), src.height, out_w, lo}, vtaps, simd, y, y1, out);
    done(out, y, y1);
  }
}

}  // namespace fastload
