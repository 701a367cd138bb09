"""agi-monai: AGI-Net (arXiv 2411.14684) multimodal MRI synthesis for MONAI.

Importing the package registers the compiled op ``torch.ops.agi_monai.group_roll`` when the
extension ``agi_monai._C`` is built (or announces, once, the pure-PyTorch fallback).
"""

import logging
import warnings

__version__ = "0.1.0"


def _silence_unused_nvimgcodec_reader() -> None:
    """MONAI 1.6's ``LoadImage`` builds every reader it knows, whichever it is asked to use, and its nvImageCodec
    DICOM reader logs "nvImageCodec is not available" and warns "did not register successfully" each time where
    nvImageCodec (an optional GPU decoder) is not installed. Nothing here reads through that reader (NIfTI goes through
    nibabel, DICOM through :mod:`agi_monai.data.dicom`), so the two messages only suggest a broken install; these
    two, and nothing else, are filtered."""
    warnings.filterwarnings(
        "ignore", message="NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register", category=UserWarning
    )
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").addFilter(
        lambda record: not record.getMessage().startswith("nvImageCodec is not available")
    )


_silence_unused_nvimgcodec_reader()

from agi_monai import ops  # noqa: E402,F401  (loads the op library so TorchScript files can find it)
