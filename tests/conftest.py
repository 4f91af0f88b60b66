"""Shared fixtures: small, seeded test data written by the tests themselves.

Writers are fixtures that return the writing function (pytest's factory fixtures): a test
takes ``write_nifti`` as an argument and calls it. Heavy libraries (torch, timm, pydicom,
the reference implementations) are imported inside the functions that need them, so a test
that needs none of them does not load them.
"""

from __future__ import annotations

import gzip
import io
import os
import zipfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np
import pytest

from raptorz.embedding.projection import create_projector
from raptorz.embedding.settings import KernelSettings

if TYPE_CHECKING:
    import torch
    from distributed import Client

    from raptorz.embedding.encoders import Encoder
    from raptorz.embedding.projection import Projector
    from raptorz.embedding.runner import EmbedSummary

pytest_plugins = ("pytester",)  # tests/test_data_marker.py runs this file's hooks

#: Real scans shared with the project (see its README); absent in a user's clone.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _in_ci() -> bool:
    """Whether this is a CI run (``CI=true``, as GitHub Actions, GitLab and others set)."""
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


#: The longest modules, run first: with pytest-xdist (README's ``-n 2 --dist loadfile``)
#: each starts at once on a process of its own instead of last, behind the others.
LONGEST_FIRST = ("test_readme.py", "test_object_storage.py", "test_embed.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Put :data:`LONGEST_FIRST` first (order kept otherwise), and refuse a test that uses
    the real data without saying so (``requires_data``)."""
    items.sort(key=lambda item: item.path.name not in LONGEST_FIRST)
    unmarked = [item.nodeid for item in items
                if "shared_data" in getattr(item, "fixturenames", ())
                and item.get_closest_marker("requires_data") is None]
    if unmarked:
        raise pytest.UsageError("these tests use the shared_data fixture without "
                                f"@pytest.mark.requires_data: {', '.join(unmarked)}")


def pytest_runtest_setup(item: pytest.Item) -> None:
    """``requires_data`` tests skip where the real data is absent, and fail in CI."""
    if item.get_closest_marker("requires_data") is None or SHARED_DATA.is_dir():
        return
    if _in_ci():
        pytest.fail(f"real data not found at {SHARED_DATA}, and CI=true: CI must have it",
                    pytrace=False)
    pytest.skip(f"real data not found at {SHARED_DATA} (present in CI, absent in a clone)")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real scans (tests that use it are marked ``requires_data``)."""
    return SHARED_DATA


# --- Small, seeded volume files in every format ``raptorz convert`` reads --------------

#: An oblique affine: array axis 0 runs to posterior (2 mm), axis 1 to superior (3 mm),
#: axis 2 to left (1 mm), all rotated 10 degrees about z. Its closest canonical order is
#: (axis 2 flipped, axis 0 flipped, axis 1).
_ANGLE = np.deg2rad(10)
_ROTATION = np.array([[np.cos(_ANGLE), -np.sin(_ANGLE), 0],
                      [np.sin(_ANGLE), np.cos(_ANGLE), 0], [0, 0, 1]])
_OBLIQUE = np.eye(4)
_OBLIQUE[:3, :3] = _ROTATION @ np.array([[0, 0, -1], [-2, 0, 0], [0, 3, 0]], float)
_OBLIQUE[:3, 3] = [10, -20, 5]
#: The spacing of a volume with affine ``_OBLIQUE`` once in RAS order.
_OBLIQUE_RAS_SPACING = (1.0, 2.0, 3.0)


def _to_ras(data: np.ndarray) -> np.ndarray:
    """What an array with affine ``_OBLIQUE`` looks like in RAS order, written by hand."""
    return np.transpose(data, (2, 0, 1))[::-1, ::-1, :]


def _volume(shape: tuple[int, ...] = (6, 7, 5), seed: int = 0, dtype: str = "int16") -> np.ndarray:
    """An asymmetric random volume (no two voxels alike for int16)."""
    rng = np.random.default_rng(seed)
    values = rng.permutation(np.prod(shape)).reshape(shape)
    return values.astype(dtype)


def _write_nifti(path: Path, data: np.ndarray, affine: np.ndarray = _OBLIQUE) -> Path:
    """A NIfTI (``.nii`` or ``.nii.gz``, by ``path``'s ending)."""
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def _write_itk(path: Path, data: np.ndarray, affine: np.ndarray = _OBLIQUE, *,
               compress: bool = False) -> Path:
    """An NRRD or MetaImage (by ``path``'s ending) written by SimpleITK, geometry in LPS.

    A 4D ``data`` gets a fourth axis of unit spacing.
    """
    import SimpleITK as sitk

    n = data.ndim
    geometry = np.eye(n + 1)
    geometry[:3, :3], geometry[:3, n] = affine[:3, :3], affine[:3, 3]
    spacing = np.linalg.norm(geometry[:n, :n], axis=0)
    to_lps = np.diag([-1.0, -1.0] + [1.0] * (n - 2))
    # ITK's index order is the reverse of the array's
    image = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(*range(n)[::-1])),
                                   isVector=False)
    image.SetSpacing(spacing.tolist())
    image.SetOrigin((to_lps @ geometry[:n, n]).tolist())
    image.SetDirection((to_lps @ geometry[:n, :n] / spacing).ravel().tolist())
    sitk.WriteImage(image, str(path), useCompression=compress)
    return path


