// Filter taps: which inputs each output of one axis reads, and with which weights.
//
// The weights are Pillow's bicubic (a = -0.5) antialiased ones, normalized per output, then
// put in the fixed point of the arithmetic the passes run with (Kind). Pillow's own 32-bit
// fixed point (kExact) makes the resize bit-identical to Image.resize(BICUBIC); the fast
// kinds trade it for 16- or 8-bit weights that the AVX2 passes apply two taps at a time.
#pragma once

#include <cstdint>
#include <vector>

#include "image.h"

namespace fastload {

constexpr int kPrecisionBits = 32 - 8 - 2;  // Pillow's PRECISION_BITS for 8-bit images

// The fast (non-exact) passes' weights: 16 bits with this many fractional bits, so that
// one multiply-add instruction (vpmaddwd) does two taps.
constexpr int kFastBits = 14;

// Where the resize shrinks by at most kByteMaxScale, the fast passes use 8-bit weights with
// kByteBits fractional bits instead: one vpmaddubsw then does two taps on 16 values at
// once, straight from the uint8 pixels, with 16-bit sums (twice the values per instruction
// and no widening). Six bits keep every sum exact in 16 bits (checked per output) and the
// image close to the exact resize on photos (benchmarks/RESULTS.md, image pipeline); the
// longer filters of bigger shrinks spread their weight too thin for 8 bits. In fast mode a
// JPEG decodes DCT-scaled, so what is left of the shrink is under 2x.
constexpr int kByteBits = 6;
constexpr double kByteMaxScale = 2.0;
constexpr int kBytePairs = 5;  // the most tap pairs at kByteMaxScale (9 taps)

// The arithmetic one axis' passes run with, chosen when its taps are built.
enum class Kind {
  kExact,   // Pillow's 32-bit fixed point (every path where exactness is asked, and no AVX2)
  kFast16,  // 16-bit weights, two taps per vpmaddwd
  kFast8,   // 8-bit weights, two taps per vpmaddubsw
};

// How each kind stores its weights:
//   kExact:  one int32 per tap, kPrecisionBits, exactly as Pillow rounds them;
//   kFast16: two taps per int32 (the first in the low half), kFastBits, zero-padded to an
//            even count;
//   kFast8:  two taps per uint16 (the first in the low byte), kByteBits, rounded so that
//            they sum to exactly one: flat areas stay exact.
template <Kind K>
struct KindTraits {
  using Weight = int32_t;
  static constexpr int kBits = K == Kind::kExact ? kPrecisionBits : kFastBits;
  static constexpr int kTapsPerWeight = K == Kind::kExact ? 1 : 2;
};
template <>
struct KindTraits<Kind::kFast8> {
  using Weight = uint16_t;
  static constexpr int kBits = kByteBits;
  static constexpr int kTapsPerWeight = 2;
};
template <Kind K>
using WeightOf = typename KindTraits<K>::Weight;

// One kind's taps as raw pointers (a by-value copy the loops keep in registers): the loops
// store through uint8_t*, which may alias anything, so the compiler would reload every
// member of a container after each store. Output i reads `count[i]` inputs from
// `first[i]`, with the weight entries at `of(i)`.
template <typename W>
struct TapArrays {
  Index size, stride;  // outputs; weight entries per output
  const int* first;
  const int* count;
  const W* weights;
  FASTLOAD_INLINE const W* of(Index x) const { return weights + x * stride; }
};

// The taps of one axis, in the fixed point of `kind` (only that kind's weights are kept).
struct Taps {
  Kind kind;
  int ksize = 0, npairs = 0;  // the most taps an output reads; their pairs, rounded up
  std::vector<int> first, count;

  // `exact` asks for Pillow's arithmetic; `simd` says whether the AVX2 passes will run,
  // without which there are only exact passes.
  Taps(int in_size, int out_size, bool exact, bool simd);

  template <Kind K>
  TapArrays<WeightOf<K>> get() const;

 private:
  std::vector<int32_t> weights_;  // kExact, kFast16
  std::vector<uint16_t> bytes_;   // kFast8
  bool quantize_bytes(const std::vector<double>& norm);
};

template <>
inline TapArrays<int32_t> Taps::get<Kind::kExact>() const {
  return {static_cast<Index>(first.size()), ksize, first.data(), count.data(), weights_.data()};
}
template <>
inline TapArrays<int32_t> Taps::get<Kind::kFast16>() const {
  return {static_cast<Index>(first.size()), npairs, first.data(), count.data(), weights_.data()};
}
template <>
inline TapArrays<uint16_t> Taps::get<Kind::kFast8>() const {
  return {static_cast<Index>(first.size()), npairs, first.data(), count.data(), bytes_.data()};
}

}  // namespace fastload
