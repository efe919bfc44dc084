// Operator schemas, defined once. The implementations register per dispatch key
// in csrc/cpu/ and csrc/cuda/; autograd and fake (meta) kernels are registered
// from Python (focal_cuda/_ops.py).
#include <Python.h>
#include <torch/library.h>

#include "focal_loss.h"

#ifndef FOCAL_CUDA_BUILT_WITH_CUDA
#define FOCAL_CUDA_BUILT_WITH_CUDA 0
#endif
#ifndef FOCAL_CUDA_ARCH_LIST
#define FOCAL_CUDA_ARCH_LIST ""
#endif
#ifndef FOCAL_CUDA_CUDA_VERSION
#define FOCAL_CUDA_CUDA_VERSION ""
#endif
#ifndef FOCAL_CUDA_TORCH_VERSION
#define FOCAL_CUDA_TORCH_VERSION ""
#endif

TORCH_LIBRARY(focal_cuda, m) {
  // Loss, the gradient with respect to the logits (empty unless compute_grad), and a
  // (3,) state: [forward gradient scale, backward gradient scale, consumed flag].
  // inplace_backward=True lets an eager backward consume the returned grad_input in
  // place (the caller promises not to use it): what the Python wrappers pass.
  // Gamma schedule (both losses): gamma_values[k] where p_t < gamma_thresholds[k] (the
  // first such k, thresholds increasing), `gamma` where p_t is above every threshold;
  // empty lists: constant gamma. loss_dtype: the loss's dtype (None: the input's; float32
  // for 16-bit inputs, as under autocast); the gradient keeps the input's dtype.
  m.def(
      "softmax_focal_loss_forward(Tensor input, Tensor target, Tensor? class_weight, float alpha, float gamma, "
      "int ignore_index, int reduction, bool compute_grad, bool inplace_backward=False, "
      "float[] gamma_thresholds=[], float[] gamma_values=[], ScalarType? loss_dtype=None) "
      "-> (Tensor loss, Tensor grad_input, Tensor state)");
  // Sigmoid focal loss over the class dim class_dim (-1: last, or 1: channel-first
  // (N, C, d1, ..., dk)). target: floating, the input's shape (dense, soft labels
  // allowed), or integer class indices of the input's shape without class_dim (C means
  // background, ignore_index drops the row). alpha < 0: no alpha weighting.
  // normalizer (reduction "mean" only): the denominator, a 0-dim tensor on the
  // input's device (read there, no host sync) or a 0-dim CPU tensor.
  m.def(
      "sigmoid_focal_loss_forward(Tensor input, Tensor target, float alpha, float gamma, int ignore_index, "
      "int reduction, Tensor? normalizer, bool compute_grad, bool inplace_backward=False, "
      "float[] gamma_thresholds=[], float[] gamma_values=[], ScalarType? loss_dtype=None, int class_dim=-1) "
      "-> (Tensor loss, Tensor grad_input, Tensor state)");
  // For either forward: applies grad_output to its gradient in place (skipped on the
  // device when the scale is exactly 1) and marks the state consumed.
  m.def("focal_loss_backward_(Tensor(a!) grad_input, Tensor(b!) state, Tensor grad_output) -> ()");
  // The same as a new tensor, for traced graphs (torch.compile), which cannot
  // mutate a saved activation: always one pass, never skipped.
  m.def("focal_loss_backward(Tensor grad_input, Tensor state, Tensor grad_output) -> Tensor");
}

namespace {

PyObject* build_info(PyObject*, PyObject*) {
  return Py_BuildValue("{s:O,s:s,s:s,s:s}", "cuda", FOCAL_CUDA_BUILT_WITH_CUDA ? Py_True : Py_False, "cuda_version",
                       FOCAL_CUDA_CUDA_VERSION, "cuda_arch_list", FOCAL_CUDA_ARCH_LIST, "torch_version",
                       FOCAL_CUDA_TORCH_VERSION);
}

PyObject* set_cuda_target_checks(PyObject*, PyObject* enabled) {
  focal_cuda::set_cuda_target_checks(PyObject_IsTrue(enabled) == 1);
  Py_RETURN_NONE;
}

PyObject* cuda_target_checks_enabled(PyObject*, PyObject*) {
  return PyBool_FromLong(focal_cuda::cuda_target_checks_enabled() ? 1 : 0);
}

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS, "What this build of focal_cuda was compiled with."},
    {"set_cuda_target_checks", set_cuda_target_checks, METH_O, "Turn the synchronising CUDA target check on or off."},
    {"cuda_target_checks_enabled", cuda_target_checks_enabled, METH_NOARGS, "Whether the CUDA target check is on."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "focal_cuda operators (registered under torch.ops.focal_cuda)",
                      -1, methods, nullptr, nullptr, nullptr, nullptr};

}  // namespace

// Importing focal_cuda._C runs the static TORCH_LIBRARY registrations above.
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