def _write_nibabel(path: Path, data: np.ndarray, affine: np.ndarray = _OBLIQUE) -> Path:
    """An MGH/MGZ or Analyze (``.hdr`` + ``.img``) file, by ``path``'s ending."""
    kind = nib.MGHImage if path.suffix in (".mgh", ".mgz") else nib.AnalyzeImage
    nib.save(kind(data, affine), path)
    return path


def _nifti_bytes(data: np.ndarray, affine: np.ndarray = _OBLIQUE) -> bytes:
    """A ``.nii.gz`` file's bytes."""
    return gzip.compress(nib.Nifti1Image(data, affine).to_bytes())


def _write_ukb_zip(path: Path, data: np.ndarray | None,
                   member: str = "T1/T1_brain.nii.gz") -> Path:
    """A UK Biobank-style zip holding ``data`` as ``member`` among other members."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("T1/T1.json", "{}")
        if data is not None:
            archive.writestr(member, _nifti_bytes(data))
    return path


def _write_npz(path: Path, sizes: dict[str, int], side: int = 8, seed: int = 0) -> dict:
    """A MedMNIST-style npz (uint8 images, (N, 1) labels); returns its arrays."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in sizes.items():
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, side, side, side), np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, (n, 1))
    np.savez_compressed(path, **arrays)
    return arrays


def _write_dicom_series(folder: Path, data: np.ndarray, *, slope: float = 2.0,
                        intercept: float = -100.0, step: float = 2.5, seed: int = 0,
                        series: str | None = None, names: str = "slice",
                        number: int | None = None, description: str | None = None,
                        image_type: tuple[str, ...] = ()) -> Path:
    """A single-frame DICOM series of ``data`` (columns, rows, slices) in shuffled files.

    Axial slices (patient LPS axes), pixel spacing 0.5 (rows) x 0.8 (columns) mm, slice
    ``k`` at z = ``k * step``; stored values are ``(data - intercept) / slope``. The
    series number, description and image type are written where given.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series = series or generate_uid()
    order = np.random.default_rng(seed).permutation(data.shape[2])
    stored = np.round((data - intercept) / slope).astype(np.uint16)
    for instance, k in enumerate(order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID, ds.Modality, ds.InstanceNumber = series, "MR", instance + 1
        if number is not None:
            ds.SeriesNumber = number
        if description is not None:
            ds.SeriesDescription = description
        if image_type:
            ds.ImageType = list(image_type)
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-30.0, -40.0, float(k) * step]
        ds.PixelSpacing = [0.5, 0.8]
        ds.SliceThickness = step
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.Rows, ds.Columns = data.shape[1], data.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        ds.save_as(folder / f"{names}{instance:03d}.dcm", enforce_file_format=True)
    return folder


def _zip_bomb(path: Path, size: int) -> Path:
    """A UK Biobank-style zip whose member decompresses to ``size`` bytes of voxels."""
    side = round(size ** (1 / 3))
    header = nib.Nifti1Image(np.zeros((1, 1, 1), np.uint8), np.eye(4)).header
    header.set_data_shape((side, side, side))
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb") as stream:
        stream.write(header.binaryblock + b"\0" * 4)
        stream.write(b"\0" * side**3)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("T1/T1_brain.nii.gz", buffer.getvalue())
    return path


def _write_multiframe(path: Path, data: np.ndarray, *, step: float = 1.5, seed: int = 0) -> Path:
    """An enhanced multi-frame DICOM of ``data`` (columns, rows, frames), frames shuffled.

    Geometry and rescaling live in the functional groups: orientation, pixel spacing
    (0.7 x 0.9 mm) and rescale (slope 0.5, intercept 3) shared, positions per frame
    along a sagittal normal (patient x).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    order = np.random.default_rng(seed).permutation(data.shape[2])
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID, ds.Modality = generate_uid(), "MR"
    ds.NumberOfFrames, ds.Rows, ds.Columns = data.shape[2], data.shape[1], data.shape[0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    orientation, measures, transform = Dataset(), Dataset(), Dataset()
    orientation.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    measures.PixelSpacing, measures.SliceThickness = [0.7, 0.9], step
    transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = 0.5, 3, "US"
    shared = Dataset()
    shared.PlaneOrientationSequence = [orientation]
    shared.PixelMeasuresSequence = [measures]
    shared.PixelValueTransformationSequence = [transform]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for k in order:
        position, frame = Dataset(), Dataset()
        position.ImagePositionPatient = [float(k) * step, -50.0, 60.0]
        frame.PlanePositionSequence = [position]
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = frames
    stored = np.round((data - 3) / 0.5).astype(np.uint16)
    ds.PixelData = np.ascontiguousarray(np.stack([stored[:, :, k].T for k in order])).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="session")
