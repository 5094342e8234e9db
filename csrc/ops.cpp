// Operator schemas of landscape_kernels and their per-device registrations. This is the only file
// that includes the torch/library and Python headers; kernel files include ATen headers only.
// schemas.def is found on the include path (setup.py adds landscape_kernels/kernels).
#include <Python.h>
#include <torch/library.h>

#include "lanczos.h"
#include "persample.h"
#include "profiles.h"
#include "trajectory.h"

extern "C" {
// `import landscape_kernels.kernels._C` loads this shared library, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "landscape_kernels compiled operators", -1,
                                          nullptr};
  return PyModule_Create(&module_def);
}
}

namespace landscape_kernels {

// The schemas and the per-device registrations both come from one table, schemas.def (in the Python
// package, so that the pure-torch fallback defines the same schemas when this extension is absent).
TORCH_LIBRARY(landscape_kernels, m) {
#define LK_OP(NAME, SCHEMA) m.def(#NAME SCHEMA);
#include "schemas.def"
#undef LK_OP
}

TORCH_LIBRARY_IMPL(landscape_kernels, CPU, m) {
#define LK_OP(NAME, SCHEMA) m.impl(#NAME, &cpu::NAME);
#include "schemas.def"
#undef LK_OP
}

#ifdef LANDSCAPE_KERNELS_WITH_CUDA
TORCH_LIBRARY_IMPL(landscape_kernels, CUDA, m) {
#define LK_OP(NAME, SCHEMA) m.impl(#NAME, &cuda::NAME);
#include "schemas.def"
#undef LK_OP
}
#endif

}  // namespace landscape_kernels
