"""One op per file: schema (csrc/registration.cpp), plain-torch reference, Triton
kernel and dispatch."""

from scaleinv_kernels.ops.conv_norm_act import conv_bn_act_pool, conv_bn_act_pool_reference
from scaleinv_kernels.ops.direct_conv import direct_conv2d, direct_conv2d_reference
from scaleinv_kernels.ops.gn_act import gn_act_pool, gn_act_pool_reference
from scaleinv_kernels.ops.norm_act import bn_act_pool, bn_act_pool_reference
from scaleinv_kernels.ops.sgd_wd import sgd_wd_, sgd_wd_reference

__all__ = ["bn_act_pool", "bn_act_pool_reference", "conv_bn_act_pool",
           "conv_bn_act_pool_reference", "direct_conv2d", "direct_conv2d_reference",
           "gn_act_pool", "gn_act_pool_reference", "sgd_wd_", "sgd_wd_reference"]

from scaleinv_kernels.ops.registry import enter_process_wide_mode  # noqa: E402

enter_process_wide_mode()  # SCALEINV_BACKEND=triton: CPU tensors take the CUDA code path
