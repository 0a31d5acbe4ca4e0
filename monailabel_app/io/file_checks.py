"""Checks on an input file before (or while) a reader trusts it, shared by the radiograph and CT readers:
a truncated gzip, a header that declares more voxels than allowed, NaN voxels, DICOM values that do not
parse. Each failure is an :class:`errors.InputError` that says what was wrong."""

from __future__ import annotations

import gzip
import re
import zlib
from contextlib import contextmanager

import numpy as np

from ..errors import InputError


@contextmanager
def malformed_values_refused():
    """A DICOM attribute that does not parse (a spacing or position that is not a number, a sequence
    item missing) is the input's fault: an :class:`InputError` naming it, not a server error."""
    try:
        yield
    except InputError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError) as e:
        raise InputError(f"malformed value in the image's header: {type(e).__name__}: {str(e)[:200]}") from e



def check_gzip(path: str) -> None:
    """A ``.gz`` file must decompress to its end (ITK would otherwise read a truncated file silently)."""
    if not path.lower().endswith(".gz"):
        return
    try:
        with gzip.open(path, "rb") as f:
            while f.read(1 << 20):
                pass
    except (OSError, EOFError, zlib.error) as e:
        raise InputError(f"compressed file is truncated or corrupt: {e}") from e


def check_declared_size(path: str, limit: int) -> None:
    """Refuse an NRRD / MetaImage whose text header declares more than ``limit`` voxels, before any reader
    sizes a buffer from it (ITK reports such a file only as unreadable)."""
    if not path.lower().endswith((".nrrd", ".nhdr", ".mha", ".mhd")):
        return
    with open(path, "rb") as f:
        head = f.read(8192).decode("latin-1")
    m = re.search(r"^(?:sizes|DimSize)\s*[:=]\s*([0-9 ]+)$", head, re.MULTILINE | re.IGNORECASE)
    if m:
        sizes = [int(v) for v in m.group(1).split()]
        if float(np.prod(sizes, dtype=np.float64)) > limit:
            raise InputError(f"image header declares {' x '.join(map(str, sizes))} voxels: over the limit of {limit}")


def check_finite_nifti(path: str) -> None:
    """A float NIfTI with NaN or infinite voxels is refused: ITK's reader turns NaN into 0 without a word."""
    if not path.lower().endswith((".nii", ".nii.gz")):
        return
    try:
        import nibabel as nib

        img = nib.load(path)
        if not np.issubdtype(img.get_data_dtype(), np.floating):
            return
        data = img.dataobj
        for k in range(data.shape[2] if len(data.shape) > 2 else 1):
            block = np.asarray(data[:, :, k, ...] if len(data.shape) > 2 else data[:])
            if not np.isfinite(block).all():
                raise InputError("image contains NaN or infinite voxel values")
    except InputError:
        raise
    except Exception:  # nibabel cannot read it: SimpleITK's reader says what is wrong
        return
