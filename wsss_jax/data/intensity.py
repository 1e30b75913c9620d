"""From the pixels a file holds to the model's 8-bit RGB input: one named rule, recorded in the
run's config (`data.intensity`) and applied the same way by every phase and by predict.

Files: PNG / JPEG (Pillow; 8- or 16-bit grey, RGB, RGBA), TIFF incl. OME-TIFF (tifffile; any
integer or float type, channels first or last, the first series' full resolution) and DICOM
(`wsss_jax.data.dicom`: modality LUT applied, its VOI window and MONOCHROME1 kept for the rule).

Rules (`data.intensity=`):
  auto              8-bit files as they are; a DICOM's own window (WindowCenter / Width) where it
                    has one; anything else per image between its 0.5th and 99.5th percentiles
  percentile:a,b    per image, the a-th and b-th percentiles of its values -> 0 and 255
  window:lo,hi      fixed raw values lo and hi -> 0 and 255 (a CT-like window, a camera's range)
  full_range        the type's range (uint16: 0..65535) -> 0..255; float images 0..1
One or two channels are grey (shown on all three inputs; a second, alpha, channel is dropped),
four are RGBA (alpha dropped); a MONOCHROME1 DICOM is inverted after windowing (bright = dense).
"""
from __future__ import annotations

import dataclasses
import os
from typing import NamedTuple

import numpy as np
import tifffile
from PIL import Image

from wsss_jax.errors import UserError

KINDS = ("auto", "percentile", "window", "full_range")
AUTO_PERCENTILES = (0.5, 99.5)
DICOM_EXTENSIONS = (".dcm", ".dicom")
_TIFF = (".tif", ".tiff")


@dataclasses.dataclass(frozen=True)
class IntensityRule:
  kind: str = "auto"
  low: float = AUTO_PERCENTILES[0]    # percentile or raw value mapped to 0
  high: float = AUTO_PERCENTILES[1]   # ... to 255

  def __str__(self) -> str:
    if self.kind in ("percentile", "window"):
      return f"{self.kind}:{self.low:g},{self.high:g}"
    return self.kind


def parse_rule(text: str, field: str = "data.intensity") -> IntensityRule:
  """'auto' | 'percentile:a,b' | 'window:lo,hi' | 'full_range' -> IntensityRule (one line if
  not)."""
  kind, _, numbers = str(text).partition(":")
  if kind not in KINDS:
    raise UserError(f"{field}={text!r}: the rule is one of {KINDS} (e.g. percentile:1,99 or "
                    f"window:0,4095; in a config file's argument percentile:1/99)")
  if kind in ("auto", "full_range"):
    if numbers:
      raise UserError(f"{field}={text!r}: {kind} takes no numbers")
    return IntensityRule(kind)
  try:
    # "," on the command line (--config.data.intensity=), "/" inside a config file's argument
    low, high = (float(v) for v in numbers.replace("/", ",").split(","))
  except ValueError:
    raise UserError(f"{field}={text!r}: give two numbers, e.g. {kind}:1,99") from None
  if not low < high or (kind == "percentile" and not 0 <= low < high <= 100):
    raise UserError(f"{field}={text!r}: needs low < high" +
                    (" within [0, 100]" if kind == "percentile" else ""))
  return IntensityRule(kind, low, high)


class Raw(NamedTuple):
  """A file's pixels before the rule: (H, W) or (H, W, C) in the file's type."""
  pixels: np.ndarray
  window: tuple | None = None        # a DICOM's own VOI window (lo, hi), in rescaled units
  invert: bool = False               # MONOCHROME1: low values are bright
  pixel_size_um: tuple | None = None  # (row, column) spacing in micrometres, if recorded


def _channels_first(shape: tuple, path: str) -> bool:
  """Whether a squeezed shape is OME-TIFF's (C, H, W); refuses what is not one plane of 1-4
  channels (z or time stacks, many channels) in one line."""
  if len(shape) == 3 and shape[0] <= 4 < min(shape[1:]):
    return True
  if len(shape) == 2 or (len(shape) == 3 and shape[-1] <= 4):
    return False
  raise UserError(f"image {path} has shape {tuple(shape)}: one plane of 1-4 channels is read "
                  f"(a z-stack or many channels: save the plane to segment)")


def plane_shape(shape: tuple, path: str) -> tuple[int, int]:
  """(H, W) of an array of `shape` as `channels_last` reads it."""
  shape = tuple(d for d in shape if d != 1)
  return tuple(shape[1:3]) if _channels_first(shape, path) else tuple(shape[:2])


def channels_last(pixels: np.ndarray, path: str) -> np.ndarray:
  """(H, W) or (H, W, C<=4): OME-TIFF's channels-first (C, H, W) turned round."""
  pixels = np.squeeze(pixels)
  return np.moveaxis(pixels, 0, -1) if _channels_first(pixels.shape, path) else pixels


