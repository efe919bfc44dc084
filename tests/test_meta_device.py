"""Every tensor argument's device is checked, the meta device included.

A tensor on the meta device among the arguments routes the call to the fake (meta) kernel instead of the
CPU or CUDA kernel, so without a check there a meta target, alpha or normalizer was accepted and the
result was uninitialised memory. The fake kernels check the devices as the kernels do, so that
torch.compile's tracing raises the same errors as eager.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import focal_cuda
from conftest import CUDA, make_target, randn

OP = torch.ops.focal_cuda
META = torch.device("meta")


def _softmax_inputs(device, gen):
    x = randn((4, 5, 3), gen, device=device).requires_grad_()
    return x, make_target(x.shape, gen, device=device)


def _sigmoid_inputs(device, gen):
    x = randn((6, 5), gen, device=device).requires_grad_()
    dense = (torch.rand(x.shape, generator=gen) < 0.2).float().to(device)
    index = torch.randint(0, 6, (6,), generator=gen).to(device)
    return x, dense, index


@pytest.mark.parametrize("arg", ["target", "alpha", "alpha_scalar", "module_alpha"])
def test_meta_softmax_argument_raises(device, gen, arg):
    x, t = _softmax_inputs(device, gen)
    if arg == "target":
        call = lambda: focal_cuda.softmax_focal_loss(x, t.to(META))  # noqa: E731
    elif arg == "alpha":
        call = lambda: focal_cuda.softmax_focal_loss(x, t, alpha=torch.ones(5, device=META))  # noqa: E731
    elif arg == "alpha_scalar":
        call = lambda: focal_cuda.softmax_focal_loss(x, t, alpha=torch.tensor(0.25, device=META))  # noqa: E731
    else:
        criterion = focal_cuda.FusedFocalLoss(alpha=[0.5] * 5).to(META)
        call = lambda: criterion(x, t)  # noqa: E731
    name = "target" if arg == "target" else "alpha"
    with pytest.raises(ValueError, match=rf"{name} must be on the input's device {x.device}.*{name}\.device=meta"):
        call()
    assert x.grad is None


@pytest.mark.parametrize("arg", ["dense_targets", "index_targets", "normalizer", "module_targets"])
def test_meta_sigmoid_argument_raises(device, gen, arg):
    x, dense, index = _sigmoid_inputs(device, gen)
    if arg == "dense_targets":
        call = lambda: focal_cuda.sigmoid_focal_loss(x, dense.to(META))  # noqa: E731
    elif arg == "index_targets":
        call = lambda: focal_cuda.sigmoid_focal_loss(x, index.to(META), reduction="sum")  # noqa: E731
    elif arg == "normalizer":
        call = lambda: focal_cuda.sigmoid_focal_loss(  # noqa: E731
            x, index, reduction="mean", normalizer=torch.tensor(3.0, device=META))
    else:
        criterion = focal_cuda.FusedFocalLoss(mode="sigmoid", alpha=0.25, reduction="mean")
        call = lambda: criterion(x, dense.to(META))  # noqa: E731
    name = "normalizer" if arg == "normalizer" else "targets"
    with pytest.raises(ValueError, match=rf"{name} must be on the inputs' device {x.device}.*{name}\.device=meta"):
        call()
    assert x.grad is None


def test_meta_arguments_at_the_op_level(device, gen):
    """The registered ops check without the Python wrappers, forward and backward."""
    x, t = _softmax_inputs(device, gen)
    x = x.detach()
    with pytest.raises(ValueError, match=r"target must be on .*target\.device=meta"):
        OP.softmax_focal_loss_forward(x, t.to(META), None, 1.0, 2.0, -100, 1, True)
    with pytest.raises(ValueError, match=r"alpha must be on .*alpha\.device=meta"):
        OP.softmax_focal_loss_forward(x, t, torch.ones(5, device=META), 1.0, 2.0, -100, 1, True)
    _, dense, _ = _sigmoid_inputs(device, gen)
    with pytest.raises(ValueError, match=r"targets must be on .*targets\.device=meta"):
        OP.sigmoid_focal_loss_forward(x[:, :, 0].contiguous(), dense[:4].to(META), 0.25, 2.0, -100, 2, None, True)

    _, grad_input, state = OP.softmax_focal_loss_forward(x, t, None, 1.0, 2.0, -100, 2, True)
    one = torch.ones((), device=device)
    for op in (OP.focal_loss_backward, OP.focal_loss_backward_):
        with pytest.raises(ValueError, match=r"grad_output must be on .*grad_output\.device=meta"):
            op(grad_input, state, one.to(META))
        with pytest.raises(ValueError, match=r"state must be on .*state\.device=meta"):
            op(grad_input, state.to(META), one)


def test_meta_target_under_torch_compile(device, gen):
    x, t = _softmax_inputs(device, gen)
    fn = torch.compile(lambda a, b: focal_cuda.softmax_focal_loss(a, b), fullgraph=True, backend="eager")
    with pytest.raises(Exception, match=r"target must be on the input's device .*target\.device=meta"):
        fn(x, t.to(META))


def test_fake_kernels_check_devices():
    """Tracing (fake tensors) sees the kernels' device errors; a fake CUDA tensor needs no GPU."""
    with FakeTensorMode():
        x = torch.empty(4, 5, device="cuda")
        t = torch.zeros(4, dtype=torch.long)
        with pytest.raises(ValueError, match=r"target must be on the input's device cuda:0, got target\.device=cpu"):
            OP.softmax_focal_loss_forward(x, t, None, 1.0, 2.0, -100, 1, True)
        with pytest.raises(ValueError, match=r"alpha must be on .*alpha\.device=cpu"):
            # created on the fake device, not moved there (.cuda() initialises CUDA on torch < 2.5)
            OP.softmax_focal_loss_forward(x, torch.zeros(4, dtype=torch.long, device="cuda"), torch.ones(5), 1.0,
                                          2.0, -100, 1, True)
        with pytest.raises(ValueError, match=r"targets must be on .*targets\.device=cpu"):
            OP.sigmoid_focal_loss_forward(x, torch.zeros(4, 5), 0.25, 2.0, -100, 1, None, True)
        # a CPU scalar normalizer is allowed with CUDA inputs (read on the host), as the kernels allow it
        loss, grad, _ = OP.sigmoid_focal_loss_forward(x, torch.zeros(4, 5, device="cuda"), 0.25, 2.0, -100, 1,
                                                      torch.tensor(2.0), True)
        assert loss.device.type == "cuda" and grad.shape == x.shape
        with pytest.raises(ValueError, match=r"normalizer must be on .*normalizer\.device=cuda"):
            OP.sigmoid_focal_loss_forward(torch.empty(4, 5), torch.zeros(4, 5), 0.25, 2.0, -100, 1,
                                          torch.tensor(2.0, device="cuda"), True)
        with pytest.raises(ValueError, match=r"grad_output must be on .*grad_output\.device=cpu"):
            OP.focal_loss_backward(torch.empty(4, 5, device="cuda"), torch.empty(3, device="cuda"), torch.ones(()))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_alpha_scalar_on_another_device_raises(gen):
    x, t = _softmax_inputs("cpu", gen)
    with pytest.raises(ValueError, match=r"alpha must be on the input's device cpu or a CPU scalar"):
        focal_cuda.softmax_focal_loss(x, t, alpha=torch.tensor(0.25, device="cuda"))
    # a CPU scalar with CUDA logits is read on the host, as before
    xc, tc = x.detach().cuda(), t.cuda()
    torch.testing.assert_close(focal_cuda.softmax_focal_loss(xc, tc, alpha=torch.tensor(0.25)),
                               focal_cuda.softmax_focal_loss(xc, tc, alpha=0.25))
