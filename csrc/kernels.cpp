// fastload._kernels: the Qwen2.5-VL image kernel.
//
// One pass from a decoder's uint8 RGB rows to the model's patch layout:
//   bicubic antialiased resize (bit-identical to Pillow's Image.resize(BICUBIC))
//   -> rescale + normalize (transformers' float arithmetic, bit for bit)
//   -> temporal duplication and the (merge, merge, C, T, P, P) patch order.
//
// The resize is Pillow's separable two-pass algorithm with its fixed-point
// coefficients, so the uint8 image it produces equals Pillow's exactly and the
// float output equals transformers' PIL backend. Output is written band by band
// (whole block rows of patches, sequentially) straight into the caller's buffer,
// which may live in shared memory. Each pass has a portable loop and an AVX2 one
// (picked at run time; same integer arithmetic, same results). With exact=False the
// AVX2 passes trade Pillow's 32-bit weights for 16- or 8-bit ones (see Kind), which do
// two taps per instruction and stay within a level or two of Pillow. Plain CPython API
// over the buffer protocol: no torch at build time, and the GIL is released while
// working. No C++ exception leaves an entry point: each becomes a Python exception
// (see "C++ errors" below), so running out of memory is a MemoryError, not an abort.

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <immintrin.h>

#include <sys/mman.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <exception>
#include <initializer_list>
#include <iterator>
#include <memory>
#include <new>
#include <numeric>
#include <stdexcept>
#include <vector>

namespace {

constexpr int kPrecisionBits = 32 - 8 - 2;  // Pillow's PRECISION_BITS for 8-bit images.
constexpr double kBicubicSupport = 2.0;

// Pillow's bicubic filter (a = -0.5).
double bicubic(double x) {
  const double a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
  if (x < 2.0) return (((x - 5.0) * x + 8.0) * x - 4.0) * a;
  return 0.0;
}

// The fast (non-exact) passes' weights: 16 bits with this many fractional bits, so that
// one multiply-add instruction (vpmaddwd) does two taps.
constexpr int kFastBits = 14;

// Where the resize shrinks by at most kByteMaxScale, the fast passes use 8-bit weights with
// kByteBits fractional bits instead: one vpmaddubsw then does two taps on 16 values at
// once, straight from the uint8 pixels, with 16-bit sums (twice the values per instruction
// and no widening). Six bits keep every sum exact in 16 bits (checked per output) and the
// image within ~60 dB of the exact resize on photos; the longer filters of bigger shrinks
// spread their weight too thin for 8 bits. In fast mode a JPEG decodes DCT-scaled, so what
// is left of the shrink is under 2x.
constexpr int kByteBits = 6;
constexpr double kByteMaxScale = 2.0;
constexpr int kBytePairs = 5;  // the most tap pairs at kByteMaxScale (9 taps)

// The arithmetic one axis' passes run with, chosen when its taps are built.
enum class Kind {
  kExact,   // Pillow's 32-bit fixed point (every path where exactness is asked, and no AVX2)
  kFast16,  // 16-bit weights, two taps per vpmaddwd
  kFast8,   // 8-bit weights, two taps per vpmaddubsw
};

// Filter taps for one axis: output i reads `count[i]` inputs from `first[i]`, with the
// weights Pillow computes, in the fixed point of `kind`:
//   kExact:  `weights[i * ksize ...]`, kPrecisionBits, exactly as Pillow rounds them;
//   kFast16: `pairs[i * npairs ...]`, kFastBits, two taps per int32 (the first in the low
//            half), zero-padded to an even count;
//   kFast8:  `bytes[i * npairs ...]`, kByteBits, two taps per int16 (the first in the low
//            byte), rounded so that they sum to exactly one: flat areas stay exact.
// One kind's taps as raw pointers (a by-value copy the loops keep in registers): the loops
// store through uint8_t*, which may alias anything, so the compiler would reload every
// vector member after each store.
template <typename W>
struct TapArrays {
  Py_ssize_t size, stride;  // outputs; weight entries per output
  const int* first;
  const int* count;
  const W* weights;
  const W* of(Py_ssize_t x) const { return weights + x * stride; }
};

struct Taps {
  Kind kind;
  int ksize = 0, npairs = 0;
  std::vector<int> first, count;
  std::vector<int32_t> weights, pairs;
  std::vector<uint16_t> bytes;

  Taps(int in_size, int out_size, bool exact, bool simd);

  TapArrays<int32_t> exact() const { return arrays(weights, ksize); }
  TapArrays<int32_t> fast16() const { return arrays(pairs, npairs); }
  TapArrays<uint16_t> fast8() const { return arrays(bytes, npairs); }

