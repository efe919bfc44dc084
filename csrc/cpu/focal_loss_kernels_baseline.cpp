// The CPU kernel bodies for any x86-64 / aarch64 CPU (at::vec's default width).
#define FOCAL_CPU_NAMESPACE baseline
#include "sigmoid_focal_loss_impl.h"
#include "softmax_focal_loss_impl.h"
