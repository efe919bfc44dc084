// The softmax focal loss kernels and launcher for __nv_bfloat16 logits (see softmax_focal_loss_launch.h).
#include "softmax_focal_loss_launch.h"

namespace focal_cuda {
template FOCAL_SOFTMAX_FORWARD_TYPED(__nv_bfloat16);
}  // namespace focal_cuda
