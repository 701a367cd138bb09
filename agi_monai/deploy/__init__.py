"""A MONAI Deploy application for contrast synthesis (``python -m agi_monai.deploy``; docs/deploy.md).

:mod:`agi_monai.deploy.synthesis` (loading an exported bundle, one case to a float32 volume, NIfTI + derived
DICOM output) needs only agi-monai; :mod:`agi_monai.deploy.operators` and :mod:`agi_monai.deploy.app` need the
MONAI Deploy App SDK (``pip install agi-monai[deploy]``).
"""

from agi_monai.deploy.synthesis import BundleSynthesizer, SynthesisOutputs, write_synthesis_outputs

__all__ = ["BundleSynthesizer", "SynthesisOutputs", "write_synthesis_outputs"]
