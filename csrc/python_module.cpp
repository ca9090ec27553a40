// The Python module shell of the extension (setup.py builds it; the CMake build does not need it).
//
// Importing papo_kernels._C loads this shared library, whose static initializers register the
// papo_kernels_C ops (papo_kernels.cpp) with the dispatcher: the ops are then reached through
// torch.ops.papo_kernels_C, and the module itself exports nothing.
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {
      PyModuleDef_HEAD_INIT, "_C", "papo_kernels_C operators (loaded for their registrations)", -1, nullptr,
  };
  return PyModule_Create(&module);
}
