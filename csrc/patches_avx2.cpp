// Normalize in vectors: transformers' float arithmetic, eight values per instruction.
//
// Compiled with -mavx2 -mfma (setup.py, x86 only), called only where the CPU has both
// (cpu.cpp); like resample_avx2.cpp it shares no code with the portable files through the
// linker (no standard-library templates).
//
// transformers computes x = float32(v * rescale) in double, then (x - mean) / std in
// float32 (patches.h). The vectors compute the same without double precision or a
// division: x as v * rescale split into two floats (one rounding, by FMA), the quotient as
// a * (1 / std) corrected once by FMA, which rounds it correctly in all but rare cases.
// Whether they reproduce the table is checked on every call (normalize_matches); where
// they do not, patches.cpp looks the values up instead.
#include <immintrin.h>

#include <cstring>

#include "patches.h"

namespace fastload {
namespace avx2 {
namespace {

// One channel's constants, broadcast.
struct ChannelVec {
  __m256 scale_hi, scale_lo, mean, std, inverse;
  ChannelVec(const Normalize& norm, int c) {
    const float hi = static_cast<float>(norm.rescale[c]);
    scale_hi = _mm256_set1_ps(hi);
    scale_lo = _mm256_set1_ps(static_cast<float>(norm.rescale[c] - hi));
    mean = _mm256_set1_ps(norm.mean[c]);
    std = _mm256_set1_ps(norm.std[c]);
    inverse = _mm256_set1_ps(1.0f / norm.std[c]);
  }
};

// The low eight bytes of `bytes`, normalized.
inline __m256 normalize8(__m128i bytes, const ChannelVec& k) {
  const __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
  const __m256 x = _mm256_fmadd_ps(v, k.scale_hi, _mm256_mul_ps(v, k.scale_lo));
  const __m256 a = _mm256_sub_ps(x, k.mean);
  const __m256 q = _mm256_mul_ps(a, k.inverse);
  return _mm256_fmadd_ps(_mm256_fnmadd_ps(q, k.std, a), k.inverse, q);
}

// Stores eight values: as float32, or rounded to bfloat16.
inline void store8(float* dst, __m256 v) { _mm256_storeu_ps(dst, v); }
inline void store8(uint16_t* dst, __m256 v) {
  // Round to nearest even on the bits (the values are finite), as torch does; the
  // saturating pack only narrows, since the results fit 16 bits.
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded =
      _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst),
                   _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1)));
}

inline __m128i load16(const void* p) { return _mm_loadu_si128(static_cast<const __m128i*>(p)); }

}  // namespace

RowShuffle row_shuffle(Index P) {
  RowShuffle s;
  for (int c = 0; c < 3; ++c)
    for (int k = 0; k < 3; ++k)
      for (int j = 0; j < 16; ++j) {
        const Index pixel = j < 8 ? j : P - 16 + j;
        const Index byte = 3 * pixel + c - 16 * k;
        s.mask[c][k][j] = byte >= 0 && byte < 16 ? static_cast<int8_t>(byte) : -1;
      }
  return s;
}

template <typename T>
void normalize_patch(const uint8_t* at, Index stride, Index P, Index temporal,
                     const Normalize& norm, const RowShuffle& shuffle, T* dst) {
  const Index pp = P * P;
  for (int c = 0; c < 3; ++c) {
    const ChannelVec k(norm, c);
    const __m128i m0 = load16(shuffle.mask[c][0]), m1 = load16(shuffle.mask[c][1]),
                  m2 = load16(shuffle.mask[c][2]);
    T* plane = dst + c * temporal * pp;
    for (Index py = 0; py < P; ++py) {
      const uint8_t* row = at + py * stride;
      const __m128i v = _mm_or_si128(
          _mm_or_si128(_mm_shuffle_epi8(load16(row), m0), _mm_shuffle_epi8(load16(row + 16), m1)),
          _mm_shuffle_epi8(load16(row + 32), m2));
      store8(plane + py * P, normalize8(v, k));
      store8(plane + py * P + P - 8, normalize8(_mm_srli_si128(v, 8), k));  // may overlap
    }
    for (Index t = 1; t < temporal; ++t) std::memcpy(plane + t * pp, plane, pp * sizeof(T));
  }
}

template <typename T>
bool normalize_matches(const Normalize& norm, const T* lut) {
  alignas(16) uint8_t bytes[256];
  T values[256];
  for (int i = 0; i < 256; ++i) bytes[i] = static_cast<uint8_t>(i);
  for (int c = 0; c < 3; ++c) {
    const ChannelVec k(norm, c);
    for (int i = 0; i < 256; i += 8)
      store8(values + i, normalize8(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + i)), k));
    if (std::memcmp(values, lut + 256 * c, sizeof values) != 0) return false;
  }
  return true;
}

template bool normalize_matches(const Normalize&, const float*);
template bool normalize_matches(const Normalize&, const uint16_t*);
template void normalize_patch(const uint8_t*, Index, Index, Index, const Normalize&, const RowShuffle&, float*);
template void normalize_patch(const uint8_t*, Index, Index, Index, const Normalize&, const RowShuffle&,
                              uint16_t*);

}  // namespace avx2
}  // namespace fastload
