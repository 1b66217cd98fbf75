// Normalize + patch layout: each block row of patches is written from the resized band's
// rows as soon as the resize has produced them, sequentially, into the caller's buffer
// (which may live in shared memory).
#include "patches.h"

#include <cstring>
#include <numeric>
#include <vector>

#include "cpu.h"
#include "resample.h"
#include "resize.h"

namespace fastload {
namespace {

// One patch through `lut` (3 x 256): each channel's P x P values, written `temporal` times.
// Each patch is read straight from the resized band's packed RGB rows: `at` points at its
// top-left pixel, `stride` bytes apart per row.
template <typename T>
void lookup_patch(const uint8_t* at, Index stride, Index P, Index temporal, const T* lut, T* dst) {
  const Index pp = P * P;
  for (int c = 0; c < 3; ++c) {
    const T* table = lut + 256 * c;
    T* plane = dst + c * temporal * pp;
    for (Index py = 0; py < P; ++py)
      for (Index px = 0; px < P; ++px) plane[py * P + px] = table[at[py * stride + 3 * px + c]];
    for (Index t = 1; t < temporal; ++t) std::memcpy(plane + t * pp, plane, pp * sizeof(T));
  }
}

// Writes the patches of one block row into the output, in output order: one sequential
// stream of stores.
template <typename T>
class PatchWriter {
 public:
  // `lut` is (3, 256) values of type T, the values of `norm`; `out` the whole output.
  PatchWriter(const PatchLayout& L, Index width, const T* lut, const Normalize& norm, T* out)
      : L_(L), width_(width), lut_(lut), norm_(norm), out_(out) {
#ifdef FASTLOAD_AVX2
    simd_ = simd_enabled() && L.patch >= 8 && L.patch <= 16 && avx2::normalize_matches(norm, lut);
    if (simd_) {
      shuffle_ = avx2::row_shuffle(L.patch);
      edge_.resize(static_cast<size_t>(48 * L.patch));
    }
#endif
  }

  // `rows`: the merge * patch packed RGB rows of block row `block_row`.
  void write(const uint8_t* rows, Index block_row) {
    const Index P = L_.patch, stride = 3 * width_, n = L_.block_row_patches();
    T* dst = out_ + block_row * n * L_.row_len();
    for (Index q = 0; q < n; ++q, dst += L_.row_len()) {
      const Index x0 = L_.patch_x(q) * P;
      const uint8_t* at = rows + L_.patch_y(q) * P * stride + 3 * x0;
#ifdef FASTLOAD_AVX2
      if (simd_) {
        if (3 * x0 + 48 <= stride) {
          avx2::normalize_patch(at, stride, P, L_.temporal, norm_, shuffle_, dst);
        } else {  // the row ends within 48 bytes: read a copy instead
          for (Index py = 0; py < P; ++py) std::memcpy(&edge_[48 * py], at + py * stride, 3 * P);
          avx2::normalize_patch(edge_.data(), 48, P, L_.temporal, norm_, shuffle_, dst);
        }
        continue;
      }
#endif
      lookup_patch(at, stride, P, L_.temporal, lut_, dst);
    }
  }

 private:
  PatchLayout L_;
  Index width_;
  const T* lut_;
  Normalize norm_;
  T* out_;
#ifdef FASTLOAD_AVX2
  bool simd_ = false;
  avx2::RowShuffle shuffle_{};
  std::vector<uint8_t> edge_;  // (P, 48): the last patch of a row, copied
#endif
};

}  // namespace

template <typename T>
void write_patches(const Image& img, Index out_h, Index out_w, const PatchLayout& layout,
                   bool exact, const T* lut, const Normalize& norm, T* out) {
  // Whole block rows per band, and a multiple of the horizontal pass's row group.
  const Index block = layout.patch * layout.merge;
  const Index band = block * kRowGroup / std::gcd<Index>(block, kRowGroup);
  PatchWriter<T> writer(layout, out_w, lut, norm, out);
  resize_bands(img, out_h, out_w, band, exact, nullptr, [&](const uint8_t* rows, Index y0, Index y1) {
    for (Index y = y0; y < y1; y += block) writer.write(rows + (y - y0) * out_w * 3, y / block);
  });
}

template <typename T>
bool computes_table(const Normalize& norm, const T* lut) {
#ifdef FASTLOAD_AVX2
  return simd_enabled() && avx2::normalize_matches(norm, lut);
#else
  (void)norm, (void)lut;
  return false;
#endif
}

template void write_patches(const Image&, Index, Index, const PatchLayout&, bool, const float*,
                            const Normalize&, float*);
template void write_patches(const Image&, Index, Index, const PatchLayout&, bool, const uint16_t*,
                            const Normalize&, uint16_t*);
template bool computes_table(const Normalize&, const float*);
template bool computes_table(const Normalize&, const uint16_t*);

}  // namespace fastload
