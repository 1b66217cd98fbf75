// The image the kernel's passes read and write: packed uint8 RGB rows.
#pragma once

#include <cstddef>
#include <cstdint>

// Marks the one-line accessors the *_avx2.cpp files use. Those files are compiled with
// -mavx2 -mfma (setup.py), so an out-of-line copy of an inline function they use could be
// AVX2 code, and the linker keeps one copy for the whole module, which the portable files
// would then call too: forced inlining leaves no such copy.
#define FASTLOAD_INLINE inline __attribute__((always_inline))

namespace fastload {

using Index = std::ptrdiff_t;  // sizes and offsets (Py_ssize_t at the Python boundary)

// A packed uint8 (H, W, 3) image (rows contiguous; the Python side makes rotated views
// contiguous first, so the loops know their strides at compile time).
struct Image {
  const uint8_t* data;
  Index height, width;
  Index first_row = 0;  // the row `data` holds: a window of a taller image
  FASTLOAD_INLINE const uint8_t* row(Index y) const { return data + (y - first_row) * width * 3; }
};

}  // namespace fastload
