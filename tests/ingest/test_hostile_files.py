"""Hostile inputs: headers that name files elsewhere, and headers that lie about sizes.

Each is refused quickly, with bounded memory, naming the file; a conversion that mixes
one with a good volume converts the good one.
"""

from __future__ import annotations

import gzip
import io
import os
import re
import time
import tracemalloc
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from raptorz import stores
from raptorz.errors import InputError
from raptorz.ingest._guard import MAX_VOLUMES_PER_FILE
from raptorz.ingest.readers import ReadOptions, Source, probe_shape, read_volume
from raptorz.ingest.sources import resolve_sources
from raptorz.ingest.volumes import convert
from raptorz.layouts import open_volumes

_NRRD = ("NRRD0004\ntype: short\ndimension: 3\nsizes: 6 7 5\nencoding: raw\n"
         "endian: little\n")
_MHD = "ObjectType = Image\nNDims = 3\nDimSize = 6 7 5\nElementType = MET_SHORT\n"


@pytest.fixture(scope="module")
def voxels(volume: Callable[..., np.ndarray]) -> bytes:
    """The bytes of a 6 x 7 x 5 int16 volume, as a raw data file."""
    return volume().tobytes(order="F")


def _source(path: Path) -> Source:
    (source,) = resolve_sources([path])
    return source


@pytest.fixture
def study(tmp_path: Path, voxels: bytes) -> Path:
    """A header folder ``study/`` whose parent holds a readable file of the right size."""
    (tmp_path / "secret.raw").write_bytes(voxels)
    folder = tmp_path / "study"
    folder.mkdir()
    for k in range(5):
        (folder / f"s{k}.raw").write_bytes(voxels[k * 84:(k + 1) * 84])
    return folder


def _escapes(folder: Path) -> dict[str, str]:
    """Header name -> its text, each naming a data file outside ``folder``."""
    secret = str(folder.parent / "secret.raw")
    os.symlink(secret, folder / "link.raw")
    listed = "s0.raw\ns1.raw\n../secret.raw\ns3.raw\ns4.raw\n"
    return {
        "up.nhdr": _NRRD + "data file: ../secret.raw\n",
        "absolute.nhdr": _NRRD + f"data file: {secret}\n",
        "link.nhdr": _NRRD + "data file: link.raw\n",
        "list.nhdr": _NRRD + "data file: LIST 2\n" + listed,
        "pattern.nhdr": _NRRD + "data file: ../secre%dt.raw 0 0 1\n",
        "repeated.nhdr": _NRRD + f"data file: s0.raw\ndatafile: {secret}\n",
        "up.mhd": _MHD + "ElementDataFile = ../secret.raw\n",
        "absolute.mhd": _MHD + f"ElementDataFile = {secret}\n",
        "link.mhd": _MHD + "ElementDataFile = link.raw\n",
        "list.mhd": _MHD + "ElementDataFile = LIST 2D\n" + listed,
        "pattern.mhd": _MHD + "ElementDataFile = ../s%d.raw 0 4 1\n",
    }


def test_data_files_outside_the_header_folder_are_refused(study: Path) -> None:
    """Before, each of these read the parent folder's file as a volume."""
    for name, text in _escapes(study).items():
        header = study / name
        header.write_text(text)
        with pytest.raises(InputError, match=rf"{re.escape(str(header))}: its data file "
                           r"'[^']*' resolves to .*, outside the header's folder"):
            read_volume(_source(header), ReadOptions())


def test_data_files_beside_the_header_are_read(study: Path, volume: Callable[..., np.ndarray],
                                               voxels: bytes) -> None:
    """One file, a LIST and a numbered pattern inside the folder still read."""
    (study / "whole.raw").write_bytes(voxels)
    listed = "".join(f"s{k}.raw\n" for k in range(5))
    headers = {"one.nhdr": _NRRD + "data file: whole.raw\n",
               "list.nhdr": _NRRD + "data file: LIST 2\n" + listed,
               "pattern.nhdr": _NRRD + "data file: s%d.raw 0 4 1 2\n",
               "one.mhd": _MHD + "ElementDataFile = whole.raw\n",
               "list.mhd": _MHD + "ElementDataFile = LIST 2D\n" + listed,
               "pattern.mhd": _MHD + "ElementDataFile = s%d.raw 0 4 1\n"}
    options = ReadOptions(orientation="native")
    for name, text in headers.items():
        (study / name).write_text(text)
        read = read_volume(_source(study / name), options)
        np.testing.assert_array_equal(read.data, volume().astype(np.float32), err_msg=name)


def test_unreadable_data_file_patterns_are_refused(study: Path) -> None:
    for value, problem in [("s%s.raw 0 4 1", "is not FORMAT MIN MAX STEP"),
                           ("s%d.raw 0 4 0", "is not FORMAT MIN MAX STEP"),
                           ("s%d.raw 0 99999999 1", "names 100000000 files")]:
        header = study / "p.nhdr"
        header.write_text(_NRRD + f"data file: {value}\n")
        with pytest.raises(InputError, match=f"p.nhdr: its data file pattern .*{problem}"):
            read_volume(_source(header), ReadOptions())


