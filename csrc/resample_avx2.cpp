// The AVX2 resize passes: the same taps as the portable passes, more values per instruction.
//
// Compiled with -mavx2 -mfma (setup.py, x86 only) and called only where the CPU has both
// (cpu.cpp). Since the whole file is AVX2 code, it shares nothing with the portable files
// through the linker: its functions have internal linkage or live in namespace avx2, and it
// instantiates no standard-library template (scratch comes from Scratch below, not
// std::vector) and calls only the forced-inline accessors of image.h and taps.h.
//
// One skeleton per axis runs every kind; what differs between kinds is their arithmetic
// (Arith<K>, below): how a weight is broadcast, how the sums of one step (one tap, or a
// pair of taps for the fast kinds) are accumulated, and how the sums become bytes.
//   kExact: Pillow's arithmetic exactly (32-bit products and sums, the same rounding and
//           clipping): integer sums do not depend on order, so results equal the portable
//           passes' and Pillow's.
//   kFast16: two taps per vpmaddwd on pixels widened to 16 bits, as Pillow-SIMD does.
//   kFast8: two taps per vpmaddubsw straight on the bytes, 16-bit sums.
// Measurements behind these choices: benchmarks/RESULTS.md (image pipeline).
#include <immintrin.h>

#include <cstring>

#include "resample.h"

namespace fastload {
namespace avx2 {
namespace {

// Uninitialized scratch of n values, freed on scope exit (throws std::bad_alloc like new).
template <typename T>
class Scratch {
 public:
  explicit Scratch(Index n) : p_(new T[n > 0 ? n : 1]) {}
  ~Scratch() { delete[] p_; }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  T* get() const { return p_; }

