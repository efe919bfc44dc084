"""Training examples: segmentation (LR-ASPP MobileNetV3) and detection (RetinaNet) with focal_cuda."""
