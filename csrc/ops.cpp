// Operator schemas of landscape_kernels and their per-device registrations. This is the only file
// that includes the torch/library and Python headers; kernel files include ATen headers only.
#include <Python.h>
#include <torch/library.h>

#include "lanczos.h"
#include "persample.h"
#include "profiles.h"
#include "trajectory.h"

extern "C" {
// `import landscape_kernels._C` loads this shared library, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "landscape_kernels compiled operators", -1,
                                          nullptr};
  return PyModule_Create(&module_def);
}
}

namespace landscape_kernels {

TORCH_LIBRARY(landscape_kernels, m) {
  m.def("per_sample_sq_norms(Tensor A, Tensor D) -> Tensor");
  m.def("per_sample_gram(Tensor A, Tensor D) -> Tensor");
  m.def("per_sample_moments(Tensor A, Tensor D) -> (Tensor, Tensor)");
  m.def("per_sample_project(Tensor A, Tensor D, Tensor V) -> Tensor");
  m.def("per_sample_cov_matvec(Tensor A, Tensor D, Tensor V) -> Tensor");
  m.def("per_sample_weighted_sum(Tensor A, Tensor D, Tensor W) -> Tensor");
  m.def("per_sample_stats(Tensor A, Tensor D) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("lanczos_reorth(Tensor Q, Tensor W, int j) -> (Tensor, Tensor)");
  m.def("trajectory_cov_update(Tensor(a!) M2, Tensor(b!) mean, int count, Tensor X) -> ()");
  m.def("trajectory_project(Tensor X, Tensor mean, Tensor basis) -> (Tensor, Tensor)");
  m.def("profile_ce_losses(Tensor z0, Tensor zd, Tensor direction, Tensor offset, Tensor weight, Tensor? bias, "
        "Tensor target) -> Tensor");
}

#define LK_REGISTER_OPS(NS)                                    \
  m.impl("per_sample_sq_norms", &NS::per_sample_sq_norms);          \
  m.impl("per_sample_gram", &NS::per_sample_gram);                  \
  m.impl("per_sample_moments", &NS::per_sample_moments);            \
  m.impl("per_sample_project", &NS::per_sample_project);            \
  m.impl("per_sample_cov_matvec", &NS::per_sample_cov_matvec);      \
  m.impl("per_sample_weighted_sum", &NS::per_sample_weighted_sum);  \
  m.impl("per_sample_stats", &NS::per_sample_stats);                \
  m.impl("lanczos_reorth", &NS::lanczos_reorth);                    \
  m.impl("trajectory_cov_update", &NS::trajectory_cov_update);      \
  m.impl("trajectory_project", &NS::trajectory_project);            \
  m.impl("profile_ce_losses", &NS::profile_ce_losses);

TORCH_LIBRARY_IMPL(landscape_kernels, CPU, m) { LK_REGISTER_OPS(cpu) }

#ifdef LANDSCAPE_KERNELS_WITH_CUDA
TORCH_LIBRARY_IMPL(landscape_kernels, CUDA, m) { LK_REGISTER_OPS(cuda) }
#endif

}  // namespace landscape_kernels