 private:
  T* p_;
};

// ---- shared steps -----------------------------------------------------------------

// Shifts, clips and packs four vectors of 8 int32 sums into 32 bytes, in order.
template <int kBits>
inline __m256i pack_sums(__m256i a, __m256i b, __m256i c, __m256i d) {
  const __m256i ab = _mm256_packs_epi32(_mm256_srai_epi32(a, kBits), _mm256_srai_epi32(b, kBits));
  const __m256i cd = _mm256_packs_epi32(_mm256_srai_epi32(c, kBits), _mm256_srai_epi32(d, kBits));
  // The packs work per 128-bit lane; the dword permute puts the 4-byte groups back in order.
  return _mm256_permutevar8x32_epi32(_mm256_packus_epi16(ab, cd),
                                     _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

inline __m256i load32(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline void store32(uint8_t* p, __m256i v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }

inline __m256i widen8(const uint8_t* p) {  // 8 bytes -> 8 int32
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}
inline __m256i widen16(const uint8_t* p) {  // 16 bytes -> 16 int16
  return _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// The horizontal pass interleaves groups of kRows rows column by column: for each input
// pixel x, the R, G, B of rows 0..7 (a column of kColumn bytes).
constexpr int kRows = kRowGroup, kColumn = 3 * kRows;

// ---- each kind's arithmetic ----------------------------------------------------------
// Arith<K>::Row holds the running sums of 32 consecutive values of a row (vertical pass),
// Arith<K>::Column those of one interleaved column (horizontal pass); `add` takes one
// weight entry's inputs (one tap, or the two taps of a pair: `a` the first, `b` the second)
// and `pack` returns the 32 output bytes (of a Column, the first kColumn are its values).
// kColumnBytes is the stride of the columns the horizontal taps read; kPaired says that
// they are pairs built by pair_columns.
template <Kind K>
struct Arith;

template <>
struct Arith<Kind::kExact> {
  static constexpr int kBits = kPrecisionBits;
  static constexpr Index kColumnBytes = kColumn;
  static constexpr bool kPaired = false;
  static __m256i weight(int32_t w) { return _mm256_set1_epi32(w); }

  // Each 8 bytes widened to int32 times the weight, added to 8 int32 sums.
  template <int kGroups>
  struct Sums {
    __m256i s[kGroups];
    Sums() {
      for (auto& v : s) v = _mm256_set1_epi32(1 << (kBits - 1));
    }
    void add(const uint8_t* p, __m256i w) {
      for (int j = 0; j < kGroups; ++j) s[j] = _mm256_add_epi32(s[j], _mm256_mullo_epi32(widen8(p + 8 * j), w));
    }
    __m256i pack() const { return pack_sums<kBits>(s[0], s[1], s[2], s[kGroups - 1]); }
  };
  struct Row : Sums<4> {
    void add(const uint8_t* a, const uint8_t*, __m256i w) { Sums::add(a, w); }
  };
  using Column = Sums<3>;  // 24 values
};

template <>
struct Arith<Kind::kFast16> {
  static constexpr int kBits = kFastBits;
  static constexpr Index kColumnBytes = 2 * kColumn;
  static constexpr bool kPaired = true;
  static __m256i weight(int32_t w) { return _mm256_set1_epi32(w); }

  // Two rows' bytes interleaved and widened to the int16 pairs vpmaddwd takes. The sums
  // come out in the order the in-lane packs restore, so no permute is needed: per 128-bit
  // half, s holds x + {0..3}, {4..7}, {8..11}, {12..15} (low half) and the same + 16.
  struct Row {
    __m256i s[4];
    Row() {
      for (auto& v : s) v = _mm256_set1_epi32(1 << (kBits - 1));
    }
    void add(const uint8_t* a, const uint8_t* b, __m256i w) {
      const __m256i va = load32(a), vb = load32(b), zero = _mm256_setzero_si256();
      const __m256i lo = _mm256_unpacklo_epi8(va, vb), hi = _mm256_unpackhi_epi8(va, vb);
      s[0] = _mm256_add_epi32(s[0], _mm256_madd_epi16(_mm256_unpacklo_epi8(lo, zero), w));
      s[1] = _mm256_add_epi32(s[1], _mm256_madd_epi16(_mm256_unpackhi_epi8(lo, zero), w));
      s[2] = _mm256_add_epi32(s[2], _mm256_madd_epi16(_mm256_unpacklo_epi8(hi, zero), w));
      s[3] = _mm256_add_epi32(s[3], _mm256_madd_epi16(_mm256_unpackhi_epi8(hi, zero), w));
    }
    __m256i pack() const {
      const __m256i s01 = _mm256_packs_epi32(_mm256_srai_epi32(s[0], kBits), _mm256_srai_epi32(s[1], kBits));
      const __m256i s23 = _mm256_packs_epi32(_mm256_srai_epi32(s[2], kBits), _mm256_srai_epi32(s[3], kBits));
      return _mm256_packus_epi16(s01, s23);
    }
  };
  // Over paired columns (pair_columns): 48 bytes, each value followed by its partner's.
  struct Column {
    __m256i s[3];
    Column() {
      for (auto& v : s) v = _mm256_set1_epi32(1 << (kBits - 1));
    }
    void add(const uint8_t* p, __m256i w) {
      for (int j = 0; j < 3; ++j) s[j] = _mm256_add_epi32(s[j], _mm256_madd_epi16(widen16(p + 16 * j), w));
    }
    __m256i pack() const { return pack_sums<kBits>(s[0], s[1], s[2], s[2]); }
  };
};

template <>
struct Arith<Kind::kFast8> {
  static constexpr int kBits = kByteBits;
  static constexpr Index kColumnBytes = kColumn;
  static constexpr bool kPaired = false;
  static __m256i weight(uint16_t w) { return _mm256_set1_epi16(static_cast<int16_t>(w)); }

  // a's and b's bytes interleaved (a's take the first tap) go straight into vpmaddubsw:
  // `lo` sums each 128-bit lane's first 8 values, `hi` its last 8; the in-lane pack undoes
  // the unpacks.
  struct Row {
    __m256i lo = _mm256_set1_epi16(1 << (kBits - 1)), hi = lo;
    void add(const uint8_t* a, const uint8_t* b, __m256i w) {
      const __m256i va = load32(a), vb = load32(b);
      lo = _mm256_add_epi16(lo, _mm256_maddubs_epi16(_mm256_unpacklo_epi8(va, vb), w));
      hi = _mm256_add_epi16(hi, _mm256_maddubs_epi16(_mm256_unpackhi_epi8(va, vb), w));
    }
    __m256i pack() const {
      return _mm256_packus_epi16(_mm256_srai_epi16(lo, kBits), _mm256_srai_epi16(hi, kBits));
    }
  };
  // Straight from the columns, as from rows: each 32-byte load takes a column and 8 bytes
  // of the next, whose sums land past the column's kColumn bytes (overwritten by the next
  // column's store; the buffers have room after the last).
  struct Column : Row {
    void add(const uint8_t* p, __m256i w) { Row::add(p, p + kColumn, w); }
  };
};

// Tap i of an output's weight entries, as a plain integer (the scalar tails).
inline int tap_weight(const int32_t* w, int i, Kind kind) {
  return kind == Kind::kExact ? w[i] : static_cast<int16_t>(w[i / 2] >> (16 * (i % 2)));
}
inline int tap_weight(const uint16_t* w, int i, Kind) { return static_cast<int8_t>(w[i / 2] >> (8 * (i % 2))); }

// ---- vertical pass -----------------------------------------------------------------

// One output row from the input `rows` of `steps` weight entries (kTapsPerWeight rows each),
// 32 values at a time with the sums in registers. With kFixed (the number of entries known
// at compile time) the rows and broadcast weights are copied to locals that stay in
// registers across the row; kFast8's short filters run so (benchmarks/RESULTS.md).
template <Kind K, int kFixed>
void vertical_row(const uint8_t* const* rows, const WeightOf<K>* w, int steps, Index n,
                  uint8_t* __restrict out) {
  using A = Arith<K>;
  constexpr int kStep = KindTraits<K>::kTapsPerWeight, kLocal = kFixed > 0 ? kFixed : 1;
  const uint8_t* local_rows[kStep * kLocal];
  __m256i local_weights[kLocal];
  if constexpr (kFixed > 0) {
    for (int i = 0; i < kStep * kFixed; ++i) local_rows[i] = rows[i];
    for (int i = 0; i < kFixed; ++i) local_weights[i] = A::weight(w[i]);
  }
  const uint8_t* const* in = kFixed > 0 ? local_rows : rows;
  const int m = kFixed > 0 ? kFixed : steps;
  const Index vectors = n / 32 * 32;
  for (Index x = 0; x < vectors; x += 32) {
    typename A::Row sums;
    for (int i = 0; i < m; ++i)
      sums.add(in[kStep * i] + x, in[kStep * i + kStep - 1] + x,
               kFixed > 0 ? local_weights[i] : A::weight(w[i]));
    store32(out + x, sums.pack());
  }
  for (Index x = vectors; x < n; ++x) {
    int32_t acc = 1 << (A::kBits - 1);
    for (int i = 0; i < kStep * m; ++i) acc += in[i][x] * tap_weight(w, i, K);
    const int32_t v = acc >> A::kBits;
    out[x] = static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
  }
}

template <Kind K>
using VerticalRow = void (*)(const uint8_t* const*, const WeightOf<K>*, int, Index, uint8_t*);

template <Kind K>
VerticalRow<K> vertical_row_for(int steps) {
  if constexpr (K == Kind::kFast8) {  // at most kBytePairs weight entries: one row per count
    static constexpr VerticalRow<K> kFixed[] = {vertical_row<K, 1>, vertical_row<K, 2>, vertical_row<K, 3>,
                                                vertical_row<K, 4>, vertical_row<K, 5>};
    static_assert(sizeof kFixed / sizeof kFixed[0] == kBytePairs);
    return kFixed[steps - 1];
  } else {
    return vertical_row<K, 0>;
  }
}

}  // namespace

template <Kind K>
void resample_cols(const Image& src, const TapArrays<WeightOf<K>>& taps, Index y0, Index y1,
                   uint8_t* dst) {
  constexpr int kStep = KindTraits<K>::kTapsPerWeight;
  const TapArrays<WeightOf<K>> t = taps;
  const Index n = src.width * 3;
  Scratch<const uint8_t*> rows(kStep * t.stride);
  for (Index y = y0; y < y1; ++y) {
    const int count = t.count[y], steps = (count + kStep - 1) / kStep;
    for (int i = 0; i < kStep * steps; ++i)  // a padding tap (weight 0) rereads the last row
      rows.get()[i] = src.row(t.first[y] + (i < count ? i : count - 1));
    vertical_row_for<K>(steps)(rows.get(), t.of(y), steps, n, dst + (y - y0) * n);
  }
}

// ---- horizontal pass -----------------------------------------------------------------
// Eight rows at a time. The rows are first interleaved column by column, so that one tap
// is one weight times 24 contiguous bytes: three 8-lane multiply-adds where a
// pixel-at-a-time loop does one 3-lane one. Each output column's 24 bytes are then
// scattered back to the rows. A last group of fewer than eight rows repeats its last row
// and writes only the real ones.
//
// The interleaving is a transpose, done four pixels at a time in registers: each 256-bit
// register holds row k in its low half and row k + 4 in its high half, pixels widened to
// 4 bytes so that a 4x4 dword transpose per half swaps rows and pixels.
namespace {

inline __m256i load_halves(const uint8_t* lo, const uint8_t* hi) {
  return _mm256_inserti128_si256(
      _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lo))),
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(hi)), 1);
}

// RGB RGB RGB RGB -> RGB0 RGB0 RGB0 RGB0 in each half, and back (the last 4 bytes then 0).
inline __m256i widen_rgb(__m256i v) {
  const __m128i m = _mm_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1);
  return _mm256_shuffle_epi8(v, _mm256_broadcastsi128_si256(m));
}
inline __m256i narrow_rgb(__m256i v) {
  const __m128i m = _mm_setr_epi8(0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1);
  return _mm256_shuffle_epi8(v, _mm256_broadcastsi128_si256(m));
}

inline void transpose4(__m256i* v) {
  const __m256i t0 = _mm256_unpacklo_epi32(v[0], v[1]), t1 = _mm256_unpackhi_epi32(v[0], v[1]);
  const __m256i t2 = _mm256_unpacklo_epi32(v[2], v[3]), t3 = _mm256_unpackhi_epi32(v[2], v[3]);
  v[0] = _mm256_unpacklo_epi64(t0, t2);
  v[1] = _mm256_unpackhi_epi64(t0, t2);
  v[2] = _mm256_unpacklo_epi64(t1, t3);
  v[3] = _mm256_unpackhi_epi64(t1, t3);
}

// Rows -> columns. 16-byte stores; each one's last 4 bytes are overwritten by the next.
void interleave_rows(const uint8_t* const* in, Index width, uint8_t* cols) {
  Index x = 0;
  for (; x + 6 <= width; x += 4) {  // 16-byte loads stay inside the rows
    __m256i v[4];
    for (int k = 0; k < 4; ++k) v[k] = widen_rgb(load_halves(in[k] + 3 * x, in[k + 4] + 3 * x));
    transpose4(v);
    for (int j = 0; j < 4; ++j) {
      uint8_t* col = cols + (x + j) * kColumn;
      const __m256i n = narrow_rgb(v[j]);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(col), _mm256_castsi256_si128(n));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(col + 12), _mm256_extracti128_si256(n, 1));
    }
  }
  for (; x < width; ++x)
    for (int r = 0; r < kRows; ++r) std::memcpy(cols + x * kColumn + 3 * r, in[r] + 3 * x, 3);
}

