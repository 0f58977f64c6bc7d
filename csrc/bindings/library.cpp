// The sparsekernels operator library: every op's schema, declared once.
//
// Backends attach implementations to these schemas: cpu_ops.cpp (C++ kernels, CPU dispatch key),
// the CUDA bindings (CUDA key) and Python (fake/meta kernels, autograd, Triton). Ops take plain
// tensors — values and index tensors, never Python objects — so that torch.compile, export and
// CUDA graphs see through them.
#include <Python.h>
#include <torch/library.h>

#include "cpu/isa.h"

namespace {

// sparsekernels._C.cpu_isa() -> str: the instruction set the CPU kernels of this process run
// (csrc/cpu/isa.h), for sparsekernels.cpu_isa() and the benchmark's environment record.
PyObject* cpu_isa(PyObject* /*module*/, PyObject* /*unused*/) {
  return PyUnicode_FromString(sparsekernels::cpu::cpu_isa_name(sparsekernels::cpu::cpu_isa()));
}

PyMethodDef module_methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "Instruction set of the CPU kernels in this process."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

// A Python module named sparsekernels._C: loading it runs the static registrations below when
// `import sparsekernels` loads the shared library; its one function reports the CPU kernels' ISA.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, module_methods};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(sparsekernels, m) {
  // Block-sparse linear: y = input @ W^T (+ bias). W is [out_features, in_features] held as kept
  // blocks values[nnz, b, b], its BSR index (block_row_offsets, block_col_indices) and the
  // transposed CSC index (block_col_offsets, block_row_indices, block_value_indices).
  m.def(
      "bsr_linear(Tensor input, Tensor values, Tensor block_row_offsets, Tensor block_col_indices, "
      "Tensor block_col_offsets, Tensor block_row_indices, Tensor block_value_indices, Tensor? bias) -> Tensor");
  // grad_input = grad_output @ W, walking block columns through the CSC index.
  m.def(
      "bsr_linear_grad_input(Tensor grad_output, Tensor values, Tensor block_row_offsets, "
      "Tensor block_col_indices, Tensor block_col_offsets, Tensor block_row_indices, "
      "Tensor block_value_indices) -> Tensor");
  // grad of the kept blocks only: [nnz, b, b], a sampled dense-dense product.
  m.def(
      "bsr_linear_grad_values(Tensor grad_output, Tensor input, Tensor block_row_offsets, "
      "Tensor block_col_indices, Tensor block_col_offsets, Tensor block_row_indices, "
      "Tensor block_value_indices, int block_size) -> Tensor");

  // N:M linear: W keeps n of every m weights along in_features, held as values[out, in * n / m]
  // and the packed in-group positions (uint8, see csrc/cpu/nm.h for the bit layout).
  m.def("nm_linear(Tensor input, Tensor values, Tensor positions, int n, int m, Tensor? bias) -> Tensor");
  m.def("nm_linear_grad_input(Tensor grad_output, Tensor values, Tensor positions, int n, int m) -> Tensor");
  // grad of the kept values only: [out, in * n / m].
  m.def("nm_linear_grad_values(Tensor grad_output, Tensor input, Tensor positions, int n, int m) -> Tensor");

  // Bias gradient shared by every layout: grad_output summed over all leading dims, accumulated in
  // float32 and returned in grad_output's dtype.
  m.def("linear_bias_grad(Tensor grad_output) -> Tensor");
}
