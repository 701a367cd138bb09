"""The compiled ops (``csrc/``): the group-wise roll and the fused LayerNorm+GELU, with their references."""

from agi_monai.ops.group_roll import extension_available, extension_error, extension_has_cuda, group_roll
from agi_monai.ops.layer_norm_gelu import (
    fused_layer_norm_gelu_available,
    layer_norm_gelu,
    layer_norm_gelu_reference,
)
from agi_monai.ops.reference import fractional_roll_matrix, group_roll_reference

__all__ = [
    "extension_available",
    "extension_error",
    "extension_has_cuda",
    "fractional_roll_matrix",
    "fused_layer_norm_gelu_available",
    "group_roll",
    "group_roll_reference",
    "layer_norm_gelu",
    "layer_norm_gelu_reference",
]