// Columns -> the first `rows` rows (reads up to 4 bytes past the last column).
void scatter_columns(const uint8_t* cols, Index width, int rows, uint8_t* const* out) {
  Index x = 0;
  for (; x + 6 <= width; x += 4) {  // 16-byte stores stay inside the rows
    __m256i v[4];
    for (int j = 0; j < 4; ++j) {
      const uint8_t* col = cols + (x + j) * kColumn;
      v[j] = widen_rgb(load_halves(col, col + 12));
    }
    transpose4(v);
    for (int k = 0; k < 4; ++k) {
      const __m256i n = narrow_rgb(v[k]);
      if (k < rows) _mm_storeu_si128(reinterpret_cast<__m128i*>(out[k] + 3 * x), _mm256_castsi256_si128(n));
      if (k + 4 < rows)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out[k + 4] + 3 * x), _mm256_extracti128_si256(n, 1));
    }
  }
  for (; x < width; ++x)
    for (int r = 0; r < rows; ++r) std::memcpy(out[r] + 3 * x, cols + x * kColumn + 3 * r, 3);
}

// kFast16's columns stored once more paired with the next: each column's 24 values, each
// followed by the same value of the next column (48 bytes), which widened to 16 bits are
// the pairs vpmaddwd multiplies by two adjacent taps. `cols` has a column of zeros after
// the last, the last one's partner (an odd tap count pads its last pair with weight 0).
void pair_columns(const uint8_t* cols, Index width, uint8_t* pairs) {
  for (Index x = 0; x < width; ++x, cols += kColumn, pairs += 2 * kColumn) {
    const __m128i a0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(cols));
    const __m128i b0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(cols + kColumn));
    const __m128i a1 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(cols + 16));
    const __m128i b1 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(cols + kColumn + 16));
    __m128i* out = reinterpret_cast<__m128i*>(pairs);
    _mm_storeu_si128(out, _mm_unpacklo_epi8(a0, b0));
    _mm_storeu_si128(out + 1, _mm_unpackhi_epi8(a0, b0));
    _mm_storeu_si128(out + 2, _mm_unpacklo_epi8(a1, b1));
  }
}

