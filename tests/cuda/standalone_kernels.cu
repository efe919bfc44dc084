// Compiles the device code with nothing but the CUDA toolkit: no ATen, no torch.
// tests/test_device_code.py builds this file; it is not part of the extension.
#include "cuda/softmax_focal_loss_kernels.cuh"

namespace fd = focal_cuda::device;

#define FOCAL_INSTANTIATE_FORWARD(T, VEC)                                                                       \
  template __global__ void fd::softmax_focal_loss_rows_kernel<T, 256, 8, VEC>(                                  \
      const T*, T*, T*, fd::Geometry, fd::ForwardArgs<fd::AccumulateType<T>::type>);                            \
  template __global__ void fd::softmax_focal_loss_rows_kernel<T, 256, 32, VEC>(                                 \
      const T*, T*, T*, fd::Geometry, fd::ForwardArgs<fd::AccumulateType<T>::type>);                            \
  template __global__ void fd::softmax_focal_loss_rows_kernel<T, 512, 512, VEC>(                                \
      const T*, T*, T*, fd::Geometry, fd::ForwardArgs<fd::AccumulateType<T>::type>);                            \
  template __global__ void fd::softmax_focal_loss_backward_kernel<T, 256, VEC>(                                 \
      const T*, T*, fd::Geometry, const T*, bool, const fd::AccumulateType<T>::type*);

#define FOCAL_INSTANTIATE(T)                                                                                    \
  FOCAL_INSTANTIATE_FORWARD(T, 1)                                                                               \
  FOCAL_INSTANTIATE_FORWARD(T, 16 / sizeof(T))                                                                  \
  template __global__ void fd::softmax_focal_loss_channels_kernel<T, 256>(                                      \
      const T*, T*, T*, fd::Geometry, fd::ForwardArgs<fd::AccumulateType<T>::type>);

FOCAL_INSTANTIATE(float)
FOCAL_INSTANTIATE(double)
FOCAL_INSTANTIATE(__half)
FOCAL_INSTANTIATE(__nv_bfloat16)
template __global__ void fd::count_valid_targets_kernel<256, float>(const void*, int, long long, long long, long long,
                                                                   long long*, unsigned int*, float*);
template __global__ void fd::count_valid_targets_kernel<256, double>(const void*, int, long long, long long, long long,
                                                                    long long*, unsigned int*, double*);
