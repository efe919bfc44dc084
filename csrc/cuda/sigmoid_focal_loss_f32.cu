// The sigmoid focal loss kernels and launcher for float logits (see sigmoid_focal_loss_launch.h).
#include "sigmoid_focal_loss_launch.h"

namespace focal_cuda {
template FOCAL_SIGMOID_FORWARD_TYPED(float);
}  // namespace focal_cuda
