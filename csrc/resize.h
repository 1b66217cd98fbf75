// The resize: Pillow's separable two-pass bicubic, streamed band by band.
#pragma once

#include <cstdint>
#include <functional>

#include "image.h"

namespace fastload {

// Receives packed uint8 output rows [y0, y1) of the resized image.
using EmitRows = std::function<void(const uint8_t* rows, Index y0, Index y1)>;

// Resizes `src` to out_h x out_w, `band` output rows at a time (a multiple of the AVX2
// horizontal pass's row group keeps its groups whole). With `dst` (a packed out_h x out_w
// x 3 buffer) the rows are written there, and `emit`, if set, sees them there; without,
// they pass through a band-sized buffer (or come straight from the source when nothing is
// resized) to `emit`. `exact` is Pillow's arithmetic and pass order, bit for bit; otherwise
// the cheaper order and, with AVX2, 16- or 8-bit weights (taps.h).
void resize_bands(const Image& src, Index out_h, Index out_w, Index band, bool exact,
                  uint8_t* dst, const EmitRows& emit);

}  // namespace fastload
