// The softmax focal loss kernels and launcher for float logits (see softmax_focal_loss_launch.h).
#include "softmax_focal_loss_launch.h"

namespace focal_cuda {
template FOCAL_SOFTMAX_FORWARD_TYPED(float);
}  // namespace focal_cuda
