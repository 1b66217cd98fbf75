// The output pool: memory for outputs the caller did not provide (`_kernels.empty`).
#pragma once

#define PY_SSIZE_T_CLEAN
#include <Python.h>

namespace fastload {

// Readies the Block type; false, with the Python error set, where that fails.
bool pool_init();

// empty(nbytes) -> Block: uninitialized memory exposing the buffer protocol, the spare
// block when it holds nbytes and nbytes is at least half of it.
PyObject* py_empty(PyObject* self, PyObject* args);

}  // namespace fastload