 private:
  template <typename W>
  TapArrays<W> arrays(const std::vector<W>& w, int stride) const {
    return {static_cast<Py_ssize_t>(first.size()), stride, first.data(), count.data(), w.data()};
  }
  bool quantize_bytes(const std::vector<double>& norm);
};

inline int32_t round_fixed(double v, int bits) {  // Pillow's rounding: half away from zero
  const double fixed = v * (1 << bits);
  return static_cast<int32_t>(v < 0 ? -0.5 + fixed : 0.5 + fixed);
}

Taps::Taps(int in_size, int out_size, bool exact, bool simd) {
  const double scale = static_cast<double>(in_size) / out_size;
  const double filterscale = scale < 1.0 ? 1.0 : scale;
  const double support = kBicubicSupport * filterscale;
  const double ss = 1.0 / filterscale;
  ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  npairs = (ksize + 1) / 2;
  first.resize(out_size);
  count.resize(out_size);
  // Normalized weights first (zero past each output's count), then the fixed point.
  std::vector<double> norm(static_cast<size_t>(out_size) * ksize, 0.0);
  for (int i = 0; i < out_size; ++i) {
    const double center = (i + 0.5) * scale;
    int lo = static_cast<int>(center - support + 0.5);
    if (lo < 0) lo = 0;
    int hi = static_cast<int>(center + support + 0.5);
    if (hi > in_size) hi = in_size;
    double* w = &norm[static_cast<size_t>(i) * ksize];
    double total = 0.0;
    for (int k = 0; k < hi - lo; ++k) {
      w[k] = bicubic((k + lo - center + 0.5) * ss);
      total += w[k];
    }
    if (total != 0.0)
      for (int k = 0; k < hi - lo; ++k) w[k] /= total;
    first[i] = lo;
    count[i] = hi - lo;
  }
  const bool bytes_fit = filterscale <= kByteMaxScale && npairs <= kBytePairs;
  kind = exact || !simd ? Kind::kExact : bytes_fit ? Kind::kFast8 : Kind::kFast16;
  if (kind == Kind::kFast8 && !quantize_bytes(norm)) kind = Kind::kFast16;
  if (kind == Kind::kExact) {
    weights.resize(norm.size());
    for (size_t j = 0; j < norm.size(); ++j) weights[j] = round_fixed(norm[j], kPrecisionBits);
  } else if (kind == Kind::kFast16) {
    pairs.assign(static_cast<size_t>(out_size) * npairs, 0);
    for (size_t j = 0; j < norm.size(); ++j) {
      const size_t i = j / ksize, k = j % ksize;
      const auto w = static_cast<uint16_t>(static_cast<int16_t>(round_fixed(norm[j], kFastBits)));
      pairs[i * npairs + k / 2] |= static_cast<int32_t>(w) << (16 * (k % 2));
    }
  }
}

// kFast8's weights, each output's corrected on its largest so that they sum to exactly
// one. False (and no bytes) where a sum could leave 16 bits: 255 times the weights'
// magnitudes, plus the rounding half.
bool Taps::quantize_bytes(const std::vector<double>& norm) {
  bytes.assign(first.size() * npairs, 0);
  std::vector<int> q(ksize);
  for (size_t i = 0; i < first.size(); ++i) {
    int sum = 0, largest = 0, magnitude = 0;
    for (int k = 0; k < ksize; ++k) {
      q[k] = round_fixed(norm[i * ksize + k], kByteBits);
      sum += q[k];
      if (q[k] > q[largest]) largest = k;
    }
    q[largest] += (1 << kByteBits) - sum;
    for (int k = 0; k < ksize; ++k) {
      magnitude += std::abs(q[k]);
      bytes[i * npairs + k / 2] |= static_cast<uint16_t>(static_cast<uint8_t>(q[k]) << (8 * (k % 2)));
    }
    if (255 * magnitude + (1 << (kByteBits - 1)) > INT16_MAX) {
      bytes.clear();
      return false;
    }
  }
  return true;
}

inline uint8_t clip8(int32_t acc) {
  const int32_t v = acc >> kPrecisionBits;
  return static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
}

// A packed uint8 (H, W, 3) image (rows contiguous; the Python side makes rotated views
// contiguous first, so the loops below know their strides at compile time).
struct Image {
  const uint8_t* data;
  Py_ssize_t height, width;
  Py_ssize_t first_row = 0;  // the row `data` holds: a window of a taller image
  const uint8_t* row(Py_ssize_t y) const { return data + (y - first_row) * width * 3; }
};

// The AVX2 horizontal pass works on groups of this many rows; bands of rows (small enough
// that their buffers stay in cache) are whole numbers of groups.
constexpr int kRowGroup = 8;

// The AVX2 passes run when the CPU has AVX2 (every x86-64 server of the last decade);
// `_kernels.simd(False)` selects the portable loops, which tests compare too.
bool cpu_has_avx2() {
  __builtin_cpu_init();  // needed before __builtin_cpu_supports in static initializers
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
bool g_simd = cpu_has_avx2();

// ---- portable passes --------------------------------------------------------

// Horizontal pass over input rows [y0, y1) into a packed (y1 - y0, out_w, 3) buffer.
void resample_rows_scalar(const Image& src, const Taps& taps, Py_ssize_t y0, Py_ssize_t y1,
                          uint8_t* __restrict dst) {
  const auto t = taps.exact();
  for (Py_ssize_t y = y0; y < y1; ++y) {
    const uint8_t* in = src.row(y);
    uint8_t* out = dst + (y - y0) * t.size * 3;
    for (Py_ssize_t x = 0; x < t.size; ++x) {
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

// Vertical pass for output rows [y0, y1) into a packed (y1 - y0, width, 3) buffer: each
// output row accumulates whole input rows, one tap at a time.
void resample_cols_scalar(const Image& src, const Taps& taps, Py_ssize_t y0, Py_ssize_t y1,
                          uint8_t* __restrict dst) {
  const Py_ssize_t n = src.width * 3;
  std::vector<int32_t> acc(n);
  for (Py_ssize_t y = y0; y < y1; ++y) {
    const int32_t* k = taps.exact().of(y);
    std::fill(acc.begin(), acc.end(), 1 << (kPrecisionBits - 1));
    for (int i = 0; i < taps.count[y]; ++i) {
      const uint8_t* p = src.row(taps.first[y] + i);
      for (Py_ssize_t x = 0; x < n; ++x) acc[x] += p[x] * k[i];
    }
    uint8_t* out = dst + (y - y0) * n;
    for (Py_ssize_t x = 0; x < n; ++x) out[x] = clip8(acc[x]);
  }
}

// ---- AVX2 passes --------------------------------------------------------------
// Both keep Pillow's arithmetic exactly (32-bit products and sums, the same rounding and
// clipping), only more values per instruction; integer sums do not depend on order.

// Shifts, clips and packs four vectors of 8 sums into 32 bytes, in order.
// `kBits` is the weights' fixed-point precision.
template <int kBits = kPrecisionBits>
__attribute__((target("avx2"))) inline __m256i pack_sums(__m256i a, __m256i b, __m256i c, __m256i d) {
  const __m256i ab = _mm256_packs_epi32(_mm256_srai_epi32(a, kBits), _mm256_srai_epi32(b, kBits));
  const __m256i cd = _mm256_packs_epi32(_mm256_srai_epi32(c, kBits), _mm256_srai_epi32(d, kBits));
  // The packs work per 128-bit lane; the dword permute puts the 4-byte groups back in order.
  return _mm256_permutevar8x32_epi32(_mm256_packus_epi16(ab, cd),
                                     _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

__attribute__((target("avx2"))) inline __m256i widen8(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

// Vertical pass, 32 channel values at a time with the sums kept in registers.
__attribute__((target("avx2")))
void resample_cols_avx2(const Image& src, const Taps& taps, Py_ssize_t y0, Py_ssize_t y1,
                        uint8_t* __restrict dst) {
  const Py_ssize_t n = src.width * 3;
  const __m256i half = _mm256_set1_epi32(1 << (kPrecisionBits - 1));
  for (Py_ssize_t y = y0; y < y1; ++y) {
    const int32_t* k = taps.exact().of(y);
    const uint8_t* top = src.row(taps.first[y]);
    const int count = taps.count[y];
    uint8_t* out = dst + (y - y0) * n;
    Py_ssize_t x = 0;
    for (; x + 32 <= n; x += 32) {
      __m256i a = half, b = half, c = half, d = half;
      for (int i = 0; i < count; ++i) {
        const uint8_t* p = top + i * n + x;
        const __m256i w = _mm256_set1_epi32(k[i]);
        a = _mm256_add_epi32(a, _mm256_mullo_epi32(widen8(p), w));
        b = _mm256_add_epi32(b, _mm256_mullo_epi32(widen8(p + 8), w));
        c = _mm256_add_epi32(c, _mm256_mullo_epi32(widen8(p + 16), w));
        d = _mm256_add_epi32(d, _mm256_mullo_epi32(widen8(p + 24), w));
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + x), pack_sums(a, b, c, d));
    }
    for (; x < n; ++x) {
      int32_t acc = 1 << (kPrecisionBits - 1);
      for (int i = 0; i < count; ++i) acc += top[i * n + x] * k[i];
      out[x] = clip8(acc);
    }
  }
}

// Horizontal pass, eight rows at a time. The rows are first interleaved column by column
// (for each input pixel x, the R, G, B of rows 0..7: 24 bytes), so that one tap is one
// weight times 24 contiguous bytes: three 8-lane multiply-adds where a pixel-at-a-time loop
// does one 3-lane one. Each output column's 24 bytes are then scattered back to the rows.
// A last group of fewer than eight rows repeats its last row and writes only the real ones.
//
// The interleaving is a transpose, done four pixels at a time in registers: each 256-bit
// register holds row k in its low half and row k + 4 in its high half, pixels widened to
// 4 bytes so that a 4x4 dword transpose per half swaps rows and pixels.
constexpr int kRows = kRowGroup, kColumn = 3 * kRows;

__attribute__((target("avx2"))) inline __m256i load_halves(const uint8_t* lo, const uint8_t* hi) {
  return _mm256_inserti128_si256(
      _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lo))),
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(hi)), 1);
}

// RGB RGB RGB RGB -> RGB0 RGB0 RGB0 RGB0 in each half, and back (the last 4 bytes then 0).
__attribute__((target("avx2"))) inline __m256i widen_rgb(__m256i v) {
  const __m128i m = _mm_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1);
  return _mm256_shuffle_epi8(v, _mm256_broadcastsi128_si256(m));
}
__attribute__((target("avx2"))) inline __m256i narrow_rgb(__m256i v) {
  const __m128i m = _mm_setr_epi8(0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1);
  return _mm256_shuffle_epi8(v, _mm256_broadcastsi128_si256(m));
}

__attribute__((target("avx2"))) inline void transpose4(__m256i* v) {
  const __m256i t0 = _mm256_unpacklo_epi32(v[0], v[1]), t1 = _mm256_unpackhi_epi32(v[0], v[1]);
  const __m256i t2 = _mm256_unpacklo_epi32(v[2], v[3]), t3 = _mm256_unpackhi_epi32(v[2], v[3]);
  v[0] = _mm256_unpacklo_epi64(t0, t2);
  v[1] = _mm256_unpackhi_epi64(t0, t2);
  v[2] = _mm256_unpacklo_epi64(t1, t3);
  v[3] = _mm256_unpackhi_epi64(t1, t3);
}

// Rows -> columns. 16-byte stores; each one's last 4 bytes are overwritten by the next.
__attribute__((target("avx2")))
void interleave_rows(const uint8_t* const* in, Py_ssize_t width, uint8_t* cols) {
  Py_ssize_t x = 0;
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
__attribute__((target("avx2")))
void scatter_columns(const uint8_t* cols, Py_ssize_t width, int rows, uint8_t* const* out) {
  Py_ssize_t x = 0;
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

// Every output column's taps over the interleaved input columns: 24 sums each, packed to
// bytes in `done`.
__attribute__((target("avx2")))
inline void taps_exact(const uint8_t* cols, const Taps& taps, uint8_t* __restrict done) {
  const auto t = taps.exact();
  const __m256i half = _mm256_set1_epi32(1 << (kPrecisionBits - 1));
  for (Py_ssize_t x = 0; x < t.size; ++x) {
    const uint8_t* p = cols + static_cast<size_t>(t.first[x]) * kColumn;
    const int32_t* k = t.of(x);
    __m256i a = half, b = half, c = half;
    for (int i = 0; i < t.count[x]; ++i, p += kColumn) {
      const __m256i w = _mm256_set1_epi32(k[i]);
      a = _mm256_add_epi32(a, _mm256_mullo_epi32(widen8(p), w));
      b = _mm256_add_epi32(b, _mm256_mullo_epi32(widen8(p + 8), w));
      c = _mm256_add_epi32(c, _mm256_mullo_epi32(widen8(p + 16), w));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(done + x * kColumn), pack_sums(a, b, c, c));
  }
}

// kFast16: two taps per multiply-add, with the 16-bit weights (see the fast vertical pass
// below). Each column is first stored once more paired with the next: its 24 values, each
// followed by the same value of the next column (48 bytes), which widened to 16 bits are
// the pairs vpmaddwd multiplies by two adjacent taps. `cols` has a column of zeros after
// the last, the last one's partner (an odd tap count pads its last pair with weight 0).
__attribute__((target("avx2"))) inline __m256i widen16(const uint8_t* p) {
  return _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

__attribute__((target("avx2")))
void pair_columns(const uint8_t* cols, Py_ssize_t width, uint8_t* pairs) {
  for (Py_ssize_t x = 0; x < width; ++x, cols += kColumn, pairs += 2 * kColumn) {
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

__attribute__((target("avx2")))
inline void taps_fast16(const uint8_t* pairs, const Taps& taps, uint8_t* __restrict done) {
  const auto t = taps.fast16();
  const __m256i half = _mm256_set1_epi32(1 << (kFastBits - 1));
  for (Py_ssize_t x = 0; x < t.size; ++x) {
    const uint8_t* p = pairs + static_cast<size_t>(t.first[x]) * 2 * kColumn;
    const int32_t* w = t.of(x);
    __m256i a = half, b = half, c = half;
    for (int i = 0; i < (t.count[x] + 1) / 2; ++i, p += 4 * kColumn) {
      const __m256i wv = _mm256_set1_epi32(w[i]);
      a = _mm256_add_epi32(a, _mm256_madd_epi16(widen16(p), wv));
      b = _mm256_add_epi32(b, _mm256_madd_epi16(widen16(p + 16), wv));
      c = _mm256_add_epi32(c, _mm256_madd_epi16(widen16(p + 32), wv));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(done + x * kColumn), pack_sums<kFastBits>(a, b, c, c));
  }
}

// kFast8: the same with the 8-bit weights, read straight from the columns (no pairing
// pass) as the kFast8 vertical pass reads rows: two adjacent columns' bytes, interleaved,
// are the pairs one vpmaddubsw multiplies by two taps, 16 values per instruction, summed
// in 16 bits. Each 32-byte load takes a column and 8 bytes of the next, whose sums land
// past the column's 24 bytes and are overwritten by the next column's store (`cols` has
// room after the last).
// Adds the two-tap products of a's and b's bytes, interleaved (a's take the first tap), to
// 16-bit sums: `lo` gets each 128-bit lane's first 8 values, `hi` its last 8.
__attribute__((target("avx2")))
inline void madd_pairs8(__m256i a, __m256i b, __m256i w, __m256i& lo, __m256i& hi) {
  lo = _mm256_add_epi16(lo, _mm256_maddubs_epi16(_mm256_unpacklo_epi8(a, b), w));
  hi = _mm256_add_epi16(hi, _mm256_maddubs_epi16(_mm256_unpackhi_epi8(a, b), w));
}

// Those sums as 32 bytes in their original order (the in-lane pack undoes the unpacks).
__attribute__((target("avx2"))) inline __m256i pack_sums8(__m256i lo, __m256i hi) {
  return _mm256_packus_epi16(_mm256_srai_epi16(lo, kByteBits), _mm256_srai_epi16(hi, kByteBits));
}

__attribute__((target("avx2")))
inline void taps_fast8(const uint8_t* cols, const Taps& taps, uint8_t* __restrict done) {
  const auto t = taps.fast8();
  const __m256i half = _mm256_set1_epi16(1 << (kByteBits - 1));
  for (Py_ssize_t x = 0; x < t.size; ++x) {
    const uint8_t* p = cols + static_cast<size_t>(t.first[x]) * kColumn;
    const uint16_t* w = t.of(x);
    __m256i lo = half, hi = half;
    for (int i = 0; i < (t.count[x] + 1) / 2; ++i, p += 2 * kColumn)
      madd_pairs8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)),
                  _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + kColumn)),
                  _mm256_set1_epi16(static_cast<int16_t>(w[i])), lo, hi);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(done + x * kColumn), pack_sums8(lo, hi));
  }
}

// Horizontal pass, eight rows at a time: interleave them into columns, run every output's
// taps, scatter the sums back to the rows.
template <Kind kKind>
__attribute__((target("avx2")))
void resample_rows_avx2(const Image& src, const Taps& taps, Py_ssize_t y0, Py_ssize_t y1,
                        uint8_t* __restrict dst) {
  const Py_ssize_t in_w = src.width, out_w = static_cast<Py_ssize_t>(taps.first.size());
  // Scratch, not zeroed: every byte read is written first (the band loop calls this often),
  // except the column of zeros after the last.
  const std::unique_ptr<uint8_t[]> cols(new uint8_t[(in_w + 1) * kColumn + 8]);
  std::memset(&cols[in_w * kColumn], 0, kColumn + 8);
  const std::unique_ptr<uint8_t[]> pairs(new uint8_t[kKind == Kind::kFast16 ? in_w * 2 * kColumn : 0]);
  const std::unique_ptr<uint8_t[]> done(new uint8_t[out_w * kColumn + 8]);
  for (Py_ssize_t y = y0; y < y1; y += kRows) {
    const int rows = static_cast<int>(std::min<Py_ssize_t>(kRows, y1 - y));
    const uint8_t* in[kRows];
    uint8_t* out[kRows];
    for (int r = 0; r < kRows; ++r) {
      in[r] = src.row(y + std::min(r, rows - 1));
      out[r] = dst + (y - y0 + r) * out_w * 3;
    }
    interleave_rows(in, in_w, cols.get());
    if (kKind == Kind::kExact) {
      taps_exact(cols.get(), taps, done.get());
    } else if (kKind == Kind::kFast8) {
      taps_fast8(cols.get(), taps, done.get());
    } else {
      pair_columns(cols.get(), in_w, pairs.get());
      taps_fast16(pairs.get(), taps, done.get());
    }
    scatter_columns(done.get(), out_w, rows, out);
  }
}

// ---- fast (approximate) AVX2 vertical passes -----------------------------------
// For exact=False. kFast16: the same taps with 16-bit weights (kFastBits), as Pillow-SIMD
// does, so that one multiply-add (vpmaddwd) does two taps on 16-bit pixels: 5-20% faster
// than the exact vertical pass; results differ from it by about a level at most. (Its
// horizontal pass does the same with columns paired in advance, taps_fast16: 5-10%
// faster.) kFast8, below, halves the work again where the shrink allows 8-bit weights.

// Vertical pass, 32 values at a time, two input rows per step: their bytes are interleaved
// and widened to the int16 pairs vpmaddwd takes. The sums come out in the order the packs
// restore, so no permute is needed.
__attribute__((target("avx2")))
void resample_cols_fast16(const Image& src, const Taps& taps, Py_ssize_t y0, Py_ssize_t y1,
                          uint8_t* __restrict dst) {
  const Py_ssize_t n = src.width * 3;
  const __m256i half = _mm256_set1_epi32(1 << (kFastBits - 1)), zero = _mm256_setzero_si256();
  std::vector<const uint8_t*> rows(2 * taps.npairs);
  for (Py_ssize_t y = y0; y < y1; ++y) {
    const int32_t* w = taps.fast16().of(y);
    const int npairs = (taps.count[y] + 1) / 2;
    for (int i = 0; i < 2 * npairs; ++i)  // a padding tap (weight 0) rereads the last row
      rows[i] = src.row(taps.first[y] + std::min(i, taps.count[y] - 1));
    uint8_t* out = dst + (y - y0) * n;
    Py_ssize_t x = 0;
    for (; x + 32 <= n; x += 32) {
      __m256i acc[4] = {half, half, half, half};
      for (int i = 0; i < npairs; ++i) {
        const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[2 * i] + x));
        const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[2 * i + 1] + x));
        const __m256i wv = _mm256_set1_epi32(w[i]);
        const __m256i lo = _mm256_unpacklo_epi8(a, b), hi = _mm256_unpackhi_epi8(a, b);
        acc[0] = _mm256_add_epi32(acc[0], _mm256_madd_epi16(_mm256_unpacklo_epi8(lo, zero), wv));
        acc[1] = _mm256_add_epi32(acc[1], _mm256_madd_epi16(_mm256_unpackhi_epi8(lo, zero), wv));
        acc[2] = _mm256_add_epi32(acc[2], _mm256_madd_epi16(_mm256_unpacklo_epi8(hi, zero), wv));
        acc[3] = _mm256_add_epi32(acc[3], _mm256_madd_epi16(_mm256_unpackhi_epi8(hi, zero), wv));
      }
      // Per 128-bit half, acc holds x + {0..3}, {4..7}, {8..11}, {12..15} (low half) and
      // the same + 16 (high half): the in-lane packs put them back in order.
      const __m256i s01 = _mm256_packs_epi32(_mm256_srai_epi32(acc[0], kFastBits), _mm256_srai_epi32(acc[1], kFastBits));
      const __m256i s23 = _mm256_packs_epi32(_mm256_srai_epi32(acc[2], kFastBits), _mm256_srai_epi32(acc[3], kFastBits));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + x), _mm256_packus_epi16(s01, s23));
    }
    for (; x < n; ++x) {
      int32_t acc = 1 << (kFastBits - 1);
      for (int i = 0; i < 2 * npairs; ++i)
        acc += rows[i][x] * static_cast<int16_t>(w[i / 2] >> (16 * (i % 2)));
      const int32_t v = acc >> kFastBits;
      out[x] = static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
    }
  }
}

