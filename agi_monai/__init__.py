"""agi-monai: AGI-Net (arXiv 2411.14684) multimodal MRI synthesis for MONAI.

Importing the package registers the compiled op ``torch.ops.agi_monai.group_roll`` when the
extension ``agi_monai._C`` is built (or announces, once, the pure-PyTorch fallback).
"""

__version__ = "0.1.0"

from agi_monai import ops  # noqa: E402,F401  (loads the op library so TorchScript files can find it)
