// Normalize + the Qwen2-VL patch layout, written straight from the resized rows.
#pragma once

#include <cstdint>

#include "image.h"

namespace fastload {

// transformers' normalization of one channel: x = float32(v * rescale), the product in
// double, then (x - mean) / std in float32. The lookup table the Python side passes holds
// exactly these values; the AVX2 code computes them in vectors where it reproduces the
// table bit for bit (checked on every call), and looks them up otherwise.
struct Normalize {
  double rescale[3];
  float mean[3], std[3];
};

// The Qwen2-VL patch layout: the image is a grid of patch x patch pixels, grid_w patches
// wide, taken in blocks of merge x merge patches. Each output row is one patch's values in
// (C, T, P, P) order (T temporal copies of the one frame); the rows are ordered by (block
// row, block column, row in the block, column in the block). A block row's patches (merge
// rows of the grid) are thus one contiguous run of output rows, which is how they are
// written. The order is defined here alone: block_row_patches, patch_y and patch_x.
struct PatchLayout {
  Index patch, temporal, merge, grid_w;
  Index row_len() const { return 3 * temporal * patch * patch; }
  Index block_row_patches() const { return merge * grid_w; }
  // The grid row (within its block row) and grid column of a block row's q-th patch.
  Index patch_y(Index q) const { return q / merge % merge; }
  Index patch_x(Index q) const { return q / (merge * merge) * merge + q % merge; }
};

// Resizes `img` to out_h x out_w (multiples of patch * merge; see resize.h for `exact`)
// and writes its patches into `out` (the whole output, in layout order), each channel
// value v as lut[256 * c + v]. T is float (float32 output) or uint16_t (bfloat16 bits).
template <typename T>
void write_patches(const Image& img, Index out_h, Index out_w, const PatchLayout& layout,
                   bool exact, const T* lut, const Normalize& norm, T* out);

// Whether write_patches computes `lut`'s values from `norm` in vectors rather than looking
// them up (only where that reproduces the table bit for bit).
template <typename T>
bool computes_table(const Normalize& norm, const T* lut);

#ifdef FASTLOAD_AVX2
namespace avx2 {  // patches_avx2.cpp

// Byte shuffles that take one channel of a patch row (8 <= P <= 16 pixels) from the 48
// packed RGB bytes starting at its first pixel, read as three 16-byte chunks: pixels 0..7
// land in bytes 0..7 and pixels P-8..P-1 in bytes 8..15 (the two 8-value halves stored).
struct RowShuffle {
  alignas(16) int8_t mask[3][3][16];  // [channel][chunk]
};
RowShuffle row_shuffle(Index P);

// Whether normalize_patch reproduces `lut` bit for bit.
template <typename T>
bool normalize_matches(const Normalize& norm, const T* lut);

// One patch (its top-left pixel at `at`, rows `stride` bytes apart; 48 bytes readable from
// each row's first pixel) normalized into `dst`: each channel's P x P values, `temporal`
// times.
template <typename T>
void normalize_patch(const uint8_t* at, Index stride, Index P, Index temporal,
                     const Normalize& norm, const RowShuffle& shuffle, T* dst);

}  // namespace avx2
#endif

}  // namespace fastload
