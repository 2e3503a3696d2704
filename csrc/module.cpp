// The Python extension module that setup.py builds (CUDAExtension defines TORCH_EXTENSION_NAME=flowopd_native):
// importing it loads the library, whose static TORCH_LIBRARY_FRAGMENT initialisers register every csrc/ op under
// torch.ops.flowopd. The CMake build compiles this file to nothing and makes a plain shared library for
// torch.ops.load_library instead. Keep this the only PYBIND11_MODULE in csrc/.
#ifdef TORCH_EXTENSION_NAME
#include <pybind11/pybind11.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.doc() = "flowopd native CUDA ops, registered as torch.ops.flowopd.*"; }
#endif
