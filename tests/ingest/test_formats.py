"""The research formats: NRRD, MetaImage, MGH/MGZ, Analyze and MINC, on files the tests write.

One oblique anatomy written in every format converts to one array and one spacing (ITK's
LPS geometry and nibabel's RAS agree); every reader refuses truncated files, wrong magic,
4D data, headers that lie about the size and NaN voxels, naming the file.
"""

from __future__ import annotations

import gzip
import re
import sys
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from raptorz.errors import InputError, RaptorzWarning
from raptorz.ingest.readers import ReadOptions, probe_shape, read_volume
from raptorz.ingest.sources import resolve_sources
from raptorz.ingest.volumes import convert
from raptorz.layouts import open_volumes

#: Every writable format but Analyze, by file name (the id is the stem): the writer fixture
#: (``write_nifti``, ``write_itk``, ``write_nibabel``) that writes it, and its options.
WRITERS: dict[str, tuple[str, dict[str, bool]]] = {
    "a.nii.gz": ("nifti", {}), "b.nrrd": ("itk", {}), "c.nhdr": ("itk", {}),
    "d.mha": ("itk", {"compress": True}), "e.mhd": ("itk", {}),
    "f.mgz": ("nibabel", {}), "g.mgh": ("nibabel", {}),
}
NEW_FORMATS = [name for name in WRITERS if not name.endswith(".nii.gz")] + ["h.hdr"]
#: Where each file's voxels live (detached headers point to a second file).
_DATA_FILE = {".nhdr": ".raw", ".mhd": ".raw", ".hdr": ".img"}
MINC_DATA = Path(nib.__file__).parent / "tests" / "data"


@pytest.fixture
def write(write_nifti: Callable[..., Path], write_itk: Callable[..., Path],
          write_nibabel: Callable[..., Path]) -> Callable[[Path, str, np.ndarray], Path]:
    """``write(folder, name, data) -> path``: ``data`` as ``folder / name``, written as
    :data:`WRITERS` says (Analyze for any other name)."""
    writers = {"nifti": write_nifti, "itk": write_itk, "nibabel": write_nibabel}

    def write(folder: Path, name: str, data: np.ndarray) -> Path:
        kind, options = WRITERS.get(name, ("nibabel", {}))
        return writers[kind](folder / name, data, **options)
    return write


def _source(path: Path):  # noqa: ANN202 - a Source
    (source,) = resolve_sources([path])
    return source


def test_one_oblique_anatomy_gives_one_array_in_every_format(
        tmp_path: Path, oblique_ras_spacing: tuple[float, float, float],
        to_ras: Callable[[np.ndarray], np.ndarray], volume: Callable[..., np.ndarray],
        write_nibabel: Callable[..., Path], write: Callable[[Path, str, np.ndarray], Path]) -> None:
    data = volume()  # int16, every voxel different: any flip or transposition shows
    for name in WRITERS:
        write(tmp_path, name, data)
    write_nibabel(tmp_path / "h.hdr", data)
    sources = resolve_sources([tmp_path])
    assert [(s.id, s.kind) for s in sources] == [
        ("a", "nifti"), ("b", "nrrd"), ("c", "nrrd"), ("d", "metaimage"), ("e", "metaimage"),
        ("f", "mgh"), ("g", "mgh"), ("h", "analyze")]
    for source in sources[:-1]:
        read = read_volume(source, ReadOptions())
        np.testing.assert_array_equal(read.data, to_ras(data), err_msg=source.id)
        np.testing.assert_allclose(read.spacing, oblique_ras_spacing, rtol=1e-6)
        assert probe_shape(source, ReadOptions()) == read.data.shape and not read.note
    store = tmp_path / "v.zarr"
    summary = convert([tmp_path / name for name in WRITERS], store, intensity="range:0,210",
                      dtype="float32")
    assert summary.converted == 7 and not summary.notes
    ds = open_volumes(store)
    nifti = ds.volume.sel(id="a").values
    for name in "bcdefg":
        np.testing.assert_array_equal(ds.volume.sel(id=name).values, nifti, err_msg=name)
        np.testing.assert_allclose(ds.spacing.sel(id=name), oblique_ras_spacing, rtol=1e-6)
    # Analyze keeps the voxel sizes but not the rotation: its stored order, with the
    # first axis flipped by the radiological (LAS) assumption the note reports
    analyze = read_volume(sources[-1], ReadOptions())
    np.testing.assert_array_equal(analyze.data, data[::-1])
    np.testing.assert_allclose(analyze.spacing, (2, 3, 1))
    with pytest.warns(RaptorzWarning, match="h: Analyze 7.5 stores no orientation"):
        summary = convert([tmp_path / "h.hdr"], tmp_path / "h.zarr", workers=1)
    assert summary.converted == 1 and "check left and right" in summary.notes["h"]