def volume() -> Callable[..., np.ndarray]:
    """``volume(shape=(6, 7, 5), seed=0, dtype="int16")``: an asymmetric random volume
    (no two voxels alike for int16)."""
    return _volume


@pytest.fixture(scope="session")
def to_ras() -> Callable[[np.ndarray], np.ndarray]:
    """``to_ras(data)``: what an array written with the default (oblique) affine looks like
    in RAS order, written by hand."""
    return _to_ras


@pytest.fixture(scope="session")
def oblique_ras_spacing() -> tuple[float, float, float]:
    """The spacing of a volume written with the default (oblique) affine, in RAS order."""
    return _OBLIQUE_RAS_SPACING


@pytest.fixture(scope="session")
def write_nifti() -> Callable[..., Path]:
    """``write_nifti(path, data, affine=oblique) -> path``: a NIfTI (``.nii`` or ``.nii.gz``)."""
    return _write_nifti


@pytest.fixture(scope="session")
def write_itk() -> Callable[..., Path]:
    """``write_itk(path, data, affine=oblique, *, compress=False) -> path``: an NRRD or
    MetaImage (by ``path``'s ending) written by SimpleITK."""
    return _write_itk


@pytest.fixture(scope="session")
def write_nibabel() -> Callable[..., Path]:
    """``write_nibabel(path, data, affine=oblique) -> path``: an MGH/MGZ or Analyze file."""
    return _write_nibabel


@pytest.fixture(scope="session")
def write_ukb_zip() -> Callable[..., Path]:
    """``write_ukb_zip(path, data, member="T1/T1_brain.nii.gz") -> path``: a UK Biobank-style
    zip holding ``data`` (``None``: no such member) among other members."""
    return _write_ukb_zip


@pytest.fixture(scope="session")
def write_npz() -> Callable[..., dict]:
    """``write_npz(path, sizes, side=8, seed=0) -> arrays``: a MedMNIST-style npz of
    ``sizes[split]`` uint8 images per split, with (N, 1) labels."""
    return _write_npz


@pytest.fixture(scope="session")
def write_dicom_series() -> Callable[..., Path]:
    """``write_dicom_series(folder, data, *, slope=2, intercept=-100, step=2.5, ...) -> folder``:
    a single-frame DICOM series of ``data`` (columns, rows, slices) in shuffled files."""
    return _write_dicom_series


@pytest.fixture(scope="session")
def write_multiframe() -> Callable[..., Path]:
    """``write_multiframe(path, data, *, step=1.5, seed=0) -> path``: an enhanced
    multi-frame DICOM of ``data`` (columns, rows, frames), frames shuffled."""
    return _write_multiframe


@pytest.fixture(scope="session")
def zip_bomb() -> Callable[[Path, int], Path]:
    """``zip_bomb(path, size) -> path``: a UK Biobank-style zip whose member decompresses
    to ``size`` bytes of voxels."""
    return _zip_bomb