// kFast8: the interleaved byte pairs of two rows go straight into vpmaddubsw, 16 values
// per instruction, summed in 16 bits. One output row per call, its tap-pair count a
// template argument so that the taps' rows and weights stay in registers across the row
// (kFast8 taps have at most five pairs): ~1.5x faster than looping over a runtime count.
template <int kPairs>
__attribute__((target("avx2")))
void resample_row_fast8(const uint8_t* const* rows, const uint16_t* w, Py_ssize_t n,
                        uint8_t* __restrict out) {
  const __m256i half = _mm256_set1_epi16(1 << (kByteBits - 1));
  const uint8_t* r[2 * kPairs];
  __m256i wv[kPairs];
  for (int i = 0; i < kPairs; ++i) {
    r[2 * i] = rows[2 * i];
    r[2 * i + 1] = rows[2 * i + 1];
    wv[i] = _mm256_set1_epi16(static_cast<int16_t>(w[i]));
  }
  Py_ssize_t x = 0;
  for (; x + 32 <= n; x += 32) {
    __m256i lo = half, hi = half;
    for (int i = 0; i < kPairs; ++i)
      madd_pairs8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r[2 * i] + x)),
                  _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r[2 * i + 1] + x)), wv[i], lo, hi);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + x), pack_sums8(lo, hi));
  }
  for (; x < n; ++x) {
    int32_t acc = 1 << (kByteBits - 1);
    for (int i = 0; i < 2 * kPairs; ++i) acc += r[i][x] * static_cast<int8_t>(w[i / 2] >> (8 * (i % 2)));
    const int32_t v = acc >> kByteBits;
    out[x] = static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
  }
}

