"""RandAugment (Cubuk et al. 2020) on uint8 numpy images, with timm's op set and magnitude noise.

`RandAugment(num_ops=2, magnitude=9, magnitude_std=0.5)` is timm's `rand-m9-mstd0.5` (the MAE
fine-tuning recipe): each of `num_ops` ops drawn uniformly is applied with probability 1/2 at a
magnitude drawn from N(magnitude, std) clipped to [0, 10]. Geometric ops fill with grey (128).
A mask, when present, follows the geometric ops (nearest neighbour) and ignores colour ops.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

_FILL = (128, 128, 128)
MAX_LEVEL = 10.0


def _signed(rng, value):
  return value if rng.random() < 0.5 else -value


def _affine(img: Image.Image, matrix, resample, fill):
  return img.transform(img.size, Image.AFFINE, matrix, resample=resample, fillcolor=fill)


# Geometric ops: (image, level, rng) -> the affine matrix or angle applied to image and mask.
def _shear_x(size, m, rng):
  return ("affine", (1, _signed(rng, 0.3 * m), 0, 0, 1, 0))


def _shear_y(size, m, rng):
  return ("affine", (1, 0, 0, _signed(rng, 0.3 * m), 1, 0))


def _translate_x(size, m, rng):
  return ("affine", (1, 0, _signed(rng, 0.45 * m * size[0]), 0, 1, 0))


def _translate_y(size, m, rng):
  return ("affine", (1, 0, 0, 0, 1, _signed(rng, 0.45 * m * size[1])))


def _rotate(size, m, rng):
  return ("rotate", _signed(rng, 30.0 * m))


GEOMETRIC = {"ShearX": _shear_x, "ShearY": _shear_y, "TranslateXRel": _translate_x,
             "TranslateYRel": _translate_y, "Rotate": _rotate}


def _enhance(cls):
  return lambda img, m, rng: cls(img).enhance(1.0 + _signed(rng, 0.9 * m))


def _solarize_add(img, m, rng):
  arr = np.asarray(img).astype(np.int32)
  added = np.clip(arr + int(110 * m), 0, 255).astype(np.uint8)
  return Image.fromarray(np.where(arr < 128, added, arr.astype(np.uint8)))


# Colour ops: (image, level in [0, 1], rng) -> image.
COLOUR = {
    "AutoContrast": lambda img, m, rng: ImageOps.autocontrast(img),
    "Equalize": lambda img, m, rng: ImageOps.equalize(img),
    "Invert": lambda img, m, rng: ImageOps.invert(img),
    "Posterize": lambda img, m, rng: ImageOps.posterize(img, max(1, int(4 * m))),
    "Solarize": lambda img, m, rng: ImageOps.solarize(img, int(256 * m)),
    "SolarizeAdd": _solarize_add,
    "Color": _enhance(ImageEnhance.Color),
    "Contrast": _enhance(ImageEnhance.Contrast),
    "Brightness": _enhance(ImageEnhance.Brightness),
    "Sharpness": _enhance(ImageEnhance.Sharpness),
}
OPS = tuple(COLOUR) + tuple(GEOMETRIC)


class RandAugment:
  """A grain `random_map` transform: example dict -> example dict."""
  random = True

  def __init__(self, num_ops: int = 2, magnitude: float = 9.0, magnitude_std: float = 0.5,
               prob: float = 0.5):
    self.num_ops, self.magnitude, self.magnitude_std, self.prob = (
        num_ops, magnitude, magnitude_std, prob)

  def __call__(self, example: dict, rng: np.random.Generator) -> dict:
    image = Image.fromarray(example["image"])
    mask = Image.fromarray(example["mask"]) if "mask" in example else None
    for name in rng.choice(OPS, self.num_ops):
      if rng.random() >= self.prob:
        continue
      level = self.magnitude + (rng.normal(0, self.magnitude_std) if self.magnitude_std else 0)
      m = float(np.clip(level, 0, MAX_LEVEL)) / MAX_LEVEL
      if name in COLOUR:
        image = COLOUR[name](image, m, rng)
        continue
      kind, arg = GEOMETRIC[name](image.size, m, rng)
      if kind == "rotate":
        image = image.rotate(arg, Image.BILINEAR, fillcolor=_FILL)
        mask = mask.rotate(arg, Image.NEAREST, fillcolor=255) if mask is not None else None
      else:
        image = _affine(image, arg, Image.BILINEAR, _FILL)
        mask = _affine(mask, arg, Image.NEAREST, 255) if mask is not None else None
    out = dict(example)
    out["image"] = np.asarray(image)
    if mask is not None:
      out["mask"] = np.asarray(mask)
    return out
