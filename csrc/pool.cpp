// The output pool. A fresh buffer of tens or hundreds of megabytes comes from the OS one
// zeroed page per fault on first touch, which costs as much as the kernel's work written
// into it (benchmarks/RESULTS.md, image pipeline); so one freed block, the largest, is
// kept and handed out again to a request it holds that is at least half its size: a caller
// processing images one after another reuses one block, and small requests in between (a
// video's resized frames before its patches) do not take the block the next large output
// needs (benchmarks/RESULTS.md, videos). A Block exposes the buffer protocol, and
// numpy arrays (and torch tensors over them) hold a reference to it, so its memory is
// reused only once nothing views it.
#include "pool.h"

#include <sys/mman.h>

#include <cstdint>
#include <cstdlib>

namespace fastload {
namespace {

struct Block {
  PyObject_HEAD
  void* data;
  Py_ssize_t size;
};

constexpr Py_ssize_t kSpareLimit = Py_ssize_t{1} << 29;  // idle memory kept: 512 MiB at most
void* g_spare = nullptr;  // the GIL guards the spare
Py_ssize_t g_spare_size = 0;

// Asks for transparent huge pages on a large block, as numpy does for its arrays: where the
// kernel grants them on request (THP "madvise" mode), first touch faults once per 2 MiB
// instead of once per 4 KiB.
void advise_huge_pages(void* data, Py_ssize_t nbytes) {
#ifdef MADV_HUGEPAGE
  constexpr uintptr_t kPage = 4096;
  if (nbytes < (Py_ssize_t{4} << 20)) return;
  const uintptr_t start = (reinterpret_cast<uintptr_t>(data) + kPage - 1) & ~(kPage - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + nbytes) & ~(kPage - 1);
  madvise(reinterpret_cast<void*>(start), end - start, MADV_HUGEPAGE);  // advice only
#else
  (void)data, (void)nbytes;
#endif
}

int block_getbuffer(PyObject* self, Py_buffer* view, int flags) {
  auto* block = reinterpret_cast<Block*>(self);
  return PyBuffer_FillInfo(view, self, block->data, block->size, 0, flags);
}

void block_dealloc(PyObject* self) {
  auto* block = reinterpret_cast<Block*>(self);
  if (block->size <= kSpareLimit && block->size >= g_spare_size) {
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

}  // namespace

bool pool_init() {
  kBlockType.tp_name = "fastload._kernels.Block";
  kBlockType.tp_basicsize = sizeof(Block);
  kBlockType.tp_dealloc = block_dealloc;
  kBlockType.tp_as_buffer = &kBlockBuffer;
  kBlockType.tp_flags = Py_TPFLAGS_DEFAULT;
  kBlockType.tp_doc = "Memory for one output (see _kernels.empty).";
  return PyType_Ready(&kBlockType) == 0;
}

PyObject* py_empty(PyObject*, PyObject* args) {
  Py_ssize_t nbytes;
  if (!PyArg_ParseTuple(args, "n", &nbytes)) return nullptr;
  if (nbytes < 0) return PyErr_Format(PyExc_ValueError, "negative size");
  auto* block = PyObject_New(Block, &kBlockType);
  if (!block) return nullptr;
  if (g_spare && g_spare_size >= nbytes && nbytes >= g_spare_size / 2) {
    block->data = g_spare;
    block->size = g_spare_size;
    g_spare = nullptr;
    g_spare_size = 0;
  } else {
    block->size = nbytes;
    block->data = std::malloc(nbytes > 0 ? nbytes : 1);
    if (!block->data) {
      PyObject_Free(block);
      return PyErr_NoMemory();
    }
    advise_huge_pages(block->data, nbytes);
  }
  return reinterpret_cast<PyObject*>(block);
}

}  // namespace fastload
