"""Drop-in replacements of the focal losses inside detection frameworks.

- :mod:`focal_cuda.integrations.torchvision`: RetinaNet's classification loss.
- :mod:`focal_cuda.integrations.mmdet`: a loss module with mmdetection's ``FocalLoss`` interface.
"""
