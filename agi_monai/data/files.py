"""Writing outputs atomically (a temporary file beside the target, renamed onto it when complete), into a folder
checked before any work is done."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import FolderLayoutBase, NibabelWriter

from agi_monai.data.errors import DataError

__all__ = [
    "atomic_output", "check_output_folder", "remove_stale_temporaries", "stopping_cleanly_on_sigterm", "temporary_path",
    "walk_folders", "write_json", "free_space", "file_sha256", "AtomicNibabelWriter", "EarlierCaseOutputs", "is_searched_input", "check_report_path",
    "nifti_is_complete",
    "is_bids_derivative", "CaseOutputLayout", "refuse_foreign_outputs", "synthesis_output_paths", "case_id_of_output",
    "refuse_output_in_input",
]

_logger = logging.getLogger(__name__)


#: The folders of a BIDS dataset that hold no raw images: processed copies (derivatives/), the scanner's DICOM
#: (sourcedata/) and scripts; searched for cases, they would give every subject a second case or duplicate contrasts.
_BIDS_NOT_RAW = ("derivatives", "sourcedata", "code")

FORM_CODE_KEYS = ("sform_code", "qform_code")
"""The NIfTI header codes saying which space a volume's affine maps to; MONAI's reader keeps them in the metadata."""

FORM_KEYS = (*FORM_CODE_KEYS, "srow_x", "srow_y", "srow_z", "quatern_b", "quatern_c", "quatern_d", "qoffset_x",
             "qoffset_y", "qoffset_z", "pixdim")
"""The NIfTI header fields of a volume's two affines (sform, qform) and their codes, as MONAI's reader keeps them."""


def walk_folders(
    root: str | Path, quiet: bool = False, hidden: list[str] | None = None
) -> Iterator[tuple[str, list[str]]]:
    """``(folder, file names)`` of ``root`` and every folder below it, top-down (subfolders and names sorted),
    following symbolic links to folders (a dataset folder of links to a shared store is common on clusters; ``os.walk``'s default drops them
    silently) but entering each real folder once, so a link that loops back ends nowhere. The ``derivatives/``,
    ``sourcedata/`` and ``code/`` folders of a BIDS dataset (one holding ``dataset_description.json``) are left out,
    with a log line (none when ``quiet``); point ``root`` at one of them to search it.

    Hidden entries below ``root`` (names starting with ``.``, files and folders) are left out too: what a Mac leaves
    on a copied dataset (``._<name>`` AppleDouble files of every image, ``.DS_Store``), a trash folder
    (``.Trash-1000/``) or a file server's ``.snapshot/`` hold no images to read, or second copies of every case (and
    this package's own temporary outputs are ``.tmp-*``). Their paths are appended to ``hidden`` when one is given,
    so that a caller can say what it left out; ``root`` itself is searched whatever its name."""
    seen: set[tuple[int, int]] = set()
    for folder, folders, names in os.walk(root, followlinks=True):
        try:
            status = os.stat(folder)
        except OSError:  # a broken link or a folder removed meanwhile: nothing to read there
            folders[:] = []
            continue
        if (status.st_dev, status.st_ino) in seen:
            folders[:] = []
            continue
        seen.add((status.st_dev, status.st_ino))
        if hidden is not None:
            hidden.extend(os.path.join(folder, name) for name in sorted(folders + names) if name.startswith("."))
        folders[:] = [name for name in folders if not name.startswith(".")]
        names = [name for name in names if not name.startswith(".")]
        if "dataset_description.json" in names and any(name in _BIDS_NOT_RAW for name in folders):
            if not quiet:
                _logger.info("%s: a BIDS dataset; its %s folders are not searched for raw images", folder,
                             ", ".join(sorted(name for name in folders if name in _BIDS_NOT_RAW)))
            folders[:] = [name for name in folders if name not in _BIDS_NOT_RAW]
        folders.sort()
        yield folder, sorted(names)


def nifti_is_complete(path: str | Path) -> bool:
    """Whether the NIfTI file ``path`` holds every byte its header announces (header, extensions and voxels), read
    without decompressing the voxels: for ``.nii.gz`` the gzip trailer's uncompressed size (ISIZE, modulo 2^32), for
    ``.nii`` the file's size. A file cut short (a disk that filled, a copy interrupted: damage from outside, as this
    package writes atomically) is False, as is one whose header cannot be read. Any other file is True."""
    import nibabel as nib

    path = Path(path)
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return True
    try:
        image = nib.load(str(path))
        header = image.header  # (its vox_offset reads 0 once loaded: the array proxy keeps the file's)
        expected = int(image.dataobj.offset) + int(np.prod(header.get_data_shape())) * header.get_data_dtype().itemsize
        if name.endswith(".nii"):
            return path.stat().st_size >= expected
        with path.open("rb") as stream:
            stream.seek(-4, os.SEEK_END)
            return int.from_bytes(stream.read(4), "little") == expected % 2**32
    except Exception:  # unreadable header, a file shorter than a gzip trailer: not a complete NIfTI either way
        return False


def is_searched_input(folder: Path, root: Path) -> bool:
    """Whether ``folder`` (both resolved) is ``root`` or inside it, in a part that :func:`walk_folders` searches:
    outputs there would be read as inputs by a later run. (Hidden folders, and the ``derivatives/``, ``sourcedata/``
    and ``code/`` folders of a BIDS dataset, are left out: BIDS puts outputs in ``derivatives/``.)"""
    below = [folder, *folder.parents]
    if root not in below:
        return False
    inside = below[: below.index(root)]  # the folders from ``folder`` up to, not including, ``root``
    if any(inner.name.startswith(".") for inner in inside):  # hidden: not searched either
        return False
    return not any(inner.name in _BIDS_NOT_RAW and (inner.parent / "dataset_description.json").is_file()
                   for inner in inside)


def _host_prefix() -> str:
    """``.tmp-<host>-``, the start of every temporary output's name (then ``<pid>-<name>``): the host as well as the
    process, so that a folder shared by several machines (NFS) is never cleaned of another machine's files
    (:func:`remove_stale_temporaries`)."""
    return f".tmp-{socket.gethostname()}-"


def temporary_path(path: str | Path) -> Path:
    """Where an output ``path`` (a file or a folder) is written before it is renamed onto its name: beside it, as
    ``.tmp-<host>-<pid>-<name>``, so that the rename stays within one file system."""
    path = Path(path)
    return path.with_name(f"{_host_prefix()}{os.getpid()}-{path.name}")


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Removes the temporary outputs in ``folder`` (not below it) that a process of this host left when it was
    killed where it could not clean up (``kill -9``, the out-of-memory killer, a power cut): those of
    :func:`temporary_path` whose process no longer exists. Another host's files, and those of a running process (or
    of one whose number a running process now has), are left alone. Returns what was removed (and logs it).
    """
    pattern = re.compile(re.escape(_host_prefix()) + r"(\d+)-.")
    removed = []
    for entry in sorted(Path(folder).iterdir()):
        match = pattern.match(entry.name)
        if match is None or _process_exists(int(match.group(1))):
            continue
        _remove(entry)
        removed.append(entry)
    if removed:
        _logger.warning("removed %d temporary output(s) that a killed earlier run left in %s: %s", len(removed), folder,
                        ", ".join(p.name for p in removed))
    return removed


