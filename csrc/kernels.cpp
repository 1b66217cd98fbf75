// fastload._kernels: the Qwen2.5-VL image kernel.
//
// One pass from a decoder's uint8 RGB rows to the model's patch layout:
//   bicubic antialiased resize (bit-identical to Pillow's Image.resize(BICUBIC))
//   -> rescale + normalize (a per-channel 256-entry lookup table)
//   -> temporal duplication and the (merge, merge, C, T, P, P) patch order.
//
// The resize is Pillow's separable two-pass algorithm with its fixed-point
// coefficients, so the uint8 image it produces equals Pillow's exactly and the
// float output equals transformers' PIL backend up to float rounding. Output is
// written band by band (one band = patch_size output rows) straight into the
// caller's buffer, which may live in shared memory. Plain CPython API over the
// buffer protocol: no torch at build time, and the GIL is released while working.

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <cmath>
#include <cstdint>
#include <immintrin.h>

#include <algorithm>
#include <cstring>
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

// Fixed-point filter taps for one axis: output i reads `count[i]` inputs from
// `first[i]` with weights `weights[i * ksize ...]`, exactly as Pillow computes them.
struct Taps {
  int ksize = 0;
  std::vector<int> first, count;
  std::vector<int32_t> weights;

  Taps(int in_size, int out_size) {
    const double scale = static_cast<double>(in_size) / out_size;
    const double filterscale = scale < 1.0 ? 1.0 : scale;
    const double support = kBicubicSupport * filterscale;
    const double ss = 1.0 / filterscale;
    ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
    first.resize(out_size);
    count.resize(out_size);
    weights.assign(static_cast<size_t>(out_size) * ksize, 0);
    std::vector<double> w(ksize);
    for (int i = 0; i < out_size; ++i) {
      const double center = (i + 0.5) * scale;
      int lo = static_cast<int>(center - support + 0.5);
      if (lo < 0) lo = 0;
      int hi = static_cast<int>(center + support + 0.5);
      if (hi > in_size) hi = in_size;
      const int n = hi - lo;
      double total = 0.0;
      for (int k = 0; k < n; ++k) {
        w[k] = bicubic((k + lo - center + 0.5) * ss);
        total += w[k];
      }
      for (int k = 0; k < n; ++k) {
        const double v = total != 0.0 ? w[k] / total : w[k];
        const double fixed = v * (1 << kPrecisionBits);
        weights[static_cast<size_t>(i) * ksize + k] =
            static_cast<int32_t>(v < 0 ? -0.5 + fixed : 0.5 + fixed);
      }
      first[i] = lo;
      count[i] = n;
    }
  }
};

inline uint8_t clip8(int32_t acc) {
  const int32_t v = acc >> kPrecisionBits;
  return static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
}

// A packed uint8 (H, W, 3) image (rows contiguous; the Python side makes rotated views
// contiguous first, so the loops below know their strides at compile time).
struct Image {
  const uint8_t* data;
  Py_ssize_t height, width;
  const uint8_t* row(Py_ssize_t y) const { return data + y * width * 3; }
};

// Hot loops that the compiler vectorizes are also compiled for AVX2 and SSE4.1, picked at
// load time by the CPU.
#define FASTLOAD_CLONES __attribute__((target_clones("avx2", "sse4.1", "default")))

// One output pixel of the horizontal pass: `n` taps `k` over pixels from `p`.
inline void tap_pixel(const uint8_t* p, const int32_t* k, int n, uint8_t* out) {
  int32_t r = 1 << (kPrecisionBits - 1), g = r, b = r;
  for (int i = 0; i < n; ++i) {
    r += p[3 * i] * k[i];
    g += p[3 * i + 1] * k[i];
    b += p[3 * i + 2] * k[i];
  }
  out[0] = clip8(r);
  out[1] = clip8(g);
  out[2] = clip8(b);
}

// Horizontal pass over input rows [y0, y1) into a packed (y1 - y0, out_w, 3) buffer.
void resample_rows_scalar(const Image& src, const Taps& taps, Py_ssize_t y0, Py_ssize_t y1,
                          uint8_t* __restrict dst) {
  // Locals, not vector members: stores through uint8_t* may alias anything, and the
  // compiler would otherwise reload every member after each output byte.
  const Py_ssize_t out_w = static_cast<Py_ssize_t>(taps.first.size());
  const int* const first = taps.first.data();
  const int* const count = taps.count.data();
  const int32_t* const weights = taps.weights.data();
  for (Py_ssize_t y = y0; y < y1; ++y) {
    const uint8_t* in = src.row(y);
    uint8_t* out = dst + (y - y0) * out_w * 3;
    for (Py_ssize_t x = 0; x < out_w; ++x)
      tap_pixel(in + 3 * first[x], weights + x * taps.ksize, count[x], out + 3 * x);
  }
}