# --- Tiny random-weight ViT (encoders, kernel; used by every stage that embeds) ---------
# No pretrained weights can be downloaded in CI, so every test that needs an encoder uses
# this tiny DINOv2-style ViT, with weights drawn here and loaded through the real
# ``weights=FILE`` path.

#: The tiny test encoder's name (understood by ``raptorz.create_encoder``).
_TINY_VIT = "raptorz_tiny_dinov2"


def _tiny_vit_state_dict(seed: int = 0, img_size: int = 224) -> dict[str, torch.Tensor]:
    """Random weights of :data:`_TINY_VIT` in timm's layout, seeded.

    timm's own init leaves DINOv2's layer scales at 1e-5 (blocks almost the identity);
    these weights make every block matter, so tests can tell inputs apart.
    """
    import timm
    import torch

    from raptorz.embedding.encoders import SMALL_ENCODERS

    architecture, kwargs = SMALL_ENCODERS[_TINY_VIT]
    model = timm.create_model(architecture, pretrained=False, img_size=img_size,
                              num_classes=0, **kwargs)
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in model.state_dict().items():
        noise = torch.randn(value.shape, generator=generator)
        if key.endswith(".gamma"):
            out[key] = 0.5 + 0.1 * noise
        elif "norm" in key and key.endswith(".weight"):
            out[key] = 1.0 + 0.1 * noise
        elif value.ndim <= 1:
            out[key] = 0.1 * noise
        else:
            fan_in = value[0].numel() if value.ndim > 1 else 1
            out[key] = noise / fan_in**0.5 if key.endswith(".weight") else 0.5 * noise
    return out


def _write_tiny_vit(path: Path, seed: int = 0) -> Path:
    """Save :func:`_tiny_vit_state_dict` as safetensors at ``path`` and return it."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in _tiny_vit_state_dict(seed).items()}, str(path))
    return path


def _randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every parameter of ``module`` seeded random values in place, and return it.

    Weights ~ N(0, 1 / fan_in), norm scales near 1, layer scales near 0.5, biases and
    tokens of a few tenths: every block matters and outputs stay O(1). Works on any
    implementation (timm, transformers, segment_anything, open_clip), so a test can
    draw an independent model's weights and load them into raptorz's.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, value in module.named_parameters():
            noise = torch.randn(value.shape, generator=generator, dtype=torch.float64)
            last = key.rsplit(".", 1)[-1]
            if last in ("gamma", "lambda1", "gamma_1", "gamma_2") or "layer_scale" in key \
                    or key.endswith((".ls1.gamma", ".ls2.gamma")):
                new = 0.5 + 0.1 * noise
            elif ("norm" in key or "ln" in key) and last == "weight":
                new = 1.0 + 0.1 * noise
            elif value.ndim <= 1 or last == "bias":
                new = 0.1 * noise
            elif last == "weight" or value.ndim == 2 and "rel_pos" not in key:
                new = noise / value[0].numel() ** 0.5
            else:  # tokens, position embeddings, relative positions
                new = 0.5 * noise
            value.copy_(new.to(value.dtype))
    return module


@pytest.fixture(scope="session")
def tiny_vit_name() -> str:
    """The tiny test encoder's name (understood by ``raptorz.create_encoder``): 2 blocks,
    width 64, patch 14 (1 + 16 x 16 tokens at 224 px)."""
    return _TINY_VIT


@pytest.fixture(scope="session")
def tiny_vit_state_dict() -> Callable[..., dict[str, torch.Tensor]]:
    """``tiny_vit_state_dict(seed=0, img_size=224)``: seeded random weights of the tiny ViT in
    timm's layout, every block mattering."""
    return _tiny_vit_state_dict


@pytest.fixture(scope="session")
def write_tiny_vit() -> Callable[..., Path]:
    """``write_tiny_vit(path, seed=0) -> path``: the tiny ViT's seeded random weights saved as
    safetensors."""
    return _write_tiny_vit


@pytest.fixture(scope="session")
def tiny_vit_weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """``(encoder name, weights file)`` of a tiny DINOv2-style ViT with random weights.

    Use as ``raptorz.embedding.encoders.create_encoder(name, weights=path)`` or on the command line
    as ``--encoder NAME --weights PATH``: 2 blocks, width 64, 257 tokens at 224 px.
    """
    path = _write_tiny_vit(tmp_path_factory.mktemp("vit") / "tiny_vit.safetensors")
    return _TINY_VIT, path