def _is_synthetic_series(folder: Path) -> bool:
    """Whether the DICOM folder ``folder`` holds a series a synthesis wrote: its first DICOM file's Manufacturer is
    :data:`agi_monai.data.dicom.SYNTHETIC_MANUFACTURER` (:func:`agi_monai.data.dicom.write_derived_series` writes
    it into every file). False for a folder without a readable DICOM file."""
    import pydicom

    from agi_monai.data.dicom import SYNTHETIC_MANUFACTURER

    for path in sorted(folder.iterdir()):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Manufacturer"])
        except Exception:  # not DICOM (pydicom raises several types): look at the next file
            continue
        return str(header.get("Manufacturer", "")) == SYNTHETIC_MANUFACTURER
    return False


def nifti_header_is_readable(path: str | Path) -> bool:
    """Whether nibabel reads ``path``'s NIfTI header (the data are not read)."""
    import nibabel as nib

    try:
        nib.load(str(path)).header
    except Exception:  # nibabel raises several types for a file cut short or not NIfTI
        return False
    return True


def refuse_foreign_outputs(*outputs: str | Path) -> None:
    """Raises when an output's name holds something no synthesis wrote — an acquired scan or series named like an
    output — so that nothing replaces it (nor sets it aside and removes it, as ``--overwrite`` does with an earlier
    run's outputs): a NIfTI output (``.nii.gz``) must be marked SYNTHETIC (:func:`agi_monai.data.is_synthetic_nifti`),
    a DICOM series folder must hold agi-monai's files. Outputs that do not exist pass.

    Raises:
        DataError: naming the file or folder, why it is not taken for an output, and what was expected.
    """
    from agi_monai.data.transforms import is_synthetic_nifti

    for output in map(Path, outputs):
        if not output.exists():
            continue
        if output.name.endswith(".nii.gz"):
            if output.is_file() and not nifti_header_is_readable(output):  # e.g. cut short inside its header
                raise DataError(output, "exists but its NIfTI header cannot be read (cut short?), so whether a "
                                "synthesis wrote it is unknown and it is left as it was",
                                "that file deleted or moved away if it is an earlier output, or another --output_dir")
            if not (output.is_file() and is_synthetic_nifti(output)):
                raise DataError(output, "exists and was not written by a synthesis (its NIfTI header is not marked "
                                "SYNTHETIC), so it is left as it was", "another --output_dir, or that file moved away")
        elif not (output.is_dir() and _is_synthetic_series(output)):
            raise DataError(output, "exists and was not written by a synthesis (its DICOM files' Manufacturer is not "
                            "agi-monai), so it is left as it was", "another --output_dir, or that folder moved away")