def _truncate(path: Path) -> None:
    data_file = path.with_suffix(_DATA_FILE.get(path.suffix, path.suffix))
    content = data_file.read_bytes()
    data_file.write_bytes(content[: len(content) - 100])


def _lie(path: Path) -> None:
    """Make the header claim 3000^3 voxels (over 50 GB) without touching the data."""
    if path.suffix in (".nrrd", ".nhdr", ".mha", ".mhd"):
        text = path.read_bytes()
        path.write_bytes(re.sub(rb"(sizes: |DimSize = )6 7 5", rb"\g<1>3000 3000 3000",
                                text))
        return
    header = nib.load(path).header
    header.set_data_shape((3000, 3000, 3000))
    if path.suffix == ".hdr":
        path.write_bytes(header.binaryblock)
        return
    compressed = path.suffix == ".mgz"
    content = gzip.decompress(path.read_bytes()) if compressed else path.read_bytes()
    content = header.binaryblock + content[len(header.binaryblock):]
    path.write_bytes(gzip.compress(content) if compressed else content)


@pytest.mark.parametrize("name", NEW_FORMATS)
@pytest.mark.parametrize(("problem", "message"), [
    ("truncated", "truncated|cannot read the voxels|cannot be read as"),
    ("magic", "is not a|cannot be read as|lies about the size"),
    ("4d", "is a 4D series of 2 frames"),
    ("lies", "lies about the size"),
    ("nan", "1 of 210 voxels are NaN or infinite"),
])
def test_bad_files_are_refused_naming_the_file(
        tmp_path: Path, name: str, problem: str, message: str, volume: Callable[..., np.ndarray],
        write: Callable[[Path, str, np.ndarray], Path]) -> None:
    data = volume(dtype="float32")
    if problem == "4d":
        data = np.stack([data, data], axis=-1)
    if problem == "nan":
        data[2, 3, 4] = np.nan
    path = write(tmp_path, name, data)
    if problem == "truncated":
        _truncate(path)
    elif problem == "magic":
        path.write_bytes(b"this is not a volume\n" * 30)
    elif problem == "lies":
        _lie(path)
    with pytest.raises(InputError, match=f"{re.escape(str(path))}: .*({message})"):
        read_volume(_source(path), ReadOptions())


def test_missing_simpleitk_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           volume: Callable[..., np.ndarray],
                                           write_itk: Callable[..., Path]) -> None:
    source = _source(write_itk(tmp_path / "v.nrrd", volume()))
    monkeypatch.setitem(sys.modules, "SimpleITK", None)  # what an install without it sees
    with pytest.raises(InputError, match=r'v.nrrd: reading NRRD and MetaImage needs '
                       r'SimpleITK: pip install "raptorz\[itk\]"'):
        read_volume(source, ReadOptions())


def test_a_missing_data_file_is_named(tmp_path: Path, volume: Callable[..., np.ndarray],
                                      write: Callable[[Path, str, np.ndarray], Path]) -> None:
    for name in ("c.nhdr", "e.mhd"):
        path = write(tmp_path, name, volume())
        path.with_suffix(".raw").unlink()
        with pytest.raises(InputError, match=f"{name}: its data file .*{name[0]}.raw is missing"):
            read_volume(_source(path), ReadOptions())


def test_a_nifti_renamed_nrrd_is_not_read_as_nifti(tmp_path: Path,
                                                   volume: Callable[..., np.ndarray],
                                                   write_nifti: Callable[..., Path]) -> None:
    path = tmp_path / "v.nrrd"
    path.write_bytes(write_nifti(tmp_path / "v.nii", volume()).read_bytes())
    with pytest.raises(InputError, match="v.nrrd: is not a NRRD file"):
        read_volume(_source(path), ReadOptions())


@pytest.mark.parametrize("name", ["minc1_1_scale.mnc", "minc2_1_scale.mnc", "tiny.mnc"])
def test_minc_files_shipped_with_nibabel(name: str) -> None:
    source = _source(MINC_DATA / name)
    assert source.kind == "minc"
    read = read_volume(source, ReadOptions())
    canonical = nib.as_closest_canonical(nib.load(source.path))
    np.testing.assert_allclose(read.data, canonical.get_fdata(), rtol=1e-6)
    np.testing.assert_allclose(read.spacing, canonical.header.get_zooms())


