// The softmax focal loss kernels and launcher for double logits (see softmax_focal_loss_launch.h).
#include "softmax_focal_loss_launch.h"

namespace focal_cuda {
template FOCAL_SOFTMAX_FORWARD_TYPED(double);
}  // namespace focal_cuda
