// The sigmoid focal loss kernels and launcher for __nv_bfloat16 logits (see sigmoid_focal_loss_launch.h).
#include "sigmoid_focal_loss_launch.h"

namespace focal_cuda {
template FOCAL_SIGMOID_FORWARD_TYPED(__nv_bfloat16);
}  // namespace focal_cuda
