"""Writers of small, seeded volume files in every format ``raptorz convert`` reads."""

from __future__ import annotations

import gzip
import io
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

#: An oblique affine: array axis 0 runs to posterior (2 mm), axis 1 to superior (3 mm),
#: axis 2 to left (1 mm), all rotated 10 degrees about z. Its closest canonical order is
#: (axis 2 flipped, axis 0 flipped, axis 1).
_ANGLE = np.deg2rad(10)
_ROTATION = np.array([[np.cos(_ANGLE), -np.sin(_ANGLE), 0],
                      [np.sin(_ANGLE), np.cos(_ANGLE), 0], [0, 0, 1]])
OBLIQUE = np.eye(4)
OBLIQUE[:3, :3] = _ROTATION @ np.array([[0, 0, -1], [-2, 0, 0], [0, 3, 0]], float)
OBLIQUE[:3, 3] = [10, -20, 5]
#: The spacing of a volume with affine ``OBLIQUE`` once in RAS order.
OBLIQUE_RAS_SPACING = (1.0, 2.0, 3.0)


def to_ras(data: np.ndarray) -> np.ndarray:
    """What an array with affine ``OBLIQUE`` looks like in RAS order, written by hand."""
    return np.transpose(data, (2, 0, 1))[::-1, ::-1, :]


def volume(shape: tuple[int, ...] = (6, 7, 5), seed: int = 0, dtype: str = "int16") -> np.ndarray:
    """An asymmetric random volume (no two voxels alike for int16)."""
    rng = np.random.default_rng(seed)
    values = rng.permutation(np.prod(shape)).reshape(shape)
    return values.astype(dtype)


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray = OBLIQUE) -> Path:
    """A NIfTI (``.nii`` or ``.nii.gz``, by ``path``'s ending)."""
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def write_itk(path: Path, data: np.ndarray, affine: np.ndarray = OBLIQUE, *,
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


def write_nibabel(path: Path, data: np.ndarray, affine: np.ndarray = OBLIQUE) -> Path:
    """An MGH/MGZ or Analyze (``.hdr`` + ``.img``) file, by ``path``'s ending."""
    kind = nib.MGHImage if path.suffix in (".mgh", ".mgz") else nib.AnalyzeImage
    nib.save(kind(data, affine), path)
    return path


def nifti_bytes(data: np.ndarray, affine: np.ndarray = OBLIQUE) -> bytes:
    """A ``.nii.gz`` file's bytes."""
    return gzip.compress(nib.Nifti1Image(data, affine).to_bytes())


def write_ukb_zip(path: Path, data: np.ndarray | None,
                  member: str = "T1/T1_brain.nii.gz") -> Path:
    """A UK Biobank-style zip holding ``data`` as ``member`` among other members."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("T1/T1.json", "{}")
        if data is not None:
            archive.writestr(member, nifti_bytes(data))
    return path


def write_npz(path: Path, sizes: dict[str, int], side: int = 8, seed: int = 0) -> dict:
    """A MedMNIST-style npz (uint8 images, (N, 1) labels); returns its arrays."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in sizes.items():
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, side, side, side), np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, (n, 1))
    np.savez_compressed(path, **arrays)
    return arrays


def write_dicom_series(folder: Path, data: np.ndarray, *, slope: float = 2.0,
                       intercept: float = -100.0, step: float = 2.5, seed: int = 0,
                       series: str | None = None, names: str = "slice",
                       number: int | None = None, description: str | None = None,
                       image_type: tuple[str, ...] = ()) -> Path:
    """A single-frame DICOM series of ``data`` (columns, rows, slices) in shuffled files.

    Axial slices (patient LPS axes), pixel spacing 0.5 (rows) x 0.8 (columns) mm, slice
    ``k`` at z = ``k * step``; stored values are ``(data - intercept) / slope``. The
    series number, description and image type are written where given.
    """
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


def zip_bomb(path: Path, size: int) -> Path:
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


def write_multiframe(path: Path, data: np.ndarray, *, step: float = 1.5, seed: int = 0) -> Path:
    """An enhanced multi-frame DICOM of ``data`` (columns, rows, frames), frames shuffled.

    Geometry and rescaling live in the functional groups: orientation, pixel spacing
    (0.7 x 0.9 mm) and rescale (slope 0.5, intercept 3) shared, positions per frame
    along a sagittal normal (patient x).
    """
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