@pytest.fixture(scope="module")
def encoder(tiny_vit_weights: tuple[str, Path]) -> Encoder:
    """The tiny ViT of :func:`tiny_vit_weights`, loaded on the CPU (one per test module)."""
    from raptorz.embedding.encoders import create_encoder

    name, path = tiny_vit_weights
    return create_encoder(name, weights=path, device="cpu")


# --- Independent implementations of each encoder family (tiny, seeded weights) ---------
# Each builder makes the reference model with the library users run it with (transformers,
# segment_anything, open_clip), saves its weights the way users hold them, and returns the
# file or folder, the raptorz encoder name and overrides that describe the same
# architecture, and the reference's tokens as a function of the images.

_TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
         "intermediate_size": 256}


@dataclass
class _Reference:
    """A saved reference model: where its weights are and what it computes."""

    name: str
    path: Path
    layout: str
    tokens: Callable[[torch.Tensor], torch.Tensor]
    overrides: dict[str, Any] = field(default_factory=dict)


def _eval(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    return _randomize_(model, seed).eval().requires_grad_(False)


def _dinov2_transformers(folder: Path, *, registers: bool = False, name: str = "",
                         img_size: int = 224) -> _Reference:
    """transformers ``Dinov2Model`` (or with registers), saved with ``save_pretrained``."""
    from transformers import (
        Dinov2Config,
        Dinov2Model,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
    )

    if registers:
        model: Any = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(
            **_TINY, patch_size=14, image_size=img_size, num_register_tokens=4))
    else:
        model = Dinov2Model(Dinov2Config(**_TINY, patch_size=14, image_size=img_size))
    _eval(model, 10).save_pretrained(folder)
    default = "raptorz_tiny_dinov2_reg" if registers else "raptorz_tiny_dinov2"
    return _Reference(name or default, folder, "transformers",
                      lambda x: model(pixel_values=x).last_hidden_state)


def _dinov3_transformers(folder: Path, *, gated: bool = False) -> _Reference:
    """transformers ``DINOv3ViTModel`` with zero query / value biases, as Meta's releases.

    ``gated``: the SwiGLU MLP of DINOv3 ViT-H+, tested as ``dinov3-h+`` cut to tiny size.
    """
    import torch
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    mlp = {"use_gated_mlp": True, "hidden_act": "silu"} if gated else {}
    model: Any = _eval(DINOv3ViTModel(DINOv3ViTConfig(
        **_TINY, patch_size=16, image_size=224, num_register_tokens=4, **mlp)), 11)
    with torch.no_grad():
        for key, value in model.named_parameters():
            if key.endswith(("q_proj.bias", "v_proj.bias")):
                value.zero_()
    model.save_pretrained(folder)
    return _Reference("dinov3-h+" if gated else "raptorz_tiny_dinov3", folder, "transformers",
                      lambda x: model(pixel_values=x).last_hidden_state,
                      {"depth": 2, "embed_dim": 64, "num_heads": 2} if gated else {})


def _clip_transformers(folder: Path, *, llava: bool = False) -> _Reference:
    """transformers ``CLIPVisionModel`` (QuickGELU, as OpenAI's); LLaVA's penultimate layer."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    layers = 3 if llava else 2
    model: Any = _eval(CLIPVisionModel(CLIPVisionConfig(
        **{**_TINY, "num_hidden_layers": layers}, patch_size=14, image_size=336 if llava else 224,
        hidden_act="quick_gelu", layer_norm_eps=1e-5)), 12)
    model.save_pretrained(folder)
    if llava:
        return _Reference("raptorz_tiny_llava", folder, "transformers",
                          lambda x: model(pixel_values=x, output_hidden_states=True)
                          .hidden_states[-2])
    # transformers' last_hidden_state stops before post_layernorm, timm's tokens after it
    post_layernorm = getattr(model, "vision_model", model).post_layernorm
    return _Reference("raptorz_tiny_clip", folder, "transformers",
                      lambda x: post_layernorm(model(pixel_values=x).last_hidden_state))


def _clip_openai(folder: Path) -> _Reference:
    """An open_clip CLIP (OpenAI's layout, ``visual.*``); its patch tokens after ``ln_post``."""
    import torch
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    model: Any = _eval(CLIP(
        embed_dim=32, quick_gelu=True,
        vision_cfg=CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=14,
                                 image_size=224),
        text_cfg=CLIPTextCfg(context_length=8, vocab_size=50, width=32, heads=2, layers=1)), 13)
    path = folder / "open_clip_pytorch_model.bin"
    torch.save(model.state_dict(), path)
    model.visual.output_tokens = True
    # open_clip returns the pooled (CLS) token projected, so compare the patch tokens
    return _Reference("raptorz_tiny_clip", path, "openai", lambda x: model.visual(x)[1])