// Every output column's taps over the input columns `in` (kColumnBytes apart): kColumn
// values each, packed to bytes in `done`.
template <Kind K>
void column_taps(const uint8_t* in, const TapArrays<WeightOf<K>>& taps, uint8_t* __restrict done) {
  using A = Arith<K>;
  constexpr int kStep = KindTraits<K>::kTapsPerWeight;
  const TapArrays<WeightOf<K>> t = taps;
  for (Index x = 0; x < t.size; ++x) {
    const uint8_t* p = in + static_cast<size_t>(t.first[x]) * A::kColumnBytes;
    const WeightOf<K>* w = t.of(x);
    typename A::Column sums;
    for (int i = 0; i < (t.count[x] + kStep - 1) / kStep; ++i, p += kStep * A::kColumnBytes)
      sums.add(p, A::weight(w[i]));
    store32(done + x * kColumn, sums.pack());
  }
}

}  // namespace

template <Kind K>
void resample_rows(const Image& src, const TapArrays<WeightOf<K>>& taps, Index y0, Index y1,
                   uint8_t* dst) {
  const Index in_w = src.width, out_w = taps.size;
  // Not zeroed: every byte read is written first, except the column of zeros after the last.
  Scratch<uint8_t> cols((in_w + 1) * kColumn + 8);
  std::memset(cols.get() + in_w * kColumn, 0, kColumn + 8);
  Scratch<uint8_t> pairs(Arith<K>::kPaired ? in_w * 2 * kColumn : 0);
  Scratch<uint8_t> done(out_w * kColumn + 8);
  for (Index y = y0; y < y1; y += kRows) {
    const int rows = static_cast<int>(y1 - y < kRows ? y1 - y : kRows);
    const uint8_t* in[kRows];
    uint8_t* out[kRows];
    for (int r = 0; r < kRows; ++r) {
      in[r] = src.row(y + (r < rows ? r : rows - 1));
      out[r] = dst + (y - y0 + r) * out_w * 3;
    }
    interleave_rows(in, in_w, cols.get());
    if constexpr (Arith<K>::kPaired) {
      pair_columns(cols.get(), in_w, pairs.get());
      column_taps<K>(pairs.get(), taps, done.get());
    } else {
      column_taps<K>(cols.get(), taps, done.get());
    }
    scatter_columns(done.get(), out_w, rows, out);
  }
}

#define FASTLOAD_PASSES(K)                                                                          \
  template void resample_rows<K>(const Image&, const TapArrays<WeightOf<K>>&, Index, Index, uint8_t*); \
  template void resample_cols<K>(const Image&, const TapArrays<WeightOf<K>>&, Index, Index, uint8_t*);
FASTLOAD_PASSES(Kind::kExact)
FASTLOAD_PASSES(Kind::kFast16)
FASTLOAD_PASSES(Kind::kFast8)
#undef FASTLOAD_PASSES

}  // namespace avx2
}  // namespace fastload