@pytest.mark.parametrize("name", ["a.nii", "b.nii.gz", "c.nrrd", "d.mha", "e.mhd",
                                  "f.mgz", "g.hdr", "h.npz", "i.zip"])
def test_one_volume_cap_holds_every_format(tmp_path: Path, name: str,
                                           volume: Callable[..., np.ndarray],
                                           write_itk: Callable[..., Path],
                                           write_nibabel: Callable[..., Path],
                                           write_nifti: Callable[..., Path],
                                           write_npz: Callable[..., dict],
                                           write_ukb_zip: Callable[..., Path]) -> None:
    """The cap counts float32 bytes (6 x 7 x 5 voxels: 840), for compressed files too."""
    data = volume()
    path = tmp_path / name
    if name.endswith((".nrrd", ".mha", ".mhd")):
        write_itk(path, data, compress=name.endswith(".mha"))
    elif name.endswith((".mgz", ".hdr")):
        write_nibabel(path, data)
    elif name.endswith(".npz"):
        write_npz(path, {"train": 1}, side=6)
        data = np.zeros((6, 6, 6))
    elif name.endswith(".zip"):
        write_ukb_zip(path, data)
    else:
        write_nifti(path, data)
    source = resolve_sources([path])[0]
    size = 4 * data.size
    assert read_volume(source, ReadOptions(max_volume_bytes=size)).data.size == data.size
    with pytest.raises(InputError, match=rf"{re.escape(str(path))}: .*over the cap of "
                       rf"{size - 1} bytes .*--max-volume-bytes"):
        probe_shape(source, ReadOptions(max_volume_bytes=size - 1))


def _measure(action: Callable[[], object]) -> tuple[float, int]:
    """Seconds and peak bytes Python allocated while ``action`` ran."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        action()
    finally:
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return elapsed, peak


def _npy(shape: tuple[int, ...], body: bytes = b"") -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return buffer.getvalue() + body


def _lying_npz(path: Path, images: int, side: int = 28) -> Path:
    """An npz whose images header claims ``images`` volumes and holds none."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("train_images.npy", _npy((images, side, side, side)))
    return path


def _lying_minc2(path: Path) -> Path:
    """A MINC2 file of a few kB whose image dataset claims 1000^3 bytes, never written."""
    import h5py
    from nibabel.testing import data_path

    template = Path(data_path) / "minc2_1_scale.mnc"
    path.write_bytes(template.read_bytes())
    with h5py.File(path, "r+") as file:
        group = file["minc-2.0/image/0"]
        attrs = dict(group["image"].attrs)
        del group["image"]
        image = group.create_dataset("image", shape=(1000, 1000, 1000), dtype="u1",
                                     chunks=(1, 20, 20), compression="gzip")
        image.attrs.update(attrs)
        for axis in ("xspace", "yspace", "zspace"):
            file[f"minc-2.0/dimensions/{axis}"].attrs["length"] = 1000
    return path