class EarlierCaseOutputs:
    """A case's outputs from an earlier run — its NIfTI and the DICOM series made from it — set aside before a run
    writes new ones over them (``--overwrite``): the series folder renamed, the NIfTI hard-linked (an atomic write
    then replaces the file under its name, not the link), both under temporary names. So a case keeps its earlier
    pair when its new NIfTI or series fails (:meth:`restore`), and never holds a new NIfTI beside an earlier run's
    series (:meth:`discard`, :meth:`settle`). Temporary names (:func:`temporary_path`): what a killed run leaves is
    removed by the next run into the folder (:func:`remove_stale_temporaries`), and its case then holds a NIfTI
    without a series, which a rerun with ``--dicom`` completes.

    Args:
        nifti: the case's NIfTI output, ``<case>_<target>.nii.gz``.
        series: the case's DICOM series folder, ``<case>_<target>_dicom``.
    """

    def __init__(self, nifti: Path, series: Path) -> None:
        self.nifti, self.series = Path(nifti), Path(series)
        refuse_foreign_outputs(self.nifti, self.series)  # before anything is moved
        self.nifti_inode = self.nifti.stat().st_ino if self.nifti.exists() else None  # an atomic replace: a new one
        self.nifti_kept = temporary_path(self.nifti.with_name(f"earlier-{self.nifti.name}")) if self.nifti.exists() else None
        self.series_kept = temporary_path(self.series.with_name(f"earlier-{self.series.name}")) if self.series.exists() else None
        for kept in (self.nifti_kept, self.series_kept):  # a killed process of this host and number left it (a
            if kept is not None:                          # restarted container gets its number again)
                _remove(kept)
        try:
            if self.nifti_kept is not None:
                try:
                    os.link(self.nifti, self.nifti_kept)
                except OSError:  # a file system without hard links
                    shutil.copy2(self.nifti, self.nifti_kept)
            if self.series_kept is not None:
                os.replace(self.series, self.series_kept)
        except OSError as error:
            if self.nifti_kept is not None:
                self.nifti_kept.unlink(missing_ok=True)
            raise DataError(error.filename or self.series, f"cannot be set aside before it is replaced "
                            f"({error.strerror or error})", "an output folder this user can rename files in") from error

    @property
    def what(self) -> str:
        """``"NIfTI and DICOM series"``, or the one of them set aside."""
        return " and ".join(name for name, kept in (("NIfTI", self.nifti_kept), ("DICOM series", self.series_kept)) if kept)

    def nifti_replaced(self) -> bool:
        """Whether the case's NIfTI was written (or removed) since it was set aside."""
        current = self.nifti.stat().st_ino if self.nifti.exists() else None
        return current != self.nifti_inode

    def restore(self) -> None:
        """Put the earlier NIfTI and series back, replacing what was written since (a NIfTI written where there was
        none is removed)."""
        if self.nifti_kept is not None:
            if self.nifti.exists() and os.path.samefile(self.nifti, self.nifti_kept):
                self.nifti_kept.unlink()  # rename() onto another link of the same file does nothing (POSIX)
            else:
                os.replace(self.nifti_kept, self.nifti)
        else:
            self.nifti.unlink(missing_ok=True)
        if self.series_kept is not None:
            _remove(self.series)
            os.replace(self.series_kept, self.series)

    def discard(self) -> None:
        """Remove the earlier outputs: the case holds the new ones. An earlier series with no new one beside the new
        NIfTI is said to be removed (it was made from the NIfTI that was replaced)."""
        if self.nifti_kept is not None:
            self.nifti_kept.unlink(missing_ok=True)
        if self.series_kept is not None:
            _remove(self.series_kept)
            if not self.series.exists():
                _logger.warning("%s: removed, the DICOM series an earlier run made from the NIfTI this run replaced "
                                "(--dicom writes a new one)", self.series)

    def settle(self) -> None:
        """For a case whose new outputs were not completed: its earlier outputs go back when its NIfTI is still the
        earlier one (its synthesis failed, or the run stopped before it); otherwise the new NIfTI stays alone."""
        if self.nifti_replaced():
            self.discard()
        else:
            self.restore()