def _sam_segment_anything(path: Path, *, name: str = "raptorz_tiny_sam") -> _Reference:
    """A whole ``segment_anything`` Sam (prompt encoder, mask decoder), as its checkpoints."""
    import torch
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    encoder = ImageEncoderViT(
        img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4,
        out_chans=16, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        use_rel_pos=True, window_size=2, global_attn_indexes=(1,))
    sam: Any = _eval(Sam(
        image_encoder=encoder,
        prompt_encoder=PromptEncoder(embed_dim=16, image_embedding_size=(4, 4),
                                     input_image_size=(64, 64), mask_in_chans=4),
        mask_decoder=MaskDecoder(transformer_dim=16, transformer=TwoWayTransformer(
            depth=1, embedding_dim=16, mlp_dim=32, num_heads=2), num_multimask_outputs=3,
            iou_head_depth=1, iou_head_hidden_dim=16)), 14)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sam.state_dict(), path)
    overrides = {} if name == "raptorz_tiny_sam" else {
        "img_size": 64, "depth": 2, "embed_dim": 32, "num_heads": 2, "window_size": 2,
        "global_attn_indexes": (1,), "neck_chans": 16}
    return _Reference(name, path, "segment_anything",
                      lambda x: sam.image_encoder(x).flatten(2).transpose(1, 2), overrides)


def _biomedclip_open_clip(folder: Path) -> _Reference:
    """An open_clip CLIP with a timm ViT/16 trunk, as BiomedCLIP is, saved like the hub's."""
    import timm
    import torch
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    trunk_name = "raptorz_test_vit_tiny_patch16"
    if trunk_name not in timm.list_models():
        _register_tiny_trunk(trunk_name)
    model: Any = _eval(CLIP(
        embed_dim=32,
        vision_cfg=CLIPVisionCfg(timm_model_name=trunk_name, timm_pool="", timm_proj="linear",
                                 image_size=224),
        text_cfg=CLIPTextCfg(context_length=8, vocab_size=50, width=32, heads=2, layers=1)), 15)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "open_clip_pytorch_model.bin"
    torch.save(model.state_dict(), path)
    return _Reference("raptorz_tiny_biomedclip", folder, "open_clip",
                      lambda x: model.visual.trunk.forward_features(x))


def _register_tiny_trunk(name: str) -> None:
    """A timm model ``name``: BiomedCLIP's ``vit_base_patch16_224`` cut to 2 blocks of 64."""
    from timm.models import register_model
    from timm.models.vision_transformer import _create_vision_transformer

    def tiny(pretrained: bool = False, **kwargs: Any) -> Any:
        return _create_vision_transformer("vit_base_patch16_224", pretrained=pretrained,
                                          **{"patch_size": 16, "embed_dim": 64, "depth": 2,
                                             "num_heads": 2, **kwargs})

    tiny.__name__ = name
    register_model(tiny)


#: Each encoder family with an independent reference, and how its reference is built in a
#: folder: the encoder test compares all of them, the CLI test runs some end to end.
_REFERENCES: dict[str, Callable[[Path], _Reference]] = {
    "dinov2": lambda p: _dinov2_transformers(p),
    "dinov2-reg": lambda p: _dinov2_transformers(p, registers=True),
    # as facebook/dinov2-* ship: trained at 518 px, run at 224 (the position embedding
    # resampled as transformers and DINOv2 do it, bicubic without antialiasing)
    "dinov2-518": lambda p: _dinov2_transformers(p, img_size=518),
    "dinov2-reg-518": lambda p: _dinov2_transformers(p, registers=True, img_size=518),
    "rad-dino": lambda p: _dinov2_transformers(p, name="rad-dino", img_size=518),
    "dinov3": _dinov3_transformers,
    "dinov3-h+": lambda p: _dinov3_transformers(p, gated=True),
    "clip": lambda p: _clip_transformers(p),
    "clip-openai": _clip_openai,
    "llava-med": lambda p: _clip_transformers(p, llava=True),
    "sam": lambda p: _sam_segment_anything(p / "sam_vit_tiny.pth"),
    "medsam": lambda p: _sam_segment_anything(p / "medsam_vit_b.pth", name="medsam"),
    "biomedclip": _biomedclip_open_clip,
}


