"""``scaleinv::direct_conv2d`` — grouped 2-D convolution for few input channels per group.

The first convolution of an ensemble of M CNNs is a grouped convolution with
``groups = M`` and 1 (grey) or 3 (RGB) input channels per group. oneDNN's CPU kernels for
that shape are slow (forward + weight gradient of the grouped convolution take longer
than a per-member loop of convolutions plus the stacking copy); with so few input
channels the convolution does ~2·C_in·K² FLOP per output element and is bound by writing
its output and reading grad_out. This op computes it directly (C++ in
``csrc/direct_conv.cpp``; see there for the "flat rows" algorithm).

Contract::

    direct_conv2d(x, weight, bias, groups, padding) -> y
        == F.conv2d(x, weight, bias, stride=1, padding=padding, dilation=1, groups=groups)

* ``x``: float32 or float64 ``[N, groups·C_in, H, W]``, any strides (read through a
  contiguous copy when not contiguous); ``weight``: ``[groups·C_out, C_in, KH, KW]``,
  ``bias``: optional ``[groups·C_out]``, both of x's dtype.
* stride 1 and dilation 1 only; ``padding = (ph, pw)`` zero padding with
  ``0 <= ph < KH`` and ``0 <= pw < KW``; the output ``[N, groups·C_out, H + 2ph − KH + 1,
  W + 2pw − KW + 1]`` must be non-empty in H and W (N may be 0).
* Bad input raises ``ValueError``/``TypeError`` naming the argument; nothing is mutated.

::

    direct_conv2d_backward(grad_out, x, weight, groups, padding, output_mask)
        -> (grad_x?, grad_weight?, grad_bias?)   # each only where output_mask says

Numerics: every output is a sum of C_in·KH·KW products in x's dtype, weight gradients
sum the per-sample dot products in float64; each value is summed by one thread in a
fixed order (deterministic). Results match ``F.conv2d`` to rounding (the tests bound the
difference at 1e-5 of the largest entry in float32).

Autograd is registered in C++ (``csrc/direct_conv.cpp``) for every device.

CUDA: no Triton kernel, by decision. cuDNN's grouped convolution has no such weak spot
(the ensemble uses it on CUDA), so the op's CUDA implementation is the reference
(``F.conv2d``), registered so that the op works on any device.

Registration: the schema lives in C++ (``csrc/registration.cpp``); the op is a registered
custom op with a fake kernel (no ``torch.library.triton_op``: it has no Triton launches to
wrap), and its CUDA kernels (:func:`_cuda`, :func:`_cuda_backward`, plain torch with or
without triton) are registered through
:func:`~scaleinv_kernels.ops.registry.register_cuda_kernel`, so
:func:`~scaleinv_kernels.ops.registry.cuda_code_path_on_cpu` runs them on CPU tensors too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from scaleinv_kernels._extension import extension_loaded, log_once
from scaleinv_kernels.ops.registry import register_cuda_kernel

OP = "scaleinv::direct_conv2d"
SUPPORTED_DTYPES = (torch.float32, torch.float64)


def direct_conv2d_reference(x: Tensor, weight: Tensor, bias: Tensor | None, groups: int,
                            padding: tuple[int, int] | list[int]) -> Tensor:
    """The same convolution with ``F.conv2d`` (stride 1, dilation 1)."""
    return F.conv2d(x, weight, bias, 1, tuple(padding), 1, groups)


def validate(x: Tensor, weight: Tensor, bias: Tensor | None, groups: int,
             padding: tuple[int, int] | list[int], op: str = "direct_conv2d: ") -> None:
    """The checks of the C++ kernel, for the Python backends (fake and CUDA)."""
    if x.dtype not in SUPPORTED_DTYPES or weight.dtype != x.dtype:
        raise TypeError(f"{op}x and weight must both be float32 or float64, got {x.dtype} "
                        f"and {weight.dtype}")
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"{op}x must be [N, C, H, W] and weight [C_out, C_in/groups, KH, "
                         f"KW], got {list(x.shape)} and {list(weight.shape)}")
    if len(padding) != 2:
        raise ValueError(f"{op}padding must have 2 entries, got {list(padding)}")
    cout, cin, kh, kw = weight.shape
    if groups < 1 or cin < 1 or kh < 1 or kw < 1 or x.shape[1] != groups * cin or (
            cout % groups):
        raise ValueError(f"{op}x {list(x.shape)} and weight {list(weight.shape)} do not fit "
                         f"groups={groups} (x needs groups·C_in channels, C_out divisible "
                         "by groups)")
    ph, pw = padding
    if not (0 <= ph < kh and 0 <= pw < kw):
        raise ValueError(f"{op}padding must be in [0, kernel_size - 1] per dimension, got "
                         f"{list(padding)} with kernel {kh}x{kw}")
    if x.shape[2] + 2 * ph < kh or x.shape[3] + 2 * pw < kw:
        raise ValueError(f"{op}the padded input is smaller than the kernel {kh}x{kw}")
    if bias is not None and (bias.shape != (cout,) or bias.dtype != x.dtype):
        raise ValueError(f"{op}bias must be [{cout}] of x's dtype, got {list(bias.shape)} "
                         f"{bias.dtype}")


def _out_shape(x: Tensor, weight: Tensor, padding) -> list[int]:
    return [x.shape[0], weight.shape[0], x.shape[2] + 2 * padding[0] - weight.shape[2] + 1,
            x.shape[3] + 2 * padding[1] - weight.shape[3] + 1]


def _fake(x, weight, bias, groups, padding):
    validate(x, weight, bias, groups, padding)
    return x.new_empty(_out_shape(x, weight, padding))


def _fake_backward(grad_out, x, weight, groups, padding, output_mask):
    return (torch.empty_like(x, memory_format=torch.contiguous_format)
            if output_mask[0] else None,
            torch.empty_like(weight, memory_format=torch.contiguous_format)
            if output_mask[1] else None,
            grad_out.new_empty(weight.shape[0]) if output_mask[2] else None)


def _cuda(x, weight, bias, groups, padding):
    validate(x, weight, bias, groups, padding)
    return direct_conv2d_reference(x, weight, bias, groups, padding)


def _cuda_backward(grad_out, x, weight, groups, padding, output_mask):
    gx, gw, _ = torch.ops.aten.convolution_backward(
        grad_out, x, weight, None, [1, 1], list(padding), [1, 1], False, [0, 0], groups,
        [output_mask[0], output_mask[1], False])
    gb = grad_out.sum((0, 2, 3)) if output_mask[2] else None
    return gx, gw, gb


def _register() -> None:
    torch.library.register_fake(OP)(_fake)
    torch.library.register_fake(OP + "_backward")(_fake_backward)
    # autograd: in C++ (csrc/direct_conv.cpp), for every device
    register_cuda_kernel(OP, _cuda)
    register_cuda_kernel(OP + "_backward", _cuda_backward)


if extension_loaded():
    _register()


def direct_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, groups: int = 1,
                  padding: int | tuple[int, int] | list[int] = (0, 0)) -> Tensor:
    """``F.conv2d(x, weight, bias, 1, padding, 1, groups)`` computed directly (see the
    module docstring for the contract; an int ``padding`` pads both dimensions);
    differentiable in x, weight and bias. Runs the reference (logged once) when the
    compiled extension is missing."""
    if isinstance(padding, bool) or not isinstance(padding, (int, tuple, list)):
        raise TypeError(f"direct_conv2d: padding must be an int or 2 ints, got {padding!r}")
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise TypeError(f"direct_conv2d: groups must be an int, got {groups!r}")
    padding = [padding, padding] if isinstance(padding, int) else [int(p) for p in padding]
    validate(x, weight, bias, groups, padding)
    if not extension_loaded():
        log_once("compiled extension not loaded; direct_conv2d runs F.conv2d")
        return direct_conv2d_reference(x, weight, bias, groups, padding)
    return torch.ops.scaleinv.direct_conv2d(x, weight, bias, int(groups), padding)
