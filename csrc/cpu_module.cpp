// The Python module of one build of the CPU kernels (mvit2_kernels._cpu_<isa>): importing it
// registers that build's kernels (the TORCH_LIBRARY_IMPL blocks of csrc/cpu/*.cpp). setup.py
// builds one module per instruction set and mvit2_kernels/backends.py imports the best one the
// CPU runs, so a wheel built anywhere runs everywhere (csrc/build.json, docs/build.md).
#include "cpu/vec_isa.h"

#include <pybind11/pybind11.h>

#define MVIT2_STR2(x) #x
#define MVIT2_STR(x) MVIT2_STR2(x)

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mvit2_kernels CPU kernels for one instruction set (registered under torch.ops.mvit2)";
  m.attr("isa") = MVIT2_STR(MVIT2_CPU_ISA_NAME);      // the build's name: avx512, avx2, ...
  m.attr("vector_isa") = MVIT2_STR(CPU_CAPABILITY);  // what at::vec compiled to
}
