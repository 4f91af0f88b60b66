"""Refusing a header that claims more voxel bytes than its file can hold, before allocating.

Readers allocate the array a header describes, then fill it: a truncated file, or a
header that lies about the size, would otherwise cost the claimed memory (terabytes for
a forged one) before the read fails. Raw data must be on disk in full; gzip cannot
expand more than about 1032 times, which bounds what a compressed file can hold; other
compressions are held to a fixed cap. Whatever the file holds, one volume is held to
:data:`DEFAULT_MAX_VOLUME_BYTES` (raised by ``--max-volume-bytes``), and one file to
:data:`MAX_VOLUMES_PER_FILE` volumes, before anything is allocated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Final, Literal

from raptorz.errors import InputError

Compression = Literal["raw", "gzip", "other"]

#: Deflate's largest expansion: 258 bytes out of a 2-bit code, plus headroom.
GZIP_RATIO: Final = 1100
#: Bytes of gzip framing a small compressed file may spend on headers and trailers.
_GZIP_SLACK: Final = 4096
#: Bytes of voxels one volume may take once read as float32: 1024^3 voxels, more than
#: any MRI or CT scan; ``--max-volume-bytes`` raises it for a genuine giant volume.
DEFAULT_MAX_VOLUME_BYTES: Final = 4 * 2**30
#: Volumes one input file (a MedMNIST npz) may yield; MedMNIST's largest split has 1,300.
MAX_VOLUMES_PER_FILE: Final = 100_000


def compression_of(path: str | Path) -> Compression:
    """How the voxels in ``path`` are stored, from its file name."""
    name = str(path).lower()
    if name.endswith((".gz", ".mgz")):
        return "gzip"
    return "other" if name.endswith((".bz2", ".zst", ".xz")) else "raw"


def check_size(source: str | Path, claimed: int, stored: int | None,
               compression: Compression, cap: int) -> None:
    """Refuse ``source`` when ``stored`` bytes cannot hold the ``claimed`` voxel bytes.

    Parameters
    ----------
    source
        The file named in the error.
    claimed
        Voxel bytes the header describes (shape times item size).
    stored
        Bytes of voxel data on disk (after any header); ``None`` where unknown.
    compression
        ``raw`` data must hold ``claimed`` bytes; ``gzip`` data can expand at most
        :data:`GZIP_RATIO` times; ``other`` is held to ``cap`` only.
    cap
        The largest voxel size accepted for compressed or unmeasurable data.
    """
    if stored is not None and compression == "raw":
        if stored < claimed:
            raise InputError(source, f"the header describes {claimed} bytes of voxels but "
                             f"the file holds {stored}: truncated, or a header that lies "
                             "about the size")
        return
    if stored is not None and compression == "gzip":
        if claimed > GZIP_RATIO * stored + _GZIP_SLACK:
            raise InputError(source, f"the header describes {claimed} bytes of voxels, more "
                             f"than {stored} gzip-compressed bytes can hold: truncated, or "
                             "a header that lies about the size")
        return
    if claimed > cap:
        raise InputError(source, f"the header describes {claimed} bytes of voxels, over the "
                         f"cap of {cap} for compressed data (raise --max-member-mb if real)")


def check_volume(source: str | Path, shape: Sequence[int], cap: int) -> None:
    """Refuse ``source`` when a volume of ``shape`` takes over ``cap`` bytes as float32.

    Every reader makes a float32 array of the voxels: this is checked on the header's
    shape before anything is allocated, whatever the format and its compression.
    """
    dims = tuple(int(n) for n in shape)  # Python ints: a forged shape cannot overflow
    claimed = 4 * math.prod(dims)
    if claimed > cap:
        raise InputError(source, f"the header describes a volume of shape {dims}, "
                         f"{claimed} bytes as float32, over the cap of {cap} bytes a volume "
                         "(raise --max-volume-bytes for a genuine giant volume)")