void resample_cols_fast8(const Image& src, const Taps& taps, Py_ssize_t y0, Py_ssize_t y1,
                         uint8_t* __restrict dst) {
  static constexpr decltype(&resample_row_fast8<1>) kRow[] = {
      resample_row_fast8<1>, resample_row_fast8<2>, resample_row_fast8<3>, resample_row_fast8<4>,
      resample_row_fast8<5>};
  static_assert(std::size(kRow) == kBytePairs);
  const Py_ssize_t n = src.width * 3;
  const uint8_t* rows[2 * kBytePairs];
  for (Py_ssize_t y = y0; y < y1; ++y) {
    const int npairs = (taps.count[y] + 1) / 2;
    for (int i = 0; i < 2 * npairs; ++i)  // a padding tap (weight 0) rereads the last row
      rows[i] = src.row(taps.first[y] + std::min(i, taps.count[y] - 1));
    kRow[npairs - 1](rows, taps.fast8().of(y), n, dst + (y - y0) * n);
  }
}

// Pass dispatch by the taps' kind (kExact runs the portable loops where the CPU lacks AVX2).
void resample_rows(const Image& src, const Taps& taps, Py_ssize_t y0, Py_ssize_t y1, uint8_t* dst) {
  switch (taps.kind) {
    case Kind::kExact:
      return g_simd ? resample_rows_avx2<Kind::kExact>(src, taps, y0, y1, dst)
                    : resample_rows_scalar(src, taps, y0, y1, dst);
    case Kind::kFast16:
      return resample_rows_avx2<Kind::kFast16>(src, taps, y0, y1, dst);
    case Kind::kFast8:
      return resample_rows_avx2<Kind::kFast8>(src, taps, y0, y1, dst);
  }
}

void resample_cols(const Image& src, const Taps& taps, Py_ssize_t y0, Py_ssize_t y1, uint8_t* dst) {
  switch (taps.kind) {
    case Kind::kExact:
      return g_simd ? resample_cols_avx2(src, taps, y0, y1, dst)
                    : resample_cols_scalar(src, taps, y0, y1, dst);
    case Kind::kFast16:
      return resample_cols_fast16(src, taps, y0, y1, dst);
    case Kind::kFast8:
      return resample_cols_fast8(src, taps, y0, y1, dst);
  }
}

