"""The package's import structure: what a training image without the data readers' dependencies can import, and
``agi_monai.data``'s lazily loaded names and submodules (a fresh interpreter each, since imports are cached)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from helpers import REPO


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_engines_and_networks_import_without_simpleitk_pydicom_nibabel():
    # A GPU training image may hold only torch, MONAI and Ignite (the CUDA training tests run on one).
    result = run_python("""
        import sys
        for name in ("SimpleITK", "pydicom", "nibabel"):
            sys.modules[name] = None  # import fails, as where it is not installed
        import agi_monai.engines, agi_monai.networks
        from agi_monai.engines import Pix2PixTrainer
        from agi_monai.data import DataError
        print("imported")
    """)
    assert result.returncode == 0 and "imported" in result.stdout, result.stderr


def test_data_names_and_submodules_load_on_first_use():
    result = run_python("""
        import agi_monai.data as data
        loaded = lambda: sorted(m for m in __import__("sys").modules if m.startswith("agi_monai.data."))
        assert "agi_monai.data.dicom" not in loaded(), loaded()
        assert data.dicom.DICOM_CONTRAST_RULES is data.DICOM_CONTRAST_RULES  # a submodule as an attribute
        from agi_monai.data import build_slice_dataset, files
        assert build_slice_dataset.__module__ == "agi_monai.data.datasets" and files.__name__ == "agi_monai.data.files"
        assert set(data.__all__) <= set(dir(data)) and {"dicom", "volumes"} <= set(dir(data))
        try:
            data.no_such_name
        except AttributeError as error:
            print(error)
    """)
    assert result.returncode == 0, result.stderr
    assert "module 'agi_monai.data' has no attribute 'no_such_name'" in result.stdout


def test_a_bundle_config_target_in_agi_monai_data_resolves():
    result = run_python("""
        from monai.bundle import ConfigParser
        parser = ConfigParser({"imports": ["$import agi_monai", "$import agi_monai.data"],  # as the bundles' configs
                               "error": {"_target_": "agi_monai.data.DataError", "source": "x.nii.gz", "problem": "bad",
                                         "expected": "good"},
                               "rules": "$agi_monai.data.dicom.DICOM_CONTRAST_RULES[0][0]"})
        parser.get_parsed_content("imports")  # as a bundle workflow does first
        print(parser.get_parsed_content("error"), parser.get_parsed_content("rules"))
    """)
    assert result.returncode == 0, result.stderr
    assert "x.nii.gz: bad (expected good) None" in result.stdout


def test_monai_nvimgcodec_reader_messages_are_filtered_and_nothing_else():
    # MONAI's LoadImage builds its nvImageCodec DICOM reader whichever reader it is given; where nvImageCodec is not
    # installed that reader logs and warns at every LoadImage (agi_monai/__init__.py says why they are filtered).
    result = run_python("""
        import logging, warnings
        logging.basicConfig(level=logging.INFO)
        import agi_monai
        from monai.transforms import LoadImage
        LoadImage(image_only=True)
        warnings.warn("another UserWarning")
        logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").warning("another message of that logger")
    """)
    assert result.returncode == 0, result.stderr
    assert "nvImageCodec" not in result.stderr
    assert "another UserWarning" in result.stderr and "another message of that logger" in result.stderr
