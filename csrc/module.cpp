// fastload._kernels: the Qwen2.5-VL image kernel, and its Python glue.
//
// One pass from a decoder's uint8 RGB rows to the model's patch layout:
//   bicubic antialiased resize (bit-identical to Pillow's Image.resize(BICUBIC))
//   -> rescale + normalize (transformers' float arithmetic, bit for bit)
//   -> temporal duplication and the (merge, merge, C, T, P, P) patch order.
//
// The files, by operation (as Pillow's libImaging splits its own):
//   taps.h/.cpp            the bicubic filter and its taps in each kind's fixed point
//   resample.h             the passes' interface
//   resample_scalar.cpp    the portable passes (Pillow's arithmetic; any CPU)
//   resample_avx2.cpp      the AVX2 passes, every kind (compiled with -mavx2 -mfma)
//   cpu.h/.cpp             which of the two runs, chosen at run time
//   resize.h/.cpp          pass order and bands: the resize streamed band by band
//   patches.h/.cpp         normalize + patch layout, written from each band
//   patches_avx2.cpp       normalize in vectors (compiled with -mavx2 -mfma)
//   pool.h/.cpp            the output pool (`empty`)
//   module.cpp             this file: argument checks, C++ errors -> Python errors
// setup.py builds the *_avx2.cpp files only for x86 (defining FASTLOAD_AVX2 for the rest);
// elsewhere, or with FASTLOAD_PORTABLE=1, the portable code alone is built.
//
// The resize is Pillow's separable two-pass algorithm with its fixed-point coefficients,
// so the uint8 image it produces equals Pillow's exactly and the float output equals
// transformers' PIL backend. Output is written band by band (whole block rows of
// patches, sequentially) straight into the caller's buffer, which may live in shared
// memory. With exact=False the AVX2 passes trade Pillow's 32-bit weights for 16- or 8-bit
// ones (taps.h), which do two taps per instruction and stay within a level or two of
// Pillow. Plain CPython API over the buffer protocol: no torch at build time, and the GIL
// is released while working. No C++ exception leaves an entry point: each becomes a Python
// exception (see "C++ errors" below), so running out of memory is a MemoryError, not an
// abort.

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <climits>
#include <exception>
#include <initializer_list>
#include <new>
#include <stdexcept>

#include "cpu.h"
#include "image.h"
#include "patches.h"
#include "pool.h"
#include "resample.h"
#include "resize.h"

namespace fastload {
namespace {

// ---- C++ errors -> Python errors ----------------------------------------------
// The passes allocate (taps, band buffers, scratch), so they can throw std::bad_alloc,
// and a C++ exception escaping a PyCFunction ends the process (std::terminate: SIGABRT, a
// dead DataLoader worker). So every entry point is wrapped in `guarded`, and the work done
// without the GIL runs through `without_gil`, which catches there (an exception must not
// skip Py_END_ALLOW_THREADS) and sets the Python error once the GIL is back.

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

// ---- arguments ---------------------------------------------------------------

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

// ---- entry points ----------------------------------------------------------------

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
  if (!without_gil([&] { resize_bands(img, out_h, out_w, 4 * kRowGroup, exact, out, nullptr); }))
    return nullptr;
  Py_RETURN_NONE;
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
          write_patches(img, out_h, out_w, L, exact, static_cast<const float*>(lut.view.buf), norm,
                        static_cast<float*>(out.view.buf));
        else
          write_patches(img, out_h, out_w, L, exact, static_cast<const uint16_t*>(lut.view.buf),
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
  return PyBool_FromLong(item == 4 ? computes_table(norm, static_cast<const float*>(lut.view.buf))
                                   : computes_table(norm, static_cast<const uint16_t*>(lut.view.buf)));
}

// simd(enabled=None) -> bool: whether the AVX2 code runs; with an argument, asks for it
// (granted only where it is built and the CPU has AVX2) or for the portable code.
PyObject* py_simd(PyObject*, PyObject* args) {
  PyObject* enabled = Py_None;
  if (!PyArg_ParseTuple(args, "|O", &enabled)) return nullptr;
  if (enabled != Py_None) {
    const int want = PyObject_IsTrue(enabled);
    if (want < 0) return nullptr;
    set_simd(want);
  }
  return PyBool_FromLong(simd_enabled());
}

// Every entry point guarded: no C++ exception reaches Python's C code.
PyMethodDef kMethods[] = {
    {"simd", guarded<py_simd>, METH_VARARGS,
     "simd(enabled=None) -> bool: whether the AVX2 code is used; pass False for the portable "
     "code (True is granted only where the AVX2 code is built and the CPU has AVX2)."},
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
                       "Fused Qwen2.5-VL image kernels (see csrc/module.cpp).", -1, kMethods};

}  // namespace
}  // namespace fastload

PyMODINIT_FUNC PyInit__kernels(void) {
  if (!fastload::pool_init()) return nullptr;
  return PyModule_Create(&fastload::kModule);
}