def _lying_dicom(path: Path, frames: int = 200_000) -> Path:
    """A DICOM file of under 1 kB whose header claims ``frames`` frames."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID, ds.Modality = generate_uid(), "MR"
    ds.NumberOfFrames, ds.Rows, ds.Columns = frames, 16, 16
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = b"\0" * 32
    ds.save_as(path, enforce_file_format=True)
    return path


def _lying_nifti_gz(path: Path) -> Path:
    """A 5 MB gzip file whose header claims 1700^3 uint8 voxels: 4.9 GB, within what
    5 MB of deflate can expand to, 19.6 GB once read as float32."""
    header = nib.Nifti1Image(np.zeros((1, 1, 1), np.uint8), np.eye(4)).header
    header.set_data_shape((1700, 1700, 1700))
    noise = np.random.default_rng(0).bytes(5 * 2**20)  # incompressible: the file stays big
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4 + noise, compresslevel=1))
    return path


_HOSTILE: dict[str, Callable[[Path], Path]] = {
    "npz.npz": lambda p: _lying_npz(p, 3_000_000),
    "minc2.mnc": _lying_minc2,
    "dicom.dcm": _lying_dicom,
    "gzip.nii.gz": _lying_nifti_gz,
}
_MESSAGES = {
    "npz.npz": "more than .* gzip-compressed bytes can hold",
    "minc2.mnc": "more than .* gzip-compressed bytes can hold",
    "dicom.dcm": "the file holds .*: truncated, or a header that lies",
    "gzip.nii.gz": "over the cap of 4294967296 bytes a volume",
}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    folder = tmp_path_factory.mktemp("hostile")
    yield {name: make(folder / name) for name, make in _HOSTILE.items()}


@pytest.mark.parametrize("name", list(_HOSTILE))
def test_lying_headers_are_refused_fast_and_small(hostile: dict[str, Path],
                                                  name: str) -> None:
    """Before: 3M sources and 1.7 GB (npz), a 6.4 GiB allocation (MINC2), 15 s (DICOM),
    a 100 GiB claim accepted (gzip)."""
    path = hostile[name]

    def refuse() -> None:
        sources = resolve_sources([path])
        assert len(sources) == 1
        with pytest.raises(InputError, match=f"{re.escape(str(path))}.*: .*{_MESSAGES[name]}"):
            probe_shape(sources[0], ReadOptions())  # what convert does first; reading too

    seconds, peak = _measure(refuse)
    assert seconds < 3 and peak < 20 * 2**20, (seconds, peak)


def test_an_npz_yields_a_bounded_number_of_volumes(tmp_path: Path) -> None:
    """Genuine bytes (all zeros, deflated), but more volumes than one file may yield."""
    path = tmp_path / "many.npz"
    images = MAX_VOLUMES_PER_FILE + 1
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("train_images.npy", _npy((images, 2, 2, 2), b"\0" * 8 * images))
    (source,) = resolve_sources([path])
    with pytest.raises(InputError, match=f"many.npz: .*claims {images} volumes, over the "
                       f"{MAX_VOLUMES_PER_FILE} one file may hold"):
        read_volume(source, ReadOptions())


def test_an_npz_array_is_held_to_the_cap_before_it_is_decompressed(
        tmp_path: Path, write_npz: Callable[..., dict]) -> None:
    path = tmp_path / "m.npz"
    write_npz(path, {"train": 10}, side=8)  # 5120 bytes of uint8; 2048 a volume as float32
    options = ReadOptions(max_volume_bytes=4096)
    sources = resolve_sources([path], max_volume_bytes=4096)
    assert [s.id for s in sources] == ["m"]  # the file, to fail as one
    with pytest.raises(InputError, match=r"m.npz: .*array train_images of shape \(10, 8, 8, 8\)"
                       r" decompresses to 5120 bytes, over the cap of 4096"):
        read_volume(sources[0], options)
    assert len(resolve_sources([path], max_volume_bytes=5120)) == 10


def test_a_dicom_folder_reads_each_header_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               volume: Callable[..., np.ndarray],
                                               write_dicom_series: Callable[..., Path]) -> None:
    """40 series of 10 files: each file's header is read once, its pixels once."""
    study = tmp_path / "study"
    for number in range(40):
        write_dicom_series(study, volume((4, 3, 10), seed=number), number=number + 1,
                           names=f"s{number:02d}_", seed=number)
    reads = {"header": 0, "pixels": 0}
    original = pydicom.dcmread

    def counted(*args: object, **kwargs: object) -> object:
        reads["header" if kwargs.get("stop_before_pixels") else "pixels"] += 1
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pydicom, "dcmread", counted)
    summary = convert([study], tmp_path / "s.zarr", workers=1)
    assert summary.converted == 40
    assert reads == {"header": 400, "pixels": 400}


@pytest.mark.parametrize("name", [*_HOSTILE, "escape.nhdr"])
def test_a_hostile_file_fails_alone_in_a_conversion(hostile: dict[str, Path], tmp_path: Path,
                                                    name: str, volume: Callable[..., np.ndarray],
                                                    write_nifti: Callable[..., Path],
                                                    voxels: bytes) -> None:
    good = write_nifti(tmp_path / "good.nii.gz", volume())
    if name == "escape.nhdr":
        (tmp_path / "secret.raw").write_bytes(voxels)
        (tmp_path / "in").mkdir()
        bad = tmp_path / "in" / name
        bad.write_text(_NRRD + "data file: ../secret.raw\n")
    else:
        bad = hostile[name]
    store = tmp_path / "v.zarr"
    start = time.perf_counter()
    summary = convert([good, bad], store, workers=1)
    assert time.perf_counter() - start < 30
    assert summary.converted == 1 and summary.failed == 1
    (error,) = summary.failures.values()
    assert str(bad) in error
    ds = open_volumes(store)
    status = dict(zip(ds.id.values.tolist(), stores.read_status(store).tolist(), strict=True))
    assert status["good"] == stores.OK
    assert [s for i, s in status.items() if i != "good"] == [stores.FAILED]


def test_the_cap_is_an_option_of_convert(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         volume: Callable[..., np.ndarray],
                                         write_nifti: Callable[..., Path]) -> None:
    from raptorz.cli.main import main

    good = write_nifti(tmp_path / "good.nii.gz", volume())  # 840 bytes as float32
    base = ["convert", str(good), "--workers", "1", "-o"]
    assert main([*base, str(tmp_path / "small.zarr"), "--max-volume-bytes", "839"]) == 2
    assert "good.nii.gz: the header describes a volume of shape (6, 7, 5), 840 bytes as " \
        "float32, over the cap of 839 bytes" in capsys.readouterr().err
    assert main([*base, str(tmp_path / "ok.zarr"), "--max-volume-bytes", "840"]) == 0
    assert convert([good], tmp_path / "api.zarr", max_volume_bytes=840).converted == 1
