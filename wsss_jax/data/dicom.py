"""DICOM in and out, with pydicom (reading) and highdicom (the Segmentation object predict writes).

Reading (`read`): the stored values through the modality LUT (Rescale Slope / Intercept), the
file's own VOI window (the first Window Center / Width, as the standard's linear function) or VOI
LUT kept for `data.intensity=auto`, MONOCHROME1 marked for inversion after windowing, colour
(RGB / YBR) as RGB, a multi-frame file (ultrasound cine) as its `frame`-th frame, and the pixel
spacing in micrometres (Pixel Spacing, else Imager Pixel Spacing, else an ultrasound region's
physical delta). A compressed transfer syntax whose decoder is not installed is one line naming
the file and the packages to install.

Writing (`write_segmentation`): a DICOM Segmentation (binary, one segment per class present)
that references its source image, so that 3D Slicer or OHIF shows it over the image.
"""
from __future__ import annotations

import numpy as np

from wsss_jax.data.intensity import Raw
from wsss_jax.errors import UserError

DECODERS = "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg (or python-gdcm)"


def _pydicom():
  try:
    import pydicom
  except ImportError:
    raise UserError("DICOM files need pydicom: pip install -e '.[dicom]'") from None
  return pydicom


def open_dataset(path: str, pixels: bool = True):
  """The parsed file (one line naming it when it is not DICOM)."""
  pydicom = _pydicom()
  try:
    return pydicom.dcmread(path, stop_before_pixels=not pixels)
  except (pydicom.errors.InvalidDicomError, OSError, ValueError, EOFError) as e:
    raise UserError(f"DICOM {path} cannot be read ({str(e).splitlines()[0][:160]})") from None


def num_frames(ds) -> int:
  return int(getattr(ds, "NumberOfFrames", 1) or 1)


def read(path: str, frame: int = 0) -> Raw:
  ds = open_dataset(path)
  if "PixelData" not in ds:
    raise UserError(f"DICOM {path} holds no image (no Pixel Data: a report or structured "
                    f"document)")
  try:
    pixels = ds.pixel_array
  except Exception as e:  # noqa: BLE001 - pydicom raises several types for a missing decoder
    syntax = ds.file_meta.get("TransferSyntaxUID", "unknown")
    raise UserError(f"DICOM {path} cannot be decoded ({getattr(syntax, 'name', syntax)}: "
                    f"{str(e).splitlines()[0][:120]}); {DECODERS}") from None
  frames = num_frames(ds)
  if frames > 1:
    if not 0 <= frame < frames:
      raise UserError(f"DICOM {path} has {frames} frames; frame {frame} does not exist")
    pixels = pixels[frame]
  if int(getattr(ds, "SamplesPerPixel", 1)) == 1:
    return _grey(ds, pixels, path)
  return Raw(pixels, pixel_size_um=pixel_size_um(ds))


def _grey(ds, pixels: np.ndarray, path: str) -> Raw:
  """Modality LUT applied; the file's window; MONOCHROME1 marked."""
  from pydicom.pixels import apply_modality_lut, apply_voi_lut
  values = np.asarray(apply_modality_lut(pixels, ds), np.float32)
  window = None
  if "WindowCenter" in ds and "WindowWidth" in ds:
    center, width = _first(ds.WindowCenter), max(_first(ds.WindowWidth), 1.0)
    window = (center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2)  # PS3.3 C.11.2.1.2
  elif "VOILUTSequence" in ds:  # a lookup table instead of a window: its output, full range
    values = np.asarray(apply_voi_lut(pixels, ds), np.float32)
    window = (float(values.min()), float(max(values.max(), values.min() + 1)))
  invert = str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1"
  return Raw(values, window=window, invert=invert, pixel_size_um=pixel_size_um(ds))


def _first(value) -> float:
  """A possibly multi-valued attribute's first value (several windows: the first is the default)."""
  return float(value[0] if hasattr(value, "__getitem__") and not isinstance(value, str)
               else value)


def pixel_size_um(ds) -> tuple | None:
  """(row, column) spacing in micrometres, from the attributes that record it."""
  for name in ("PixelSpacing", "ImagerPixelSpacing"):
    if name in ds and ds[name].value:
      row, col = (float(v) for v in ds[name].value[:2])
      return (row * 1000.0, col * 1000.0)
  for region in getattr(ds, "SequenceOfUltrasoundRegions", []) or []:
    # units 3 = centimetres (PS3.3 C.8.5.5.1.15)
    if getattr(region, "PhysicalUnitsXDirection", None) == 3 and getattr(
        region, "PhysicalUnitsYDirection", None) == 3:
      return (float(region.PhysicalDeltaY) * 1e4, float(region.PhysicalDeltaX) * 1e4)
  return None


def write_segmentation(source_path: str, mask: np.ndarray, names: list, background: int,
                       out_path: str, frame: int = 0) -> int:
  """A binary DICOM Segmentation of `mask` ((H, W) class indices at the image's size; index
  `background` is not a segment) over the source image; returns the number of segments."""
  import highdicom as hd
  from pydicom.sr.codedict import codes
  source = open_dataset(source_path)
  present = [k for k in range(len(names)) if k != background and (mask == k).any()]
  if not present:
    return 0
  frames = num_frames(source)
  planes = np.zeros((frames,) + mask.shape + (len(present),), bool)
  for j, k in enumerate(present):
    planes[frame, ..., j] = mask == k
  descriptions = [hd.seg.SegmentDescription(
      segment_number=j + 1, segment_label=str(names[k]),
      segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
      segmented_property_type=codes.SCT.Lesion,
      algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
      algorithm_identification=hd.AlgorithmIdentificationSequence(
          name="wsss_jax", version="0.1", family=codes.DCM.ArtificialIntelligence))
      for j, k in enumerate(present)]
  seg = hd.seg.Segmentation(
      source_images=[source], pixel_array=planes,
      segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
      segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=900,
      sop_instance_uid=hd.UID(), instance_number=1, manufacturer="wsss_jax",
      manufacturer_model_name="wsss_jax segmenter", software_versions="0.1",
      device_serial_number="0", omit_empty_frames=False)
  seg.save_as(out_path)
  return len(present)