Image packed(const uint8_t* data, Py_ssize_t height, Py_ssize_t width) {
  return Image{data, height, width};
}

// Which pass runs first. Pillow (>= 13) runs the vertical pass first when the height
// shrinks by more than twice as many pixels as the width does; the two orders round
// differently, so `exact` follows that rule to stay bit-identical (checked against
// Pillow in tests/test_vision.py). Otherwise (fast mode, already approximate) the
// cheaper order wins: per tap and output pixel, the horizontal pass costs two to three
// times the vertical one (measured with the AVX2 passes: 2.7x with kFast8 at four taps;
// weighing it 3x picked orders up to 12% faster than 2x on shrinks near the boundary).
bool vertical_first(const Image& src, Py_ssize_t out_h, Py_ssize_t out_w, bool exact) {
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

// Streams the resized image band by band: `emit(rows, y0, y1)` receives packed uint8
// output rows [y0, y1). With `dst` (a packed out_h x out_w x 3 buffer) the rows are written
// there and `rows` points into it; without, they pass through a band-sized buffer (or come
// straight from the source when nothing is resized).
template <typename Emit>
void resize_bands(const Image& src, Py_ssize_t out_h, Py_ssize_t out_w, Py_ssize_t band,
                  bool exact, uint8_t* dst, Emit emit) {
  const Py_ssize_t row_bytes = out_w * 3;
  std::vector<uint8_t> chunk(dst ? 0 : static_cast<size_t>(band) * row_bytes);
  auto rows_at = [&](Py_ssize_t y) { return dst ? dst + y * row_bytes : chunk.data(); };
  auto band_end = [&](Py_ssize_t y) { return std::min(y + band, out_h); };
  const bool resize_h = out_w != src.width;
  if (vertical_first(src, out_h, out_w, exact)) {
    // Each band: vertical taps from the source, then the horizontal taps.
    const Taps vtaps(static_cast<int>(src.height), static_cast<int>(out_h), exact, g_simd);
    const Taps htaps(static_cast<int>(src.width), static_cast<int>(out_w), exact, g_simd);
    std::vector<uint8_t> tall(resize_h ? static_cast<size_t>(band) * src.width * 3 : 0);
    for (Py_ssize_t y = 0; y < out_h; y += band) {
      const Py_ssize_t y1 = band_end(y);
      uint8_t* out = rows_at(y);
      if (resize_h) {
        resample_cols(src, vtaps, y, y1, tall.data());
        resample_rows(packed(tall.data(), y1 - y, src.width), htaps, 0, y1 - y, out);
      } else {
        resample_cols(src, vtaps, y, y1, out);
      }
      emit(out, y, y1);
    }
    return;
  }
  if (out_h == src.height && !resize_h) {  // nothing to resize
    for (Py_ssize_t y = 0; y < out_h; y += band) {
      const Py_ssize_t y1 = band_end(y);
      if (dst) std::memcpy(rows_at(y), src.row(y), (y1 - y) * row_bytes);
      emit(dst ? rows_at(y) : src.row(y), y, y1);
    }
    return;
  }
  if (out_h == src.height) {  // only the width changes
    const Taps htaps(static_cast<int>(src.width), static_cast<int>(out_w), exact, g_simd);
    for (Py_ssize_t y = 0; y < out_h; y += band) {
      const Py_ssize_t y1 = band_end(y);
      resample_rows(src, htaps, y, y1, rows_at(y));
      emit(rows_at(y), y, y1);
    }
    return;
  }
  // Horizontal pass over a sliding window of input rows: each band computes only the rows
  // it newly needs, and the window stays small enough to remain in cache for the vertical taps.
  const Taps htaps(static_cast<int>(src.width), static_cast<int>(out_w), exact, g_simd);
  const Taps vtaps(static_cast<int>(src.height), static_cast<int>(out_h), exact, g_simd);
  Py_ssize_t span = 0;  // the most input rows one band reads
  for (Py_ssize_t y = 0; y < out_h; y += band) {
    const Py_ssize_t y1 = band_end(y) - 1;
    span = std::max<Py_ssize_t>(span, vtaps.first[y1] + vtaps.count[y1] - vtaps.first[y]);
  }
  std::vector<uint8_t> window(static_cast<size_t>(span) * row_bytes);
  Py_ssize_t lo = 0, hi = 0;  // input rows [lo, hi) are in the window
  for (Py_ssize_t y = 0; y < out_h; y += band) {
    const Py_ssize_t y1 = band_end(y);
    const Py_ssize_t need_lo = vtaps.first[y], need_hi = vtaps.first[y1 - 1] + vtaps.count[y1 - 1];
    const Py_ssize_t keep = std::max<Py_ssize_t>(0, hi - need_lo);
    if (keep > 0) std::memmove(window.data(), window.data() + (need_lo - lo) * row_bytes, keep * row_bytes);
    const Py_ssize_t from = std::max(hi, need_lo);
    resample_rows(src, htaps, from, need_hi, window.data() + (from - need_lo) * row_bytes);
    lo = need_lo;
    hi = need_hi;
    uint8_t* out = rows_at(y);
    resample_cols(Image{window.data(), src.height, out_w, lo}, vtaps, y, y1, out);
    emit(out, y, y1);
  }
}

// Geometry of the Qwen2-VL patch layout: each output row is one patch, ordered by
// (block row, block col, merge row, merge col); each patch is (C, T, P, P).
struct PatchLayout {
  Py_ssize_t patch, temporal, merge, grid_w;
  Py_ssize_t row_len() const { return 3 * temporal * patch * patch; }
  Py_ssize_t patch_row(Py_ssize_t gh, Py_ssize_t gw) const {
    const Py_ssize_t blocks_w = grid_w / merge;
    return (((gh / merge) * blocks_w + gw / merge) * merge + gh % merge) * merge + gw % merge;
  }
};

// ---- patch emission -----------------------------------------------------------
// Each patch is read straight from the resized band's packed RGB rows: `at` points at its
// top-left pixel, `stride` bytes apart per row.

// transformers' normalization of one channel: x = float32(v * rescale), the product in
// double, then (x - mean) / std in float32. The lookup table the Python side passes holds
// exactly these values. The vectors below compute them without double precision or a
// division, eight per instruction: x as v * rescale split into two floats (one rounding,
// by FMA), the quotient as a * (1 / std) corrected once by FMA, which rounds it correctly
// in all but rare cases. Whether they reproduce the table is checked on every call
// (normalize_matches); where they do not, the table is used.
struct Normalize {
  double rescale[3];
  float mean[3], std[3];
};

// One patch through `lut` (3 x 256): each channel's P x P values, written `temporal` times.
template <typename T>
void lookup_patch(const uint8_t* at, Py_ssize_t stride, Py_ssize_t P, Py_ssize_t temporal,
                  const T* lut, T* dst) {
  const Py_ssize_t pp = P * P;
  for (int c = 0; c < 3; ++c) {
    const T* table = lut + 256 * c;
    T* plane = dst + c * temporal * pp;
    for (Py_ssize_t py = 0; py < P; ++py)
      for (Py_ssize_t px = 0; px < P; ++px) plane[py * P + px] = table[at[py * stride + 3 * px + c]];
    for (Py_ssize_t t = 1; t < temporal; ++t) std::memcpy(plane + t * pp, plane, pp * sizeof(T));
  }
}

#define TARGET_FMA __attribute__((target("avx2,fma")))

// One channel's constants, broadcast.
struct ChannelVec {
  __m256 scale_hi, scale_lo, mean, std, inverse;
  TARGET_FMA ChannelVec(const Normalize& norm, int c) {
    const float hi = static_cast<float>(norm.rescale[c]);
    scale_hi = _mm256_set1_ps(hi);
    scale_lo = _mm256_set1_ps(static_cast<float>(norm.rescale[c] - hi));
    mean = _mm256_set1_ps(norm.mean[c]);
    std = _mm256_set1_ps(norm.std[c]);
    inverse = _mm256_set1_ps(1.0f / norm.std[c]);
  }
};

// The low eight bytes of `bytes`, normalized.
TARGET_FMA inline __m256 normalize8(__m128i bytes, const ChannelVec& k) {
  const __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
  const __m256 x = _mm256_fmadd_ps(v, k.scale_hi, _mm256_mul_ps(v, k.scale_lo));
  const __m256 a = _mm256_sub_ps(x, k.mean);
  const __m256 q = _mm256_mul_ps(a, k.inverse);
  return _mm256_fmadd_ps(_mm256_fnmadd_ps(q, k.std, a), k.inverse, q);
}

// Stores eight values: as float32, or rounded to bfloat16.
TARGET_FMA inline void store8(float* dst, __m256 v) { _mm256_storeu_ps(dst, v); }
TARGET_FMA inline void store8(uint16_t* dst, __m256 v) {
  // Round to nearest even on the bits (the values are finite), as torch does; the
  // saturating pack only narrows, since the results fit 16 bits.
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded =
      _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst),
                   _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1)));
}

