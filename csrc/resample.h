// The resize passes: one axis each, over a range of output rows.
//
// A horizontal pass ("rows") resamples each input row in [y0, y1) to the taps' width; a
// vertical pass ("cols") computes output rows [y0, y1) from the input rows its taps read.
// Both write packed (y1 - y0, width, 3) uint8 rows to `dst`. The portable passes
// (resample_scalar.cpp) run Pillow's arithmetic, kExact; the AVX2 ones (resample_avx2.cpp,
// built only for x86, where setup.py defines FASTLOAD_AVX2) run every kind, kExact with
// the same integer results. Which run is chosen per call: resize.cpp.
#pragma once

#include <cstdint>

#include "image.h"
#include "taps.h"

namespace fastload {

// The AVX2 horizontal pass works on groups of this many rows; the bands resize_bands
// streams are whole numbers of groups.
constexpr int kRowGroup = 8;

void resample_rows_scalar(const Image& src, const TapArrays<int32_t>& taps, Index y0, Index y1,
                          uint8_t* dst);
void resample_cols_scalar(const Image& src, const TapArrays<int32_t>& taps, Index y0, Index y1,
                          uint8_t* dst);

#ifdef FASTLOAD_AVX2
namespace avx2 {  // instantiated for each Kind in resample_avx2.cpp
template <Kind K>
void resample_rows(const Image& src, const TapArrays<WeightOf<K>>& taps, Index y0, Index y1,
                   uint8_t* dst);
template <Kind K>
void resample_cols(const Image& src, const TapArrays<WeightOf<K>>& taps, Index y0, Index y1,
                   uint8_t* dst);
}  // namespace avx2
#endif

}  // namespace fastload