def _remove(path: Path) -> None:
    """Remove a file, a link or a folder (with what it holds), if there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def file_sha256(path: str | Path) -> str | None:
    """The SHA-256 of ``path``'s content (read in blocks), None when it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as file:
            while chunk := file.read(1 << 20):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def free_space(folder: str | Path) -> str:
    """How much room is left where ``folder`` lies, for the message of a write that failed (most often a full disk,
    which torch's and numpy's writers report as "unexpected pos ..." or "N requested and M written")."""
    try:
        return f"{shutil.disk_usage(folder).free / 1e6:.0f} MB free on its file system"
    except OSError:
        return "free space unknown"


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``, on error removed.

    The temporary name ends with the final name, so writers that choose the format from the extension
    (``.nii.gz``, ``.json``) behave the same. A reader never sees a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_path(path)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


#: A BIDS case ID (:func:`agi_monai.data.parse_filename` names a BIDS case by its subject and session).
_BIDS_CASE = re.compile(r"sub-[A-Za-z0-9]+(?:_ses-[A-Za-z0-9]+)?")

#: What follows the case in an output's BIDS name, per target: the entities (in the specification's order; ``desc``
#: says the image is synthetic, BIDS having no entity for it; a T1Gd is a ``T1w`` with a ``ce`` entity, as
#: discovery reads it) and the suffix. Targets not listed (e.g. the demo's ``T1Gd_agi-net``) keep the flat name.
_BIDS_OUTPUT_ENDINGS = {
    "T1": "_desc-synthetic_T1w", "T2": "_desc-synthetic_T2w", "PD": "_desc-synthetic_PDw",
    "FLAIR": "_desc-synthetic_FLAIR", "T1Gd": "_ce-gadolinium_desc-synthetic_T1w", "seg": "_desc-tumor_dseg",
}

#: BIDS's version whose derivative layout the outputs follow (``dataset_description.json``'s ``BIDSVersion``).
BIDS_VERSION = "1.9.0"