// Byte shuffles that take one channel of a patch row (8 <= P <= 16 pixels) from the 48
// packed RGB bytes starting at its first pixel, read as three 16-byte chunks: pixels 0..7
// land in bytes 0..7 and pixels P-8..P-1 in bytes 8..15 (the two 8-value halves stored).
struct RowShuffle {
  __m128i mask[3][3];  // [channel][chunk]
  explicit RowShuffle(Py_ssize_t P) {  // plain SSE2: built even where AVX2 is missing
    for (int c = 0; c < 3; ++c)
      for (int k = 0; k < 3; ++k) {
        alignas(16) int8_t m[16];
        for (int j = 0; j < 16; ++j) {
          const Py_ssize_t pixel = j < 8 ? j : P - 16 + j;
          const Py_ssize_t byte = 3 * pixel + c - 16 * k;
          m[j] = byte >= 0 && byte < 16 ? static_cast<int8_t>(byte) : -1;
        }
        mask[c][k] = _mm_load_si128(reinterpret_cast<const __m128i*>(m));
      }
  }
};

// The same as lookup_patch, computed in vectors; 48 bytes must be readable from each row's
// first pixel.
template <typename T>
TARGET_FMA void normalize_patch(const uint8_t* at, Py_ssize_t stride, Py_ssize_t P,
                                Py_ssize_t temporal, const Normalize& norm,
                                const RowShuffle& shuffle, T* dst) {
  const Py_ssize_t pp = P * P;
  for (int c = 0; c < 3; ++c) {
    const ChannelVec k(norm, c);
    const __m128i* mask = shuffle.mask[c];
    T* plane = dst + c * temporal * pp;
    for (Py_ssize_t py = 0; py < P; ++py) {
      const __m128i* row = reinterpret_cast<const __m128i*>(at + py * stride);
      const __m128i v = _mm_or_si128(
          _mm_or_si128(_mm_shuffle_epi8(_mm_loadu_si128(row), mask[0]),
                       _mm_shuffle_epi8(_mm_loadu_si128(row + 1), mask[1])),
          _mm_shuffle_epi8(_mm_loadu_si128(row + 2), mask[2]));
      store8(plane + py * P, normalize8(v, k));
      store8(plane + py * P + P - 8, normalize8(_mm_srli_si128(v, 8), k));  // may overlap
    }
    for (Py_ssize_t t = 1; t < temporal; ++t) std::memcpy(plane + t * pp, plane, pp * sizeof(T));
  }
}