// The same with SSE4.1, two output pixels per step: each 128-bit accumulator holds one
// pixel's R, G, B (and an ignored fourth lane, filled by 4-byte loads), the taps run to
// the zero-padded kernel size, and the results are clipped with saturating packs
// (equal to clip8). Pixels whose loads could leave the image fall back to the scalar loop.
__attribute__((target("sse4.1")))
void resample_rows_sse41(const Image& src, const Taps& taps, Py_ssize_t y0, Py_ssize_t y1,
                         uint8_t* __restrict dst) {
  const Py_ssize_t out_w = static_cast<Py_ssize_t>(taps.first.size());
  const int* const first = taps.first.data();
  const int* const count = taps.count.data();
  const int32_t* const weights = taps.weights.data();
  const int ksize = taps.ksize;
  const __m128i half = _mm_set1_epi32(1 << (kPrecisionBits - 1));
  Py_ssize_t safe_w = out_w;  // all ksize taps of pixels below this stay inside a row
  while (safe_w > 0 && first[safe_w - 1] + ksize >= src.width) --safe_w;
  for (Py_ssize_t y = y0; y < y1; ++y) {
    const uint8_t* in = src.row(y);
    uint8_t* out = dst + (y - y0) * out_w * 3;
    Py_ssize_t x = 0;
    for (; x + 1 < safe_w; x += 2) {
      const uint8_t* pa = in + 3 * first[x];
      const uint8_t* pb = in + 3 * first[x + 1];
      const int32_t* ka = weights + x * ksize;
      const int32_t* kb = ka + ksize;
      __m128i a = half, b = half;
      for (int i = 0; i < ksize; ++i) {
        int32_t va, vb;
        std::memcpy(&va, pa + 3 * i, 4);
        std::memcpy(&vb, pb + 3 * i, 4);
        a = _mm_add_epi32(a, _mm_mullo_epi32(_mm_cvtepu8_epi32(_mm_cvtsi32_si128(va)), _mm_set1_epi32(ka[i])));
        b = _mm_add_epi32(b, _mm_mullo_epi32(_mm_cvtepu8_epi32(_mm_cvtsi32_si128(vb)), _mm_set1_epi32(kb[i])));
      }
      const __m128i words = _mm_packs_epi32(_mm_srai_epi32(a, kPrecisionBits), _mm_srai_epi32(b, kPrecisionBits));
      const __m128i bytes = _mm_packus_epi16(words, words);  // r g b _ r g b _
      const int32_t lo = _mm_cvtsi128_si32(bytes), hi = _mm_extract_epi32(bytes, 1);
      std::memcpy(out + 3 * x, &lo, 3);
      std::memcpy(out + 3 * x + 3, &hi, 3);
    }
    for (; x < out_w; ++x)
      tap_pixel(in + 3 * first[x], weights + x * ksize, count[x], out + 3 * x);
  }
}

void resample_rows(const Image& src, const Taps& taps, Py_ssize_t y0, Py_ssize_t y1,
                   uint8_t* dst) {
  static const bool sse41 = __builtin_cpu_supports("sse4.1");
  if (sse41)
    resample_rows_sse41(src, taps, y0, y1, dst);
  else
    resample_rows_scalar(src, taps, y0, y1, dst);
}

// Vertical pass for output rows [y0, y1) into a packed (y1 - y0, width, 3) buffer. Each
// output row accumulates whole input rows (one tap at a time) in `acc`, a loop the
// compiler vectorizes; integer sums are exact, so the order does not change the result.
FASTLOAD_CLONES
void resample_cols(const Image& src, const Taps& taps, Py_ssize_t y0, Py_ssize_t y1,
                   uint8_t* dst, int32_t* acc) {
  const Py_ssize_t n = src.width * 3;
  for (Py_ssize_t y = y0; y < y1; ++y) {
    const int32_t* k = &taps.weights[static_cast<size_t>(y) * taps.ksize];
    for (Py_ssize_t x = 0; x < n; ++x) acc[x] = 1 << (kPrecisionBits - 1);
    for (int i = 0; i < taps.count[y]; ++i) {
      const uint8_t* p = src.row(taps.first[y] + i);
      const int32_t w = k[i];
      for (Py_ssize_t x = 0; x < n; ++x) acc[x] += p[x] * w;
    }
    uint8_t* out = dst + (y - y0) * n;
    for (Py_ssize_t x = 0; x < n; ++x) out[x] = clip8(acc[x]);
  }
}

Image packed(const uint8_t* data, Py_ssize_t height, Py_ssize_t width) {
  return Image{data, height, width};
}

