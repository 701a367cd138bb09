"""The scenario bundles as a table: which bundles exist, what each reads and writes, whether it has weights,
and which one fits the contrasts a case has (used by the ``agi-monai`` command line).

A bundle is a folder holding ``configs/inference.json``; its ``inputs`` and ``target`` entries say what it
reads and synthesizes, ``models/model.pt`` holds its generator's weights (none are shipped yet).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from monai.bundle import ConfigParser

from agi_monai.data import CONTRASTS, canonical_contrast

__all__ = ["BundleError", "BundleInfo", "bundles_root", "choose_bundle", "find_bundle", "list_bundles", "read_bundle"]

#: Environment variable naming another folder of bundles (default: ``bundles/`` of this repository).
BUNDLES_ENV = "AGI_MONAI_BUNDLES"


class BundleError(ValueError):
    """A bundle that cannot be found, read or chosen; the message says what was given and what exists."""


@dataclass(frozen=True)
class BundleInfo:
    """One scenario bundle, as its ``configs/inference.json`` describes it.

    Attributes:
        name: the folder name, e.g. ``brats_t1_t2_to_flair``.
        root: the bundle folder.
        inputs: input contrasts in channel order.
        target: the synthesized contrast.
        spatial_size: the in-plane size slices are padded/cropped to.
        spatial_dims: 2 (slice by slice) or 3 (3D patches, sliding window).
    """

    name: str
    root: Path
    inputs: tuple[str, ...]
    target: str
    spatial_size: tuple[int, ...]
    spatial_dims: int = 2

    @property
    def config_dir(self) -> Path:
        return self.root / "configs"

    @property
    def weights(self) -> Path:
        """Where the bundle's configs load the generator's weights from (``@ckpt_dir + '/model.pt'``)."""
        return self.root / "models" / "model.pt"

    @property
    def has_weights(self) -> bool:
        return self.weights.is_file()

    @property
    def is_synthesis(self) -> bool:
        """Whether the bundle synthesizes an image contrast (not, e.g., the downstream segmentation bundle)."""
        return self.target in CONTRASTS


def bundles_root() -> Path:
    """The folder of scenario bundles: ``$AGI_MONAI_BUNDLES`` if set, else ``bundles/`` beside the package."""
    configured = os.environ.get(BUNDLES_ENV)
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parents[2] / "bundles"


def read_bundle(root: str | Path) -> BundleInfo:
    """Describe the bundle in folder ``root``.

    Raises:
        BundleError: ``root`` has no ``configs/inference.json``, or it lacks ``inputs``/``target``.
    """
    root = Path(root)
    config_file = root / "configs" / "inference.json"
    if not config_file.is_file():
        raise BundleError(f"{root}: not a bundle folder (expected {config_file.relative_to(root)} in it)")
    config = ConfigParser.load_config_file(config_file)
    try:
        inputs = tuple(canonical_contrast(name) for name in config["inputs"])
        target = canonical_contrast(config["target"])
        spatial_size = tuple(int(size) for size in config["spatial_size"])
        spatial_dims = int(config.get("network_def", {}).get("spatial_dims", 2))
    except (KeyError, TypeError, ValueError) as error:
        raise BundleError(
            f"{config_file}: cannot read the scenario ({type(error).__name__}: {error}); expected 'inputs' (a list "
            f"of contrasts), 'target' and 'spatial_size' entries"
        ) from error
    return BundleInfo(root.name, root.resolve(), inputs, target, spatial_size, spatial_dims)


def list_bundles(root: str | Path | None = None) -> list[BundleInfo]:
    """Every synthesis bundle in ``root`` (default :func:`bundles_root`), sorted by name; the template and bundles
    whose target is not an image contrast (the downstream segmentation bundle) are left out."""
    root = Path(root) if root is not None else bundles_root()
    if not root.is_dir():
        raise BundleError(
            f"{root}: the bundles folder does not exist (expected the repository's bundles/, or set {BUNDLES_ENV})"
        )
    folders = [p for p in sorted(root.iterdir()) if (p / "configs" / "inference.json").is_file() and p.name[0] != "_"]
    return [bundle for bundle in map(read_bundle, folders) if bundle.is_synthesis]


def find_bundle(name_or_path: str | Path, root: str | Path | None = None) -> BundleInfo:
    """A synthesis bundle by name (a folder of :func:`bundles_root`) or by path.

    Raises:
        BundleError: neither a bundle folder nor a known name (the message lists the known names), or a bundle
            that does not synthesize an image contrast.
    """
    path = Path(name_or_path)
    if (path / "configs" / "inference.json").is_file():
        bundle = read_bundle(path)
        if not bundle.is_synthesis:
            raise BundleError(f"bundle {path} outputs {bundle.target!r}, not an image contrast: not a synthesis bundle")
        return bundle
    known = list_bundles(root)
    for bundle in known:
        if bundle.name == str(name_or_path):
            return bundle
    names = ", ".join(b.name for b in known)
    raise BundleError(f"bundle {str(name_or_path)!r} is neither a bundle folder nor one of: {names}")


def choose_bundle(present: Iterable[str], target: str | None = None, bundles: Sequence[BundleInfo] = ()) -> BundleInfo:
    """The bundle that synthesizes a contrast from the contrasts ``present``.

    Candidates read only contrasts that are present. With ``target`` given, those synthesizing it; else those
    whose target is missing. Among the candidates for one target, the one using the most inputs wins (e.g.
    (T1, T2, T1Gd) -> FLAIR over (T1, T2) -> FLAIR when T1Gd is there), and a 2D bundle wins over the 3D one of
    the same scenario (the paper's setting, and far lighter; the 3D one is chosen by name).

    Args:
        present: the contrasts every case has (canonical names or aliases).
        target: the contrast to synthesize; required when the candidates synthesize different targets.
        bundles: the bundles to choose from (default: :func:`list_bundles`).

    Raises:
        BundleError: no candidate, several targets possible without ``target``, or two equally good candidates;
            the message lists the options.
    """
    present_set = {canonical_contrast(name) for name in present} & set(CONTRASTS)  # labels (seg) are no input
    wanted = canonical_contrast(target) if target else None
    bundles = list(bundles) or list_bundles()
    found = ", ".join(c for c in CONTRASTS if c in present_set) or "none"
    usable = [b for b in bundles if set(b.inputs) <= present_set]
    candidates = [b for b in usable if (b.target == wanted if wanted else b.target not in present_set)]
    family = _family(present_set)
    if not wanted and family is not None:
        # without a target, stay within the dataset the case comes from: a BraTS case (T1, T2, FLAIR, T1Gd) must not
        # get an IXI bundle's PD just because PD is the contrast it lacks
        candidates = [b for b in candidates if _family({*b.inputs, b.target}) == family]
        if not candidates and all(
            c in present_set for b in bundles if _family({*b.inputs, b.target}) == family for c in (*b.inputs, b.target)
        ):
            raise BundleError(f"nothing to synthesize: the case has {found}; name --bundle or --target")
    if not candidates:
        if wanted:
            makers = [f"{b.name} ({', '.join(b.inputs)})" for b in bundles if b.target == wanted]
            raise BundleError(
                f"no bundle synthesizes {wanted} from the contrasts present ({found}); bundles for {wanted} need: "
                + ("; ".join(makers) or "none exists")
            )
        raise BundleError(
            f"no bundle synthesizes a missing contrast from the contrasts present ({found}); "
            f"the bundles need: " + "; ".join(f"{b.name} ({', '.join(b.inputs)} -> {b.target})" for b in bundles)
        )
    targets = sorted({b.target for b in candidates})
    if len(targets) > 1:
        options = "; ".join(f"--target {b.target} ({b.name})" for b in candidates)
        raise BundleError(f"the contrasts present ({found}) allow several targets: choose one with {options}")
    most = max(len(b.inputs) for b in candidates)
    best = [b for b in candidates if len(b.inputs) == most]
    planar = [b for b in best if b.spatial_dims == 2]
    if len(best) > 1 and len(planar) == 1:
        return planar[0]
    if len(best) > 1:
        raise BundleError(
            f"several bundles synthesize {targets[0]} from the contrasts present ({found}): "
            + ", ".join(b.name for b in best) + "; name one with --bundle"
        )
    return best[0]


#: Contrasts that only one dataset family of scenarios has: FLAIR and T1Gd are BraTS's, PD is IXI's.
_FAMILY_MARKERS = {"BraTS": frozenset({"FLAIR", "T1Gd"}), "IXI": frozenset({"PD"})}


def _family(contrasts: Iterable[str]) -> str | None:
    """The dataset family (``"BraTS"``, ``"IXI"``) that a set of contrasts belongs to; None for T1/T2 alone, which
    both have, or for a mix of both families' contrasts (then the usual candidate rules and messages apply).
    """
    found = {name for name, markers in _FAMILY_MARKERS.items() if markers & set(contrasts)}
    return found.pop() if len(found) == 1 else None