// Whether normalize8 reproduces `lut` bit for bit; only then does it replace the lookups.
template <typename T>
TARGET_FMA bool normalize_matches(const Normalize& norm, const T* lut) {
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

// Writes the patches of one block row (merge rows of patches, which the layout stores
// contiguously) into the output, in output order: one sequential stream of stores.
template <typename T>
class PatchWriter {
 public:
  // `lut` is (3, 256) values of type T, the values of `norm`; `out` the whole output.
  PatchWriter(const PatchLayout& L, Py_ssize_t width, const T* lut, const Normalize& norm, T* out)
      : L_(L), width_(width), lut_(lut), norm_(norm), out_(out), shuffle_(L.patch),
        edge_(static_cast<size_t>(48 * L.patch)) {
    simd_ = g_simd && L.patch >= 8 && L.patch <= 16 && normalize_matches(norm, lut);
  }

  // `rows`: the merge * patch_size packed RGB rows from patch row `gh` (a multiple of merge).
  void write(const uint8_t* rows, Py_ssize_t gh) {
    const Py_ssize_t P = L_.patch, m = L_.merge, stride = 3 * width_;
    T* dst = out_ + L_.patch_row(gh, 0) * L_.row_len();
    // Patch q of the block row is at (gh + q / m % m, q / (m * m) * m + q % m).
    for (Py_ssize_t q = 0; q < L_.grid_w * m; ++q, dst += L_.row_len()) {
      const Py_ssize_t y0 = (q / m % m) * P, x0 = (q / (m * m) * m + q % m) * P;
      const uint8_t* at = rows + y0 * stride + 3 * x0;
      if (!simd_) {
        lookup_patch(at, stride, P, L_.temporal, lut_, dst);
      } else if (3 * x0 + 48 <= stride) {
        normalize_patch(at, stride, P, L_.temporal, norm_, shuffle_, dst);
      } else {  // the row ends within 48 bytes: read a copy instead
        for (Py_ssize_t py = 0; py < P; ++py) std::memcpy(&edge_[48 * py], at + py * stride, 3 * P);
        normalize_patch(edge_.data(), 48, P, L_.temporal, norm_, shuffle_, dst);
      }
    }
  }

 private:
  PatchLayout L_;
  Py_ssize_t width_;
  const T* lut_;
  Normalize norm_;
  T* out_;
  RowShuffle shuffle_;
  bool simd_;
  std::vector<uint8_t> edge_;  // (P, 48): the last patch of a row, copied
};

// ---- output blocks ---------------------------------------------------------------
// Memory for outputs the caller did not provide. A fresh buffer of tens or hundreds of
// megabytes comes from the OS one zeroed page per fault on first touch, which here costs
// as much as the work written into it (~20 ms for the 290 MB of a 12-megapixel image); so
// one freed block, the largest, is kept and handed out again to any request it holds:
// a caller processing images one after another, of whatever sizes, reuses one block. A
// Block exposes the buffer protocol, and numpy arrays (and torch tensors over them) hold a
// reference to it, so its memory is reused only once nothing views it.
struct Block {
  PyObject_HEAD
  void* data;
  Py_ssize_t size;
};

constexpr Py_ssize_t kSpareLimit = Py_ssize_t{1} << 29;  // idle memory kept: 512 MiB at most
void* g_spare = nullptr;
Py_ssize_t g_spare_size = 0;

// Asks for transparent huge pages on a large block, as numpy does for its arrays: where the
// kernel grants them on request (THP "madvise" mode), first touch faults once per 2 MiB
// instead of once per 4 KiB (here 45 instead of 180 ms for a fresh 290 MB output).
void advise_huge_pages(void* data, Py_ssize_t nbytes) {
#ifdef MADV_HUGEPAGE
  constexpr uintptr_t kPage = 4096;
  if (nbytes < (Py_ssize_t{4} << 20)) return;
  const uintptr_t start = (reinterpret_cast<uintptr_t>(data) + kPage - 1) & ~(kPage - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + nbytes) & ~(kPage - 1);
  madvise(reinterpret_cast<void*>(start), end - start, MADV_HUGEPAGE);  // advice only
#endif
}

int block_getbuffer(PyObject* self, Py_buffer* view, int flags) {
  auto* block = reinterpret_cast<Block*>(self);
  return PyBuffer_FillInfo(view, self, block->data, block->size, 0, flags);
}

void block_dealloc(PyObject* self) {
  auto* block = reinterpret_cast<Block*>(self);
  if (block->size <= kSpareLimit && block->size >= g_spare_size) {  // the GIL guards the spare
    std::free(g_spare);
    g_spare = block->data;
    g_spare_size = block->size;
  } else {
    std::free(block->data);
  }
  PyObject_Free(self);
}

PyBufferProcs kBlockBuffer = {block_getbuffer, nullptr};
PyTypeObject kBlockType = {PyVarObject_HEAD_INIT(nullptr, 0)};

// empty(nbytes) -> Block: uninitialized memory, the spare block when it is large enough.
PyObject* py_empty(PyObject*, PyObject* args) {
  Py_ssize_t nbytes;
  if (!PyArg_ParseTuple(args, "n", &nbytes)) return nullptr;
  if (nbytes < 0) return PyErr_Format(PyExc_ValueError, "negative size");
  auto* block = PyObject_New(Block, &kBlockType);
  if (!block) return nullptr;
  if (g_spare && g_spare_size >= nbytes) {
    block->data = g_spare;
    block->size = g_spare_size;
    g_spare = nullptr;
    g_spare_size = 0;
  } else {
    block->size = nbytes;
    block->data = std::malloc(std::max<Py_ssize_t>(nbytes, 1));
    if (!block->data) {
      PyObject_Free(block);
      return PyErr_NoMemory();
    }
    advise_huge_pages(block->data, nbytes);
  }
  return reinterpret_cast<PyObject*>(block);
}

// ---- C++ errors -> Python errors ----------------------------------------------
// The passes allocate (taps, band buffers, scratch: see resize_bands), so they can throw
// std::bad_alloc, and a C++ exception escaping a PyCFunction ends the process
// (std::terminate: SIGABRT, a dead DataLoader worker). So every entry point is wrapped in
// `guarded`, and the work done without the GIL runs through `without_gil`, which catches
// there (an exception must not skip Py_END_ALLOW_THREADS) and sets the Python error once
// the GIL is back.

// Sets the Python error for a caught C++ exception (the GIL held): std::bad_alloc (and
// bad_array_new_length) -> MemoryError, std::logic_error (length_error, invalid_argument,
// out_of_range, domain_error: a request the kernel cannot serve) -> ValueError, anything
// else -> RuntimeError; each with the exception's what().
void set_python_error(const std::exception_ptr& error) noexcept {
  try {
    std::rethrow_exception(error);
  } catch (const std::bad_alloc& e) {
    PyErr_Format(PyExc_MemoryError, "fastload._kernels: out of memory (%s)", e.what());
  } catch (const std::logic_error& e) {
    PyErr_Format(PyExc_ValueError, "fastload._kernels: %s", e.what());
  } catch (const std::exception& e) {
    PyErr_Format(PyExc_RuntimeError, "fastload._kernels: %s", e.what());
  } catch (...) {
    PyErr_SetString(PyExc_RuntimeError, "fastload._kernels: unknown C++ exception");
  }
}

// Runs `work()` with the GIL released. False, with the Python error set, where it threw.
template <typename Work>
bool without_gil(Work&& work) {
  std::exception_ptr error;
  Py_BEGIN_ALLOW_THREADS
  try {
    work();
  } catch (...) {
    error = std::current_exception();
  }
  Py_END_ALLOW_THREADS
  if (!error) return true;
  set_python_error(error);
  return false;
}

// The PyCFunction `F` with whatever it throws while holding the GIL made a Python error.
template <PyObject* (*F)(PyObject*, PyObject*)>
PyObject* guarded(PyObject* self, PyObject* args) noexcept {
  try {
    return F(self, args);
  } catch (...) {
    set_python_error(std::current_exception());
    return nullptr;
  }
}

// ---- Python glue -----------------------------------------------------------

// The product of positive sizes; false where it overflows Py_ssize_t (a wrapped byte count
// could otherwise match a small buffer).
bool product(std::initializer_list<Py_ssize_t> factors, Py_ssize_t* out) {
  Py_ssize_t p = 1;
  for (const Py_ssize_t f : factors)
    if (__builtin_mul_overflow(p, f, &p)) return false;
  *out = p;
  return true;
}

// RAII holder for a Py_buffer.
struct Buffer {
  Py_buffer view{};
  bool ok = false;
  Buffer(PyObject* obj, int flags) { ok = PyObject_GetBuffer(obj, &view, flags) == 0; }
  ~Buffer() {
    if (ok) PyBuffer_Release(&view);
  }
};

bool image_from_buffer(const Py_buffer& v, Image* img) {
  if (v.ndim != 3 || v.shape[2] != 3 || v.itemsize != 1) {
    PyErr_SetString(PyExc_ValueError, "image must be a uint8 array of shape (H, W, 3)");
    return false;
  }
  if (v.shape[0] < 1 || v.shape[1] < 1) {
    PyErr_SetString(PyExc_ValueError, "image must not be empty");
    return false;
  }
  if (v.shape[0] > INT_MAX || v.shape[1] > INT_MAX) {  // the taps count pixels in int
    PyErr_SetString(PyExc_ValueError, "image is too large");
    return false;
  }
  *img = Image{static_cast<const uint8_t*>(v.buf), v.shape[0], v.shape[1]};
  return true;
}

bool check_size(const Py_buffer& v, Py_ssize_t expected, const char* what) {
  if (v.len != expected) {
    PyErr_Format(PyExc_ValueError, "%s has %zd bytes, expected %zd", what, v.len, expected);
    return false;
  }
  return true;
}

PyObject* py_resize(PyObject*, PyObject* args) {
  PyObject *src_obj, *dst_obj;
  Py_ssize_t out_h, out_w;
  int exact = 1;
  if (!PyArg_ParseTuple(args, "OOnn|p", &src_obj, &dst_obj, &out_h, &out_w, &exact))
    return nullptr;
  Buffer src(src_obj, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT);
  if (!src.ok) return nullptr;
  Buffer dst(dst_obj, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS);
  if (!dst.ok) return nullptr;
  Image img;
  Py_ssize_t bytes;
  if (out_h < 1 || out_w < 1) return PyErr_Format(PyExc_ValueError, "bad output size");
  if (out_h > INT_MAX || out_w > INT_MAX || !product({out_h, out_w, 3}, &bytes))
    return PyErr_Format(PyExc_ValueError, "output size %zdx%zd is too large", out_h, out_w);
  if (!image_from_buffer(src.view, &img) || !check_size(dst.view, bytes, "dst")) return nullptr;
  uint8_t* out = static_cast<uint8_t*>(dst.view.buf);
  if (!without_gil([&] {
        resize_bands(img, out_h, out_w, 4 * kRowGroup, exact, out,
                     [](const uint8_t*, Py_ssize_t, Py_ssize_t) {});
      }))
    return nullptr;
  Py_RETURN_NONE;
}

template <typename T>
void run_fused(const Image& img, Py_ssize_t out_h, Py_ssize_t out_w, const PatchLayout& L,
               bool exact, const T* lut, const Normalize& norm, T* out) {
  // Whole block rows per band, and a multiple of the horizontal pass's row group.
  const Py_ssize_t block = L.patch * L.merge;
  const Py_ssize_t band = block * kRowGroup / std::gcd<Py_ssize_t>(block, kRowGroup);
  PatchWriter<T> writer(L, out_w, lut, norm, out);
  resize_bands(img, out_h, out_w, band, exact, nullptr,
               [&](const uint8_t* rows, Py_ssize_t y0, Py_ssize_t y1) {
                 for (Py_ssize_t y = y0; y < y1; y += block)
                   writer.write(rows + (y - y0) * out_w * 3, y / L.patch);
               });
}

// `norm`, float64 (3, 3): per channel the rescale factor, mean and std.
bool read_normalize(const Buffer& buf, Normalize* norm) {
  if (!check_size(buf.view, 9 * sizeof(double), "norm")) return false;
  const double* n = static_cast<const double*>(buf.view.buf);
  for (int c = 0; c < 3; ++c) {
    norm->rescale[c] = n[3 * c];
    norm->mean[c] = static_cast<float>(n[3 * c + 1]);
    norm->std[c] = static_cast<float>(n[3 * c + 2]);
  }
  return true;
}

// The item size of a (3, 256) float32 or uint16 table; 0, with a Python error, otherwise.
Py_ssize_t table_item(const Buffer& lut) {
  const Py_ssize_t item = lut.view.len / (3 * 256);
  if (lut.view.len == 3 * 256 * item && (item == 2 || item == 4)) return item;
  PyErr_SetString(PyExc_ValueError, "lut must be (3, 256) float32 or uint16");
  return 0;
}

// process(src, out, lut, norm, out_h, out_w, patch, temporal, merge, exact=True)
// `lut` is float32 (3, 256) for float32 output or uint16 (3, 256) holding bfloat16
// bits for bfloat16 output; `out` has the matching item size. `norm` holds the
// rescale factor, mean and std whose arithmetic `lut` tabulates.
PyObject* py_process(PyObject*, PyObject* args) {
  PyObject *src_obj, *out_obj, *lut_obj, *norm_obj;
  Py_ssize_t out_h, out_w, patch, temporal, merge;
  int exact = 1;
  if (!PyArg_ParseTuple(args, "OOOOnnnnn|p", &src_obj, &out_obj, &lut_obj, &norm_obj, &out_h,
                        &out_w, &patch, &temporal, &merge, &exact))
    return nullptr;
  Py_ssize_t factor;
  if (patch < 1 || temporal < 1 || merge < 1 || !product({patch, merge}, &factor))
    return PyErr_Format(PyExc_ValueError, "bad patch layout (patch %zd, temporal %zd, merge %zd)",
                        patch, temporal, merge);
  if (out_h < factor || out_w < factor || out_h % factor || out_w % factor)
    return PyErr_Format(PyExc_ValueError,
                        "output size %zdx%zd is not a positive multiple of patch*merge=%zd",
                        out_h, out_w, factor);
  if (out_h > INT_MAX || out_w > INT_MAX)
    return PyErr_Format(PyExc_ValueError, "output size %zdx%zd is too large", out_h, out_w);
  Buffer src(src_obj, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT);
  if (!src.ok) return nullptr;
  Buffer out(out_obj, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS);
  if (!out.ok) return nullptr;
  Buffer lut(lut_obj, PyBUF_C_CONTIGUOUS);
  if (!lut.ok) return nullptr;
  Buffer norm_buf(norm_obj, PyBUF_C_CONTIGUOUS);
  Normalize norm;
  if (!norm_buf.ok || !read_normalize(norm_buf, &norm)) return nullptr;
  Image img;
  if (!image_from_buffer(src.view, &img)) return nullptr;
  const Py_ssize_t item = table_item(lut);
  if (!item) return nullptr;
  const PatchLayout L{patch, temporal, merge, out_w / patch};
  Py_ssize_t bytes;  // patches * 3 * temporal * patch^2 values of `item` bytes
  if (!product({out_h / patch, L.grid_w, 3, temporal, patch, patch, item}, &bytes))
    return PyErr_Format(PyExc_ValueError, "output size %zdx%zd is too large", out_h, out_w);
  if (!check_size(out.view, bytes, "out")) return nullptr;
  if (!without_gil([&] {
        if (item == 4)
          run_fused(img, out_h, out_w, L, exact, static_cast<const float*>(lut.view.buf), norm,
                    static_cast<float*>(out.view.buf));
        else
          run_fused(img, out_h, out_w, L, exact, static_cast<const uint16_t*>(lut.view.buf),
                    norm, static_cast<uint16_t*>(out.view.buf));
      }))
    return nullptr;
  Py_RETURN_NONE;
}

// computes_table(lut, norm) -> bool: whether process() computes this table's values in
// vectors rather than looking them up (it does so only where that reproduces them bit for bit).
PyObject* py_computes_table(PyObject*, PyObject* args) {
  PyObject *lut_obj, *norm_obj;
  if (!PyArg_ParseTuple(args, "OO", &lut_obj, &norm_obj)) return nullptr;
  Buffer lut(lut_obj, PyBUF_C_CONTIGUOUS);
  if (!lut.ok) return nullptr;
  Buffer norm_buf(norm_obj, PyBUF_C_CONTIGUOUS);
  Normalize norm;
  if (!norm_buf.ok || !read_normalize(norm_buf, &norm)) return nullptr;
  const Py_ssize_t item = table_item(lut);
  if (!item) return nullptr;
  const bool computed =
      g_simd && (item == 4 ? normalize_matches(norm, static_cast<const float*>(lut.view.buf))
                           : normalize_matches(norm, static_cast<const uint16_t*>(lut.view.buf)));
  return PyBool_FromLong(computed);
}

// simd(enabled=None) -> bool: whether the AVX2 passes run; with an argument, asks for them
// (granted only where the CPU has AVX2) or for the portable loops. For tests and benchmarks.
PyObject* py_simd(PyObject*, PyObject* args) {
  PyObject* enabled = Py_None;
  if (!PyArg_ParseTuple(args, "|O", &enabled)) return nullptr;
  if (enabled != Py_None) {
    const int want = PyObject_IsTrue(enabled);
    if (want < 0) return nullptr;
    g_simd = want && cpu_has_avx2();
  }
  return PyBool_FromLong(g_simd);
}

// Every entry point guarded: no C++ exception reaches Python's C code.
PyMethodDef kMethods[] = {
    {"simd", guarded<py_simd>, METH_VARARGS,
     "simd(enabled=None) -> bool: whether the AVX2 resize passes are used; pass False for the "
     "portable loops (True is granted only on CPUs with AVX2)."},
    {"resize", guarded<py_resize>, METH_VARARGS,
     "resize(src, dst, out_h, out_w, exact=True): bicubic resize of a C-contiguous "
     "uint8 (H, W, 3) image into a contiguous uint8 buffer; Pillow-identical unless "
     "exact is False (then the cheaper pass order and, with AVX2, 16- or 8-bit weights)."},
    {"process", guarded<py_process>, METH_VARARGS,
     "process(src, out, lut, norm, out_h, out_w, patch, temporal, merge, exact=True): fused "
     "resize, normalize and Qwen2-VL patchify into `out`."},
    {"empty", guarded<py_empty>, METH_VARARGS,
     "empty(nbytes) -> Block: uninitialized memory exposing the buffer protocol, reusing the "
     "largest freed block when it fits (no page faults for repeated large outputs)."},
    {"computes_table", guarded<py_computes_table>, METH_VARARGS,
     "computes_table(lut, norm) -> bool: whether process() computes these normalized values "
     "in vectors (it does only where that reproduces `lut` bit for bit) rather than looking them up."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_kernels",
                       "Fused Qwen2.5-VL image kernels (see csrc/kernels.cpp).", -1, kMethods};

}  // namespace

PyMODINIT_FUNC PyInit__kernels(void) {
  kBlockType.tp_name = "fastload._kernels.Block";
  kBlockType.tp_basicsize = sizeof(Block);
  kBlockType.tp_dealloc = block_dealloc;
  kBlockType.tp_as_buffer = &kBlockBuffer;
  kBlockType.tp_flags = Py_TPFLAGS_DEFAULT;
  kBlockType.tp_doc = "Memory for one output (see _kernels.empty).";
  if (PyType_Ready(&kBlockType) < 0) return nullptr;
  return PyModule_Create(&kModule);
}
