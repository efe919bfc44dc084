"""Drop-in replacements of the focal losses inside segmentation and detection libraries (docs/integrations.md).

- :mod:`focal_cuda.integrations.torchvision`: RetinaNet's classification loss.
- :mod:`focal_cuda.integrations.mmdet`: a loss module with mmdetection's ``FocalLoss`` interface.
- :mod:`focal_cuda.integrations.mmseg`: a loss module with mmsegmentation's ``FocalLoss`` interface.
- :mod:`focal_cuda.integrations.smp`: segmentation_models_pytorch's ``losses.FocalLoss``.
- :mod:`focal_cuda.integrations.fvcore`: fvcore's ``sigmoid_focal_loss(_jit)``, as detectron2 calls it.
- :mod:`focal_cuda.integrations.kornia`: kornia's ``focal_loss`` / ``FocalLoss`` and binary focal losses.
- :mod:`focal_cuda.integrations.ultralytics`: ultralytics' ``FocalLoss``.

None imports its peer library, except mmdet / mmseg, which register in their registry where installed.
"""