@pytest.fixture(scope="session")
def reference_builders() -> dict[str, Callable[[Path], _Reference]]:
    """Family name -> ``build(folder)``: that family's reference model, saved in ``folder`` the
    way users hold it (``.name``, ``.path``, ``.layout``, ``.tokens(images)``, ``.overrides``).
    """
    return _REFERENCES


@pytest.fixture(params=list(_REFERENCES))
def reference_family(request: pytest.FixtureRequest) -> str:
    """Each family of :func:`reference_builders` in turn (a test taking it runs once each)."""
    return request.param


@pytest.fixture(scope="session")
def dinov2_transformers() -> Callable[..., _Reference]:
    """``dinov2_transformers(folder, *, registers=False, name="", img_size=224)``: a tiny
    transformers ``Dinov2Model`` (or with registers), saved with ``save_pretrained``."""
    return _dinov2_transformers


@pytest.fixture(scope="session")
def dinov3_transformers() -> Callable[..., _Reference]:
    """``dinov3_transformers(folder, *, gated=False)``: a tiny transformers ``DINOv3ViTModel``
    with zero query / value biases (``gated``: SwiGLU, as ViT-H+)."""
    return _dinov3_transformers


@pytest.fixture(scope="session")
def clip_transformers() -> Callable[..., _Reference]:
    """``clip_transformers(folder, *, llava=False)``: a tiny transformers ``CLIPVisionModel``
    (``llava``: 3 blocks at 336 px, LLaVA's penultimate layer)."""
    return _clip_transformers


@pytest.fixture(scope="session")
def sam_segment_anything() -> Callable[..., _Reference]:
    """``sam_segment_anything(path, *, name="raptorz_tiny_sam")``: a whole tiny
    ``segment_anything`` Sam saved as its checkpoints are."""
    return _sam_segment_anything


@pytest.fixture(scope="session")
def biomedclip_open_clip() -> Callable[..., _Reference]:
    """``biomedclip_open_clip(folder)``: a tiny open_clip CLIP with a timm ViT/16 trunk, saved
    like BiomedCLIP on the hub."""
    return _biomedclip_open_clip


# --- Small real runs of convert and embed (the store tests) ------------------------------
# Embedding runs use a real LocalCluster of threads in the test process (processes=False)
# so that a test can stop a task at a chosen point of its writes.

_RUN_SETTINGS = KernelSettings(keep_tokens=True, batch_size=32)
_RUN_PROJECTORS = [create_projector(0, 64, 4, "p4")]
#: Float32 encoder, float64 pooling; a recomputed volume may be batched differently.
_RUN_TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


def _volume_sources(folder: Path, count: int, *, bad: bool = False) -> list[Path]:
    """An npz of ``count`` 8^3 volumes, and a corrupt NIfTI after it where ``bad``."""
    folder.mkdir(parents=True, exist_ok=True)
    _write_npz(folder / "m.npz", {"train": count}, side=8, seed=count)
    sources = [folder / "m.npz"]
    if bad:
        (folder / "bad.nii.gz").write_bytes(b"not a nifti")
        sources.append(folder / "bad.nii.gz")
    return sources


def _converted(folder: Path, count: int, chunk: int) -> Path:
    """A volumes store of ``count`` volumes, ``chunk`` per chunk."""
    from raptorz.ingest.volumes import convert

    store = folder / "volumes.zarr"
    convert(_volume_sources(folder / "src", count), store, chunk=chunk, workers=1)
    return store


