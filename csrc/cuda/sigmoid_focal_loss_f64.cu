// The sigmoid focal loss kernels and launcher for double logits (see sigmoid_focal_loss_launch.h).
#include "sigmoid_focal_loss_launch.h"

namespace focal_cuda {
template FOCAL_SIGMOID_FORWARD_TYPED(double);
}  // namespace focal_cuda