// Which pass runs first. Pillow (>= 13) runs the vertical pass first when the height
// shrinks by more than twice as many pixels as the width does; the two orders round
// differently, so `pillow_order` follows that rule to stay bit-identical (checked against
// Pillow in tests/test_vision.py). Otherwise (fast mode, already approximate) the
// cheaper order wins: per tap, the horizontal pass costs about 3x the vectorized vertical one.
bool vertical_first(const Image& src, Py_ssize_t out_h, Py_ssize_t out_w, bool pillow_order) {
  if (out_h == src.height) return false;
  if (pillow_order)
    return out_h < src.height && (src.height - out_h) > 2 * (src.width - out_w);
  if (out_w == src.width) return true;
  const double kh = 4.0 * std::max(1.0, static_cast<double>(src.width) / out_w);
  const double kv = 4.0 * std::max(1.0, static_cast<double>(src.height) / out_h);
  const double h_first = 3 * kh * src.height * out_w + kv * out_h * out_w;
  const double v_first = kv * out_h * src.width + 3 * kh * out_h * out_w;
  return v_first < h_first;
}

// Streams the resized image band by band: `emit(rows, y0, y1)` receives packed uint8
// output rows [y0, y1).
template <typename Emit>
void resize_bands(const Image& src, Py_ssize_t out_h, Py_ssize_t out_w, Py_ssize_t band,
                  bool pillow_order, Emit emit) {
  const bool resize_h = out_w != src.width;
  std::vector<uint8_t> chunk(static_cast<size_t>(band) * out_w * 3);
  std::vector<int32_t> acc(static_cast<size_t>(std::max(src.width, out_w)) * 3);
  if (vertical_first(src, out_h, out_w, pillow_order)) {
    // Each band: vertical taps from the source, then the horizontal taps.
    Taps vtaps(static_cast<int>(src.height), static_cast<int>(out_h));
    Taps htaps(static_cast<int>(src.width), static_cast<int>(out_w));
    std::vector<uint8_t> tall(static_cast<size_t>(band) * src.width * 3);
    for (Py_ssize_t y = 0; y < out_h; y += band) {
      const Py_ssize_t y1 = y + band < out_h ? y + band : out_h;
      resample_cols(src, vtaps, y, y1, tall.data(), acc.data());
      if (resize_h)
        resample_rows(packed(tall.data(), y1 - y, src.width), htaps, 0, y1 - y, chunk.data());
      emit(resize_h ? chunk.data() : tall.data(), y, y1);
    }
    return;
  }
  // Horizontal pass once over all input rows; bands then cost only the vertical taps.
  std::vector<uint8_t> wide;
  const uint8_t* rows = src.data;
  if (resize_h) {
    wide.resize(static_cast<size_t>(src.height) * out_w * 3);
    resample_rows(src, Taps(static_cast<int>(src.width), static_cast<int>(out_w)), 0,
                  src.height, wide.data());
    rows = wide.data();
  }
  if (out_h == src.height) {
    for (Py_ssize_t y = 0; y < out_h; y += band)
      emit(rows + y * out_w * 3, y, y + band < out_h ? y + band : out_h);
    return;
  }
  const Image mid = packed(rows, src.height, out_w);
  Taps vtaps(static_cast<int>(src.height), static_cast<int>(out_h));
  for (Py_ssize_t y = 0; y < out_h; y += band) {
    const Py_ssize_t y1 = y + band < out_h ? y + band : out_h;
    resample_cols(mid, vtaps, y, y1, chunk.data(), acc.data());
    emit(chunk.data(), y, y1);
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

// Writes one band of packed uint8 rows (the patch_size rows of patch-row `gh`) into the
// patch layout through the per-channel lookup table `lut` (3 x 256 values of type T).
// Patches are written whole, one after another, so the output is filled sequentially.
template <typename T>
void emit_patches(const uint8_t* rows, Py_ssize_t gh, Py_ssize_t width, const PatchLayout& L,
                  const T* lut, T* out) {
  const Py_ssize_t P = L.patch, pp = P * P, row_bytes = width * 3;
  for (Py_ssize_t gw = 0; gw < L.grid_w; ++gw) {
    T* patch = out + L.patch_row(gh, gw) * L.row_len();
    const uint8_t* corner = rows + gw * P * 3;
    for (Py_ssize_t c = 0; c < 3; ++c) {
      const T* table = lut + c * 256;
      T* dst = patch + c * L.temporal * pp;
      for (Py_ssize_t py = 0; py < P; ++py) {
        const uint8_t* px = corner + py * row_bytes + c;
        for (Py_ssize_t x = 0; x < P; ++x) dst[py * P + x] = table[px[3 * x]];
      }
      for (Py_ssize_t t = 1; t < L.temporal; ++t) std::memcpy(dst + t * pp, dst, pp * sizeof(T));
    }
  }
}

// ---- Python glue -----------------------------------------------------------

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
  int pillow_order = 1;
  if (!PyArg_ParseTuple(args, "OOnn|p", &src_obj, &dst_obj, &out_h, &out_w, &pillow_order))
    return nullptr;
  Buffer src(src_obj, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT);
  if (!src.ok) return nullptr;
  Buffer dst(dst_obj, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS);
  if (!dst.ok) return nullptr;
  Image img;
  if (out_h < 1 || out_w < 1) return PyErr_Format(PyExc_ValueError, "bad output size");
  if (!image_from_buffer(src.view, &img) || !check_size(dst.view, out_h * out_w * 3, "dst"))
    return nullptr;
  uint8_t* out = static_cast<uint8_t*>(dst.view.buf);
  Py_BEGIN_ALLOW_THREADS
  resize_bands(img, out_h, out_w, out_h, pillow_order,
               [&](const uint8_t* rows, Py_ssize_t y0, Py_ssize_t y1) {
    std::memcpy(out + y0 * out_w * 3, rows, (y1 - y0) * out_w * 3);
  });
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

template <typename T>
void run_fused(const Image& img, Py_ssize_t out_h, Py_ssize_t out_w, const PatchLayout& L,
               bool pillow_order, const T* lut, T* out) {
  resize_bands(img, out_h, out_w, L.patch, pillow_order,
               [&](const uint8_t* rows, Py_ssize_t y0, Py_ssize_t) {
                 emit_patches(rows, y0 / L.patch, out_w, L, lut, out);
               });
}

// process(src, out, lut, out_h, out_w, patch, temporal, merge, pillow_order=True)
// `lut` is float32 (3, 256) for float32 output or uint16 (3, 256) holding bfloat16
// bits for bfloat16 output; `out` has the matching item size.
PyObject* py_process(PyObject*, PyObject* args) {
  PyObject *src_obj, *out_obj, *lut_obj;
  Py_ssize_t out_h, out_w, patch, temporal, merge;
  int pillow_order = 1;
  if (!PyArg_ParseTuple(args, "OOOnnnnn|p", &src_obj, &out_obj, &lut_obj, &out_h, &out_w, &patch,
                        &temporal, &merge, &pillow_order))
    return nullptr;
  const Py_ssize_t factor = patch * merge;
  if (patch < 1 || temporal < 1 || merge < 1 || out_h < factor || out_w < factor ||
      out_h % factor || out_w % factor)
    return PyErr_Format(PyExc_ValueError,
                        "output size %zdx%zd is not a positive multiple of patch*merge=%zd",
                        out_h, out_w, factor);
  Buffer src(src_obj, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT);
  if (!src.ok) return nullptr;
  Buffer out(out_obj, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS);
  if (!out.ok) return nullptr;
  Buffer lut(lut_obj, PyBUF_C_CONTIGUOUS);
  if (!lut.ok) return nullptr;
  Image img;
  if (!image_from_buffer(src.view, &img)) return nullptr;
  const Py_ssize_t item = lut.view.len / (3 * 256);
  if (lut.view.len != 3 * 256 * item || (item != 2 && item != 4))
    return PyErr_Format(PyExc_ValueError, "lut must be (3, 256) float32 or uint16");
  const PatchLayout L{patch, temporal, merge, out_w / patch};
  if (!check_size(out.view, (out_h / patch) * L.grid_w * L.row_len() * item, "out"))
    return nullptr;
  Py_BEGIN_ALLOW_THREADS
  if (item == 4)
    run_fused(img, out_h, out_w, L, pillow_order, static_cast<const float*>(lut.view.buf),
              static_cast<float*>(out.view.buf));
  else
    run_fused(img, out_h, out_w, L, pillow_order, static_cast<const uint16_t*>(lut.view.buf),
              static_cast<uint16_t*>(out.view.buf));
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

PyMethodDef kMethods[] = {
    {"resize", py_resize, METH_VARARGS,
     "resize(src, dst, out_h, out_w, pillow_order=True): bicubic resize of a C-contiguous "
     "uint8 (H, W, 3) image into a contiguous uint8 buffer; Pillow-identical unless "
     "pillow_order is False (then the cheaper pass order)."},
    {"process", py_process, METH_VARARGS,
     "process(src, out, lut, out_h, out_w, patch, temporal, merge, pillow_order=True): fused "
     "resize, normalize and Qwen2-VL patchify into `out`."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_kernels",
                       "Fused Qwen2.5-VL image kernels (see csrc/kernels.cpp).", -1, kMethods};

}  // namespace

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&kModule); }