def read_raw(path: str) -> Raw:
  """The file's pixels and what the rule needs from it (one line naming the file if not)."""
  ext = os.path.splitext(path)[1].lower()
  if not os.path.isfile(path):
    raise UserError(f"image {path} is missing")
  if ext in DICOM_EXTENSIONS:
    from wsss_jax.data import dicom  # pydicom, an optional extra: only for DICOM files
    return dicom.read(path)
  try:
    if ext in _TIFF:
      with tifffile.TiffFile(path) as tif:
        pixels = tif.series[0].levels[0].asarray()
        size = tiff_pixel_size_um(tif)
      return Raw(channels_last(pixels, path), pixel_size_um=size)
    with Image.open(path) as image:
      if image.mode in ("P", "CMYK", "YCbCr", "HSV", "LAB", "1"):
        image = image.convert("L" if image.mode == "1" else "RGB")
      return Raw(channels_last(np.asarray(image), path))
  except UserError:
    raise
  except (OSError, SyntaxError, ValueError, tifffile.TiffFileError) as e:
    raise UserError(f"image {path} cannot be decoded ({str(e).splitlines()[0][:160]}); it is "
                    f"truncated or not an image") from None


def image_shape(path: str) -> tuple[int, int] | None:
  """(H, W) from the file's header, not decoded; None when it cannot be read."""
  ext = os.path.splitext(path)[1].lower()
  try:
    if ext in DICOM_EXTENSIONS:
      from wsss_jax.data import dicom
      ds = dicom.open_dataset(path, pixels=False)
      return int(ds.Rows), int(ds.Columns)
    if ext in _TIFF:
      with tifffile.TiffFile(path) as tif:
        return plane_shape(tif.series[0].levels[0].shape, path)
    with Image.open(path) as image:
      return image.size[1], image.size[0]
  except (OSError, SyntaxError, ValueError, UserError, AttributeError,
          tifffile.TiffFileError):
    return None


def tiff_pixel_size_um(tif: "tifffile.TiffFile") -> tuple | None:
  """(row, column) pixel size in micrometres from OME-XML (PhysicalSizeY / X) or the TIFF
  resolution tags (centimetre or inch units); None where the file does not say."""
  if tif.is_ome and tif.ome_metadata:
    meta = tifffile.xml2dict(tif.ome_metadata).get("OME", {}).get("Image", {})
    pixels = (meta[0] if isinstance(meta, list) else meta).get("Pixels", {})
    x, y = pixels.get("PhysicalSizeX"), pixels.get("PhysicalSizeY", pixels.get("PhysicalSizeX"))
    unit = pixels.get("PhysicalSizeXUnit", "µm")
    scale = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3}.get(unit)
    if x and scale:
      return (float(y) * scale, float(x) * scale)
  tags = tif.pages[0].tags
  unit = tags.get("ResolutionUnit")
  per = {2: 25400.0, 3: 10000.0}.get(int(unit.value) if unit else 0)  # inch, centimetre in um
  xres, yres = tags.get("XResolution"), tags.get("YResolution")
  if per and xres and yres:
    (xn, xd), (yn, yd) = xres.value, yres.value
    if xn and yn:
      return (per * yd / yn, per * xd / xn)
  return None


def window_of(raw: Raw, rule: IntensityRule) -> tuple[float, float] | None:
  """The raw values mapped to 0 and 255 (None: an 8-bit image kept as it is)."""
  pixels = raw.pixels
  if rule.kind == "window":
    return rule.low, rule.high
  if rule.kind == "full_range":
    if np.issubdtype(pixels.dtype, np.integer):
      info = np.iinfo(pixels.dtype)
      return float(info.min), float(info.max)
    return 0.0, 1.0
  if rule.kind == "auto":
    if raw.window is not None:
      return raw.window
    if pixels.dtype == np.uint8:
      return None
  grey = pixels[..., :3] if pixels.ndim == 3 else pixels
  low, high = np.percentile(grey, (rule.low, rule.high))
  return float(low), float(max(high, low + 1e-6))


def to_rgb8(raw: Raw, rule: IntensityRule, window: tuple | None = None) -> np.ndarray:
  """(H, W, 3) uint8 by the rule (or by `window`, a slide's, computed once for all regions)."""
  pixels = raw.pixels
  if pixels.ndim == 3:
    pixels = pixels[..., :1] if pixels.shape[-1] <= 2 else pixels[..., :3]
  else:
    pixels = pixels[..., None]
  window = window if window is not None else window_of(raw, rule)
  if window is None:
    out = pixels.astype(np.uint8)
  else:
    low, high = window
    scaled = (pixels.astype(np.float32) - low) * (255.0 / (high - low))
    out = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
  if raw.invert:
    out = 255 - out
  return np.ascontiguousarray(np.broadcast_to(out, out.shape[:2] + (3,)))


def read_rgb8(path: str, rule: IntensityRule = IntensityRule()) -> np.ndarray:
  return to_rgb8(read_raw(path), rule)