@contextmanager
def _thread_client() -> Iterator[Client]:
    """A one-worker LocalCluster of threads in this process."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        yield client


def _embed_tiny(volumes: Path, output: Path, client: Client, vit: tuple[str, Path],
                **options: object) -> EmbedSummary:
    """``embed`` with the tiny ViT and :data:`_RUN_PROJECTORS` on ``client``."""
    from raptorz.embedding.runner import embed

    options = {"settings": _RUN_SETTINGS, **options}
    return embed(volumes, output, _RUN_PROJECTORS, encoder=vit[0], weights=vit[1],
                 cluster=client, torch_threads=1, progress=False,
                 **options)  # type: ignore[arg-type]


def _chunk_files(store: Path) -> dict[str, tuple[int, bytes]]:
    """Every chunk file of a store: relative path -> (modification time in ns, bytes)."""
    return {str(p.relative_to(store)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in store.rglob("*") if p.is_file() and "/c/" in f"/{p.relative_to(store)}"}


def _changed_chunks(before: dict[str, tuple[int, bytes]], store: Path) -> set[int]:
    """The ``id``-chunk indices of the chunk files written (or removed) since ``before``."""
    after = _chunk_files(store)
    changed = {key for key in before.keys() | after.keys() if before.get(key) != after.get(key)}
    return {int(key.split("/c/")[1].split("/")[0]) for key in changed}


def _tear(path: Path, how: str) -> None:
    """Leave ``path`` as a kill during a non-atomic write can: half written, or empty."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncated" else b"")
    assert path.stat().st_size < len(data) or not data
    os.utime(path)


@pytest.fixture(scope="session")
def volume_sources() -> Callable[..., list[Path]]:
    """``volume_sources(folder, count, *, bad=False) -> sources``: an npz of ``count`` 8^3
    volumes in ``folder``, and a corrupt NIfTI after it where ``bad``."""
    return _volume_sources


@pytest.fixture(scope="session")
def converted() -> Callable[[Path, int, int], Path]:
    """``converted(folder, count, chunk) -> store``: a volumes store of ``count`` volumes,
    ``chunk`` per chunk, converted in ``folder``."""
    return _converted


@pytest.fixture(scope="session")
def thread_client() -> Callable[[], AbstractContextManager[Client]]:
    """``with thread_client() as client``: a one-worker LocalCluster of threads in this
    process (a test can stop a task at a chosen point of its writes)."""
    return _thread_client


@pytest.fixture(scope="session")
def embed_tiny() -> Callable[..., EmbedSummary]:
    """``embed_tiny(volumes, output, client, vit, **options)``: ``embed`` with the tiny ViT
    ``vit`` (``tiny_vit_weights``) and :func:`run_projectors` on ``client``."""
    return _embed_tiny


@pytest.fixture(scope="session")
def run_projectors() -> list[Projector]:
    """The projectors of :func:`embed_tiny`'s runs: one, ``p4`` (seed 0, d = 64, k = 4)."""
    return _RUN_PROJECTORS


@pytest.fixture(scope="session")
def run_tolerance() -> dict[str, float]:
    """``assert_allclose`` options for a recomputed embedding: float32 encoder, float64
    pooling, and a recomputed volume may be batched differently."""
    return _RUN_TOLERANCE


@pytest.fixture(scope="session")
def chunk_files() -> Callable[[Path], dict[str, tuple[int, bytes]]]:
    """``chunk_files(store)``: every chunk file of a store, relative path -> (modification
    time in ns, bytes)."""
    return _chunk_files


@pytest.fixture(scope="session")
def changed_chunks() -> Callable[[dict[str, tuple[int, bytes]], Path], set[int]]:
    """``changed_chunks(before, store)``: the ``id``-chunk indices of the chunk files written
    (or removed) since ``before = chunk_files(store)``."""
    return _changed_chunks


@pytest.fixture(scope="session")
def tear() -> Callable[[Path, str], None]:
    """``tear(path, how)``: leave ``path`` as a kill during a non-atomic write can, half
    written (``how="truncated"``) or empty."""
    return _tear


# --- A real Dask cluster -----------------------------------------------------------------


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    """A real LocalCluster of 2 worker processes with 2 threads each (one per test module:
    the workers keep their loaded encoders between the module's tests, as in a run).

    Not the default client: a test that wants the active-client path makes its own.
    """
    from distributed import Client

    from raptorz.cluster import create_cluster

    with create_cluster("local", workers=2, threads_per_worker=2, dashboard_address=":0") \
            as cluster, Client(cluster, set_as_default=False) as client:
        yield client
