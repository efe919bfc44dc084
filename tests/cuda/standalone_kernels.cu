// Compiles the device code with nothing but the CUDA toolkit: no ATen, no torch.
// tests/test_device_code.py builds this file; it is not part of the extension.
// The instantiations are the ones the launchers use (csrc/cuda/*_kernel.cu).
#include "cuda/sigmoid_focal_loss_kernels.cuh"
#include "cuda/softmax_focal_loss_kernels.cuh"

namespace fd = focal_cuda::device;

#define FOCAL_SOFTMAX_ARGS(T) \
  const T*, T*, fd::LossOut<T>, fd::Geometry, fd::SoftmaxArgs<fd::AccumulateType<T>::type>
#define FOCAL_SIGMOID_ARGS(T) fd::SigmoidArgs<fd::AccumulateType<T>::type>

#define FOCAL_INSTANTIATE_ROWS(T, GROUP) \
  template __global__ void fd::softmax_focal_loss_rows_kernel<T, GROUP>(FOCAL_SOFTMAX_ARGS(T));
#define FOCAL_INSTANTIATE_CHANNELS(T, C_MAX) \
  template __global__ void fd::softmax_focal_loss_channels_kernel<T, C_MAX>(FOCAL_SOFTMAX_ARGS(T));

#define FOCAL_INSTANTIATE_VEC(T, VEC)                                                                       \
  template __global__ void fd::focal_loss_backward_kernel<T, fd::kBlock, VEC>(                              \
      const T*, T*, fd::Geometry, const T*, int, const fd::AccumulateType<T>::type*);                       \
  template __global__ void fd::sigmoid_focal_loss_dense_kernel<T, T, VEC>(const T*, const T*, T*,            \
                                                                          fd::LossOut<T>, long long,         \
                                                                          FOCAL_SIGMOID_ARGS(T));            \
  template __global__ void fd::sigmoid_focal_loss_index_kernel<T, VEC>(                                     \
      const T*, T*, fd::LossOut<T>, long long, long long, fd::FastDivider, FOCAL_SIGMOID_ARGS(T));

#define FOCAL_INSTANTIATE_SIGMOID_CHANNELS(T, VEC)                                                          \
  template __global__ void fd::sigmoid_focal_loss_channels_kernel<T, VEC>(                                  \
      const T*, T*, fd::LossOut<T>, long long, long long, long long, long long, long long,                  \
      FOCAL_SIGMOID_ARGS(T));

#define FOCAL_INSTANTIATE(T)                                                                                \
  FOCAL_INSTANTIATE_VEC(T, 1)                                                                               \
  FOCAL_INSTANTIATE_VEC(T, 16 / sizeof(T))                                                                  \
  FOCAL_INSTANTIATE_SIGMOID_CHANNELS(T, 1)                                                                  \
  FOCAL_INSTANTIATE_SIGMOID_CHANNELS(T, fd::sigmoid_channels_vec<T>())                                      \
  FOCAL_INSTANTIATE_ROWS(T, 1)                                                                              \
  FOCAL_INSTANTIATE_ROWS(T, 2)                                                                              \
  FOCAL_INSTANTIATE_ROWS(T, 4)                                                                              \
  FOCAL_INSTANTIATE_ROWS(T, 8)                                                                              \
  FOCAL_INSTANTIATE_ROWS(T, 16)                                                                              \
  FOCAL_INSTANTIATE_ROWS(T, 32)                                                                              \
  FOCAL_INSTANTIATE_ROWS(T, 64)                                                                              \
  FOCAL_INSTANTIATE_ROWS(T, 128)                                                                              \
  FOCAL_INSTANTIATE_ROWS(T, 256)                                                                              \
  FOCAL_INSTANTIATE_CHANNELS(T, fd::channels_small_classes<T>())                                            \
  FOCAL_INSTANTIATE_CHANNELS(T, fd::channels_max_classes<T>())                                              \
  template __global__ void fd::softmax_focal_loss_long_rows_kernel<T, fd::long_rows_block<T>(), true>(       \
      FOCAL_SOFTMAX_ARGS(T));                                                                               \
  template __global__ void fd::softmax_focal_loss_long_rows_kernel<T, fd::long_rows_block<T>(), false>(      \
      FOCAL_SOFTMAX_ARGS(T));                                                                               \
  template __global__ void fd::softmax_focal_loss_positions_kernel<T, fd::positions_batch<T>(), true>(      \
      FOCAL_SOFTMAX_ARGS(T));                                                                               \
  template __global__ void fd::softmax_focal_loss_positions_kernel<T, fd::positions_batch<T>(), false>(     \
      FOCAL_SOFTMAX_ARGS(T));

FOCAL_INSTANTIATE(float)
FOCAL_INSTANTIATE(double)
FOCAL_INSTANTIATE(__half)
FOCAL_INSTANTIATE(__nv_bfloat16)

// 16-bit logits with float32 dense targets (as autocast leaves them).
#define FOCAL_INSTANTIATE_FLOAT_TARGETS(T, VEC)                                                             \
  template __global__ void fd::sigmoid_focal_loss_dense_kernel<T, float, VEC>(                              \
      const T*, const float*, T*, fd::LossOut<T>, long long, fd::SigmoidArgs<float>);
FOCAL_INSTANTIATE_FLOAT_TARGETS(__half, 1)
FOCAL_INSTANTIATE_FLOAT_TARGETS(__half, 8)
FOCAL_INSTANTIATE_FLOAT_TARGETS(__nv_bfloat16, 1)
FOCAL_INSTANTIATE_FLOAT_TARGETS(__nv_bfloat16, 8)

#define FOCAL_INSTANTIATE_COUNT(TARGET)                                                                     \
  template __global__ void fd::count_valid_targets_kernel<fd::kBlock, TARGET, float>(                       \
      const TARGET*, long long, long long, long long, long long, long long*, unsigned int*, float*);        \
  template __global__ void fd::count_valid_targets_kernel<fd::kBlock, TARGET, double>(                      \
      const TARGET*, long long, long long, long long, long long, long long*, unsigned int*, double*);
FOCAL_INSTANTIATE_COUNT(unsigned char)
FOCAL_INSTANTIATE_COUNT(short)
FOCAL_INSTANTIATE_COUNT(int)
FOCAL_INSTANTIATE_COUNT(long long)
