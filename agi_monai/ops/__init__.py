"""The compiled group-wise roll op and its pure-PyTorch reference."""

from agi_monai.ops.group_roll import extension_available, extension_error, extension_has_cuda, group_roll
from agi_monai.ops.reference import fractional_roll_matrix, group_roll_reference

__all__ = [
    "extension_available",
    "extension_error",
    "extension_has_cuda",
    "fractional_roll_matrix",
    "group_roll",
    "group_roll_reference",
]