def _bids_dataset_type(folder: Path) -> str | None:
    """``DatasetType`` of ``folder``'s ``dataset_description.json`` ("raw" when it does not say), None without one
    or when it cannot be read as a JSON object."""
    try:
        description = json.loads((folder / "dataset_description.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return str(description.get("DatasetType", "raw")) if isinstance(description, dict) else None


def is_bids_derivative(folder: str | Path) -> bool:
    """Whether outputs written into ``folder`` take BIDS derivative names: it lies inside the ``derivatives/`` of a
    BIDS dataset (a folder holding ``dataset_description.json``), as given or once its links are resolved (a
    pipeline's folder linked to scratch storage), or its own ``dataset_description.json`` says
    ``"DatasetType": "derivative"``."""
    given = Path(folder).absolute()
    if _bids_dataset_type(given) == "derivative":
        return True
    return any(inner.name == "derivatives" and (inner.parent / "dataset_description.json").is_file()
               for path in dict.fromkeys([given, given.resolve()]) for inner in path.parents)


def synthesis_output_paths(case_id: str, target: str, output_dir: str | Path) -> tuple[Path, Path]:
    """A case's outputs: ``<case>_<target>.nii.gz`` and the DICOM series folder ``<case>_<target>_dicom`` (the one
    spelling: the CLI, the bundles' folder inference and the Deploy app use it, the bundles through
    :class:`CaseOutputLayout`). In a BIDS derivative folder (:func:`is_bids_derivative`) a BIDS case's outputs take
    BIDS names in its subject's (and session's) ``anat/`` folder, e.g. ``sub-01/ses-2/anat/sub-01_ses-2_desc-synthetic_FLAIR.nii.gz``
    and ``..._FLAIR_dicom`` beside it (which the folder's ``.bidsignore`` leaves out: DICOM is not BIDS)."""
    output_dir = Path(output_dir)
    ending = _BIDS_OUTPUT_ENDINGS.get(target)
    if ending is not None and _BIDS_CASE.fullmatch(case_id) and is_bids_derivative(output_dir):
        stem = output_dir.joinpath(*case_id.split("_"), "anat", f"{case_id}{ending}")
    else:
        stem = output_dir / f"{case_id}_{target}"
    return stem.with_name(f"{stem.name}.nii.gz"), stem.with_name(f"{stem.name}_dicom")


def case_id_of_output(output: str | Path, target: str, output_dir: str | Path) -> str:
    """The case ID of a NIfTI output in ``output_dir`` (:func:`synthesis_output_paths`'s inverse): ``<case>_<target>.nii.gz``
    directly in it, or a BIDS case's ``<case><entities>_<suffix>.nii.gz`` in a subject's folder below it (where the
    file lies tells which: a flat name may itself end like a BIDS one)."""
    output = Path(output)
    ending = _BIDS_OUTPUT_ENDINGS.get(target)
    if output.parent != Path(output_dir) and ending is not None and output.name.endswith(f"{ending}.nii.gz"):
        return output.name[: -len(f"{ending}.nii.gz")]
    return output.name[: -len(f"_{target}.nii.gz")]


class CaseOutputLayout(FolderLayoutBase):
    """MONAI ``SaveImage``'s ``folder_layout`` naming a case's output by :func:`synthesis_output_paths` (the subject
    being the item's file name, which :class:`agi_monai.data.NameAfterCased` sets to ``<case_id>.nii.gz``), so that
    the bundles write where the CLI, the Deploy app and ``FolderSynthesis`` look. (MONAI's ``FolderLayout`` writes
    ``<subject>_<postfix>`` flat, which is one of the two names here.)

    Args:
        output_dir: the output folder.
        target: the synthesized contrast (or label map), the name's suffix.
    """

    def __init__(self, output_dir: str | Path, target: str) -> None:
        self.output_dir, self.target = Path(output_dir), target

    def filename(self, subject: str = "subject", idx: Any = None, **kwargs: Any) -> Path:
        name = Path(str(subject)).name
        case_id = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else name
        return synthesis_output_paths(case_id, self.target, self.output_dir)[0]  # (its folder: atomic_output's)


def _describe_bids_derivative(folder: Path) -> None:
    """Writes the ``dataset_description.json`` a BIDS derivative needs (``DatasetType``, ``GeneratedBy``) and a
    ``.bidsignore`` for the DICOM series folders, each unless already there (a user's or an earlier run's are left
    as they are)."""
    from agi_monai import __version__

    if not (folder / "dataset_description.json").exists():
        write_json({
            "Name": "agi-monai synthesized MR contrasts", "BIDSVersion": BIDS_VERSION, "DatasetType": "derivative",
            "GeneratedBy": [{"Name": "agi-monai", "Version": __version__,
                             "Description": "AGI-Net synthesis of a missing MR contrast (research use only)"}],
        }, folder / "dataset_description.json")
    if not (folder / ".bidsignore").exists():
        with atomic_output(folder / ".bidsignore") as temporary:
            temporary.write_text("*_dicom/\n", encoding="utf-8")


def refuse_output_in_input(folder: str | Path, source: str | Path | None) -> None:
    """Raises when the output ``folder`` is the input folder ``source`` or inside it (a later run would read its
    outputs as inputs); a BIDS dataset's ``derivatives/`` is allowed (:func:`is_searched_input`). Touches nothing,
    so a program can check it before loading a model; :func:`check_output_folder` calls it too.

    Raises:
        DataError: naming ``folder`` and ``source``.
    """
    if source is None:
        return
    folder, source = Path(folder).resolve(), Path(source).resolve()
    if source.is_file() and folder == source:  # a datalist given as the output folder too
        raise DataError(folder, "is the input file", "another folder for the outputs")
    if source.is_dir() and is_searched_input(folder, source):
        raise DataError(folder, f"is the input folder or inside it ({source})",
                        "another folder: outputs there would be read as inputs by a later run")
    # the search for cases follows linked folders: an output reached through a link in the input is inside it too
    for searched, _ in walk_folders(source, quiet=True):
        searched_path = Path(searched)
        if searched_path.is_symlink():  # (the folders below a link lie below its target: checked with it)
            target = searched_path.resolve()
            if (target == folder or target in folder.parents) and is_searched_input(folder, target):
                raise DataError(folder, f"is inside the input folder {source}, through its link {searched_path}",
                                "another folder: outputs there would be read as inputs by a later run")


def check_output_folder(folder: str | Path, source: str | Path | None = None, synthesis: bool = True) -> Path:
    """Creates ``folder`` and writes (and removes) a file in it, so that a batch run fails before its first case, not
    after computing every case (a read-only file system, a file in the path, no permission). Also refuses ``folder``
    when it is the input folder ``source`` or inside it: a later run would read its outputs as inputs. A BIDS
    derivative folder (:func:`is_bids_derivative`) gets its ``dataset_description.json`` and ``.bidsignore`` when it
    has none; a BIDS dataset's ``derivatives/`` itself is refused (BIDS wants a folder per pipeline in it). Then
    removes the temporary outputs a killed earlier run left there (:func:`remove_stale_temporaries`).

    Args:
        folder: the output folder (``output_dir``); created with its parents.
        source: the input, when it is a folder (a datalist file's folder is not read as cases, so it is allowed).
        synthesis: the outputs are syntheses (a BIDS derivative folder is described as holding them); False for
            other outputs (``convert-dicom``'s NIfTI conversions).

    Returns:
        ``folder``, resolved.

    Raises:
        DataError: naming ``folder``, what is wrong (the system's reason) and what was expected.
    """
    given, folder = Path(folder).absolute(), Path(folder).resolve()  # (given: a linked pipeline folder in derivatives/)
    refuse_output_in_input(folder, source)
    if folder.exists() and not folder.is_dir():
        raise DataError(folder, "is a file", "a folder for the outputs")
    if any(path.name == "derivatives" and (path.parent / "dataset_description.json").is_file() for path in (given, folder)):
        raise DataError(folder, "is the derivatives/ folder of a BIDS dataset itself",
                        f"a pipeline's folder inside it, e.g. {folder / 'agi-monai'}")
    try:
        _create_and_write_in(folder)
        if synthesis and is_bids_derivative(given):
            _describe_bids_derivative(folder)
    except OSError as error:
        raise DataError(folder, f"cannot be written ({error.strerror or error})",
                        "a folder this user can create and write files in") from error
    for outputs in [folder, *(sorted(folder.glob("sub-*/anat")) + sorted(folder.glob("sub-*/ses-*/anat")))]:
        remove_stale_temporaries(outputs)  # a BIDS derivative's outputs are in its subjects' anat/ folders
    return folder


def check_report_path(path: str | Path, source: str | Path | None = None, output_dir: str | Path | None = None) -> Path:
    """Refuses, before any case is computed, a report file name (``--report``, ``report_path``) that could destroy
    something or cannot be written: it must end in ``.json`` (never an image, an input or an output), must not be an
    existing file other than an earlier report (a datalist, an input's sidecar), nor lie in the searched part of the
    input folder ``source`` (:func:`is_searched_input`), nor in a folder below ``output_dir`` (a case's DICOM series
    folder: ``output_dir`` itself is fine); a file is written to (and removed from) the nearest of its folders that
    exists, which must be a folder: nothing is created, so a run that fails later leaves nothing behind.

    Returns:
        ``path``, resolved.

    Raises:
        DataError: naming ``path``, what is wrong and what was expected.
    """
    path = Path(path).resolve()
    expected = "the name of a new .json file, or of an earlier report, outside the input folder"
    if path.is_dir():
        raise DataError(path, "is a folder", expected)
    if path.suffix.lower() != ".json":
        raise DataError(path, "does not end in .json", expected)
    if path.is_file() and not _is_report(path):
        raise DataError(path, "exists and is not a report of an earlier run (it is left as it was)", expected)
    if source is not None and Path(source).is_dir() and is_searched_input(path.parent, Path(source).resolve()):
        raise DataError(path, f"is inside the input folder {Path(source).resolve()}", expected)
    if output_dir is not None and Path(output_dir).resolve() in path.parent.parents:
        raise DataError(path, f"is in a folder below the output folder {Path(output_dir).resolve()} (a case's DICOM "
                        "series is replaced as a whole)", f"{expected}, e.g. in the output folder itself")
    try:
        write_in_nearest_folder(path.parent)
    except OSError as error:
        raise DataError(path, f"cannot be written ({error.strerror or error})", expected) from error
    return path


def write_in_nearest_folder(folder: Path) -> None:
    """Writes and removes a file in the nearest existing one of ``folder`` and its parents (where the missing ones
    would be created), creating nothing; raises the system's OSError, e.g. ``NotADirectoryError`` (its ``filename``
    the path) when that is a file: whether an output below ``folder`` can be written, checked before any work."""
    nearest = next(path for path in (folder, *folder.parents) if path.exists())
    if not nearest.is_dir():
        raise NotADirectoryError(20, "Not a directory", str(nearest))
    with tempfile.NamedTemporaryFile(dir=nearest, prefix=".tmp-write-check-"):
        pass


def _create_and_write_in(folder: Path) -> None:
    """Creates ``folder`` (with its parents) and writes and removes a file in it; raises the system's OSError."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".tmp-write-check-"):
        pass


def _is_report(path: Path) -> bool:
    """Whether ``path`` holds a report :meth:`agi_monai.bundle.SynthesisSummary.write_report` wrote."""
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and {"task", "counts", "cases"} <= set(report)


@contextmanager
def stopping_cleanly_on_sigterm() -> Iterator[None]:
    """Within the block, SIGTERM (what ``timeout``, Slurm, ``docker stop`` and ``kill`` send) raises ``SystemExit``
    with status 143 instead of ending the process at once: the ``finally`` of :func:`atomic_output` then removes its
    temporary file, as it does for Ctrl-C. (Python's default for SIGTERM runs no cleanup, so an interrupted batch
    left ``.tmp-<host>-<pid>-<name>`` files.) Outside the main thread, where signal handlers cannot be set, it does
    nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: Any) -> None:
        print(f"terminated by signal {signum}: stopping; the outputs written so far are complete", file=sys.stderr,
              flush=True)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def write_json(data: Any, path: str | Path) -> Path:
    """Write ``data`` as indented JSON to ``path`` atomically; returns the path."""
    path = Path(path)
    with atomic_output(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path


class AtomicNibabelWriter(NibabelWriter):
    """MONAI's NIfTI writer (for ``SaveImage(d)``, ``writer=AtomicNibabelWriter``) writing atomically, with the
    spatial units in mm (as the inputs'; MONAI leaves them "unknown"), the sform/qform codes of the input whose
    metadata it is given (MONAI writes 1/1), and an optional ``description`` in the
    header's ``descrip`` field: what marks a synthesized volume as synthetic wherever the file goes (``fslhd``,
    ``nib-ls``, ITK-SNAP's info show it), as the DICOM series' SeriesDescription and DerivationDescription do.

    Args:
        description: header text, at most 80 characters (NIfTI-1's ``descrip``); "" leaves nibabel's default.
        kwargs: MONAI's ``NibabelWriter`` arguments (``output_dtype``...).
    """

    def __init__(self, description: str = "", **kwargs: Any) -> None:
        if len(description.encode("utf-8")) > 80:
            raise ValueError(f"NIfTI description {description!r}: expected at most 80 bytes (the header's descrip)")
        super().__init__(**kwargs)
        self.description = description
        self.form_codes: dict[str, int] = {}
        self.input_forms: tuple[np.ndarray | None, np.ndarray | None] = (None, None)  # (sform, qform)

    def set_metadata(self, meta_dict: Any = None, resample: bool = True, **options: Any) -> None:
        # the input's sform/qform codes (MONAI's NIfTI reader keeps them in the metadata), which MONAI's writer
        # replaces by 1/1: an input "aligned to another file" (sform code 2) or without a qform (code 0) keeps them
        self.form_codes = {
            name: int(meta_dict[name]) for name in FORM_CODE_KEYS
            if meta_dict is not None and meta_dict.get(name) is not None
        }
        self.input_forms = _header_forms(meta_dict)
        super().set_metadata(meta_dict, resample=resample, **options)

    def create_backend_obj(self, data_array: Any, affine: Any = None, dtype: Any = None, **kwargs: Any) -> Any:  # type: ignore[override]
        # an instance method where MONAI has a classmethod: the description is this writer's
        image = super().create_backend_obj(data_array, affine=affine, dtype=dtype, **kwargs)
        image.header.set_xyzt_units("mm", "sec")  # MONAI's affines are in mm; nibabel's default says "unknown"
        if self.description:
            image.header["descrip"] = self.description.encode("utf-8")
        return image

    def _qform(self, affine: np.ndarray) -> np.ndarray:
        """The input's own qform where it differs from its sform and the output lies on the input's (sform) grid:
        readers that prefer the qform (ITK, SimpleITK) then place the output where they place the input, 3 mm away
        otherwise for an input whose two forms are 3 mm apart. Else ``affine``, as MONAI writes it."""
        sform, qform = self.input_forms
        if sform is not None and qform is not None and np.allclose(affine, sform, atol=1e-4):
            return qform
        return affine

    def write(self, filename: str | Path, verbose: bool = False, **obj_kwargs: Any) -> None:
        # MONAI's NibabelWriter.write, but with the input's sform/qform codes where MONAI sets both to 1 (after
        # create_backend_obj, so they cannot be set there), and through a temporary file renamed on success
        import nibabel as nib
        from monai.data.utils import to_affine_nd
        from monai.utils import convert_data_type

        with atomic_output(filename) as temporary:
            super(NibabelWriter, self).write(temporary, verbose=verbose)  # (ImageWriter's: the log line)
            self.data_obj = self.create_backend_obj(self.data_obj, affine=self.affine, dtype=self.output_dtype, **obj_kwargs)
            if self.affine is None:
                self.affine = np.eye(4)
            affine = to_affine_nd(r=3, affine=convert_data_type(self.affine, np.ndarray)[0])
            self.data_obj.set_sform(affine, code=self.form_codes.get("sform_code", 1))
            self.data_obj.set_qform(self._qform(affine), code=self.form_codes.get("qform_code", 1))
            nib.save(self.data_obj, temporary)


def _header_forms(meta: Any) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(sform, qform) of the NIfTI header whose fields ``meta`` holds (:data:`FORM_KEYS`), each None where its code is
    0 or a field is missing (a volume not read from NIfTI)."""
    import nibabel as nib

    if meta is None or any(meta.get(key) is None for key in FORM_KEYS):
        return None, None
    header = nib.Nifti1Header()
    try:
        for key in FORM_KEYS:
            header[key] = np.asarray(meta[key], dtype=np.float64)
        sform = header.get_sform() if int(header["sform_code"]) > 0 else None
        qform = header.get_qform() if int(header["qform_code"]) > 0 else None
    except (ValueError, TypeError):  # fields of another shape: not a NIfTI header's
        return None, None
    return sform, qform