def test_bad_minc_files_are_refused(tmp_path: Path) -> None:
    for name in ("minc1_4d.mnc", "minc2_4d.mnc"):
        with pytest.raises(InputError, match=f"{name}: is a 4D series of 2 frames"):
            read_volume(_source(MINC_DATA / name), ReadOptions())
    for name in ("minc1_1_scale.mnc", "minc2_1_scale.mnc"):
        content = (MINC_DATA / name).read_bytes()
        cut = tmp_path / f"cut_{name}"
        cut.write_bytes(content[: len(content) // 2])
        with pytest.raises(InputError, match=f"cut_{name}: (cannot|.*truncated)"):
            read_volume(_source(cut), ReadOptions())
    junk = tmp_path / "junk.mnc"
    junk.write_bytes(b"this is not a volume\n" * 30)
    with pytest.raises(InputError, match="junk.mnc: cannot be read as minc"):
        read_volume(_source(junk), ReadOptions())


@pytest.mark.slow
@pytest.mark.requires_data
def test_real_nrrd_and_metaimage_convert_and_embed_through_the_cli(
        shared_data: Path, tmp_path: Path, tiny_vit_weights: tuple[str, Path]) -> None:
    """A real scan written by SimpleITK as NRRD and MetaImage: the same volume, the same
    embedding as the NIfTI it came from, through ``raptorz convert / projector / embed``."""
    import SimpleITK as sitk

    from raptorz import open_embeddings
    from raptorz.cli.main import main

    scan = shared_data / "small" / "itk_KmeansTest_T1UCharRaw.nii.gz"  # axes permuted
    folder = tmp_path / "scans"
    folder.mkdir()
    (folder / "nifti.nii.gz").write_bytes(scan.read_bytes())
    image = sitk.ReadImage(str(scan))
    sitk.WriteImage(image, str(folder / "nrrd.nrrd"), useCompression=True)
    sitk.WriteImage(image, str(folder / "meta.mhd"))  # header + raw data file
    store, projector, output = tmp_path / "v.zarr", tmp_path / "p.npy", tmp_path / "e.zarr"
    assert main(["convert", str(folder), "-o", str(store), "--shape", "64,32,64",
                 "--dtype", "float32", "--workers", "1"]) == 0
    volumes = open_volumes(store)
    assert list(volumes.id.values) == ["meta", "nifti", "nrrd"]
    assert volumes.original_shape.sel(id="nifti").values.tolist() == [128, 62, 128]
    for name in ("meta", "nrrd"):
        np.testing.assert_array_equal(volumes.volume.sel(id=name), volumes.volume.sel(id="nifti"))
        np.testing.assert_allclose(volumes.spacing.sel(id=name), volumes.spacing.sel(id="nifti"))
    assert main(["projector", "--seed", "0", "--dim", "64", "--k", "5", "-o", str(projector)]) == 0
    encoder, weights = tiny_vit_weights
    assert main(["embed", str(store), "-o", str(output), "--projector", str(projector),
                 "--encoder", encoder, "--weights", str(weights), "--workers", "1",
                 "--dashboard-address", ":0"]) == 0
    embeddings = open_embeddings(output)
    (name,) = embeddings.attrs["projectors"]
    values = embeddings[name].load()
    assert np.isfinite(values).all() and float(np.abs(values).max()) > 0
    for volume_id in ("meta", "nrrd"):
        np.testing.assert_array_equal(values.sel(id=volume_id), values.sel(id="nifti"))


def test_size_checks_bound_gzip_by_its_ratio_and_other_data_by_the_cap(
        tmp_path: Path, volume: Callable[..., np.ndarray],
        write: Callable[[Path, str, np.ndarray], Path]) -> None:
    from raptorz.ingest._guard import check_size

    small = ReadOptions(max_member_bytes=100)  # the cap binds only what nothing else bounds
    for name in ("f.mgz", "a.nii.gz", "d.mha"):  # all gzip-compressed
        path = write(tmp_path, name, volume(dtype="float32"))  # 840 bytes of voxels
        assert read_volume(_source(path), small).data.shape == (5, 6, 7)
    check_size("x.nrrd", 10**6, 1000, "gzip", cap=1)
    with pytest.raises(InputError, match="x.nrrd: .* more than 100 gzip-compressed bytes"):
        check_size("x.nrrd", 1100 * 100 + 4097, 100, "gzip", cap=10**12)
    with pytest.raises(InputError, match="x.nrrd: .* over the cap of 1000 for compressed"):
        check_size("x.nrrd", 1001, 10, "other", cap=1000)
    check_size("x.nrrd", 1000, None, "raw", cap=1000)


def test_vector_images_are_refused(tmp_path: Path) -> None:
    import SimpleITK as sitk

    path = tmp_path / "rgb.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((5, 6, 7, 3), np.uint8), isVector=True),
                    str(path))
    with pytest.raises(InputError, match="rgb.mha: has 3 values per voxel"):
        read_volume(_source(path), ReadOptions())
