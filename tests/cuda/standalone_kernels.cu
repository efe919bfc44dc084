// Compiles the device code with nothing but the CUDA toolkit: no ATen, no torch.
// tests/test_device_code.py builds this file; it is not part of the extension.
// The instantiations are the ones the launchers use.
#include "cuda/sigmoid_focal_loss_kernels.cuh"
#include "cuda/softmax_focal_loss_kernels.cuh"

namespace fd = focal_cuda::device;

#define FOCAL_INSTANTIATE_VEC(T, VEC)                                                                           \
  template __global__ void fd::softmax_focal_loss_rows_kernel<T, 256, 8, VEC>(                                  \
      const T*, T*, T*, fd::Geometry, fd::ForwardArgs<fd::AccumulateType<T>::type>);                            \
  template __global__ void fd::softmax_focal_loss_rows_kernel<T, 256, 32, VEC>(                                 \
      const T*, T*, T*, fd::Geometry, fd::ForwardArgs<fd::AccumulateType<T>::type>);                            \
  template __global__ void fd::softmax_focal_loss_rows_kernel<T, 512, 512, VEC>(                                \
      const T*, T*, T*, fd::Geometry, fd::ForwardArgs<fd::AccumulateType<T>::type>);                            \
  template __global__ void fd::focal_loss_backward_kernel<T, 256, VEC>(                                         \
      const T*, T*, fd::Geometry, const T*, int, const fd::AccumulateType<T>::type*);                           \
  template __global__ void fd::sigmoid_focal_loss_dense_kernel<T, T, 256, VEC>(                                 \
      const T*, const T*, T*, T*, long long, fd::SigmoidForwardArgs<fd::AccumulateType<T>::type>);              \
  template __global__ void fd::sigmoid_focal_loss_index_kernel<T, 256, 8, VEC>(                                 \
      const T*, T*, T*, long long, long long, fd::SigmoidForwardArgs<fd::AccumulateType<T>::type>);             \
  template __global__ void fd::sigmoid_focal_loss_index_kernel<T, 256, 32, VEC>(                                \
      const T*, T*, T*, long long, long long, fd::SigmoidForwardArgs<fd::AccumulateType<T>::type>);

#define FOCAL_INSTANTIATE(T)                                                                                    \
  FOCAL_INSTANTIATE_VEC(T, 1)                                                                                   \
  FOCAL_INSTANTIATE_VEC(T, 16 / sizeof(T))                                                                      \
  template __global__ void fd::softmax_focal_loss_channels_kernel<T, 256>(                                      \
      const T*, T*, T*, fd::Geometry, fd::ForwardArgs<fd::AccumulateType<T>::type>);

FOCAL_INSTANTIATE(float)
FOCAL_INSTANTIATE(double)
FOCAL_INSTANTIATE(__half)
FOCAL_INSTANTIATE(__nv_bfloat16)
// 16-bit logits with float32 dense targets (as autocast leaves them).
#define FOCAL_INSTANTIATE_FLOAT_TARGETS(T, VEC)                                                                 \
  template __global__ void fd::sigmoid_focal_loss_dense_kernel<T, float, 256, VEC>(                             \
      const T*, const float*, T*, T*, long long, fd::SigmoidForwardArgs<float>);
FOCAL_INSTANTIATE_FLOAT_TARGETS(__half, 1)
FOCAL_INSTANTIATE_FLOAT_TARGETS(__half, 8)
FOCAL_INSTANTIATE_FLOAT_TARGETS(__nv_bfloat16, 1)
FOCAL_INSTANTIATE_FLOAT_TARGETS(__nv_bfloat16, 8)
template __global__ void fd::count_valid_targets_kernel<256, float>(const void*, int, long long, long long, long long,
                                                                   long long, long long*, unsigned int*, float*);
template __global__ void fd::count_valid_targets_kernel<256, double>(const void*, int, long long, long long, long long,
                                                                    long long, long long*, unsigned int*, double*);
