"""Readers for the public WSSS histology releases laid out as folders of PNG tiles.

LUAD-HistoSeg   training tiles `<anything>-[a b c d].png` (0/1 labels separated by spaces) for
                TE, NEC, LYM, TAS; `val/` and `test/` hold `img/` and `mask/`.
BCSS-WSSS       training tiles `<anything>+<idx>[abcd].png` (no spaces) for TUM, STR, LYM, NEC.
folder          either label syntax, any number of classes, names from `data.class_names`.

Ground-truth masks are indexed (palette) PNGs, index K = background (white); an RGB mask is
mapped back to indices through the dataset's palette. A validation or test tile's label vector is
the set of classes its mask shows (the releases name those tiles without labels); a training tile's
comes from its name. Layouts seen in the wild are accepted: `training/` or `train/` (possibly
`train/img/`), the release's doubled `LUAD-HistoSeg/LUAD-HistoSeg/`, `val/` or `valid/` or
`validation/`. Every problem is reported naming the file or folder at fault.
"""
from __future__ import annotations

import collections
import concurrent.futures
import csv
import dataclasses
import functools
import os
import re

import numpy as np
from PIL import Image

from wsss_jax.data import intensity, mask_files
from wsss_jax.errors import UserError
from wsss_jax.train.progress import Progress

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff") + intensity.DICOM_EXTENSIONS
# `-[1 0 0 1]` (LUAD-HistoSeg) or `[1101]` (BCSS-WSSS, after `+<idx>`) at the end of the stem.
_SPACED = re.compile(r"-\[([01](?: [01])*)\]$")
_PACKED = re.compile(r"\+\d+\[([01]+)\]$")
_ANY = re.compile(r"\[([01](?: ?[01])*)\]$")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  name: str
  class_names: tuple | None     # None: from data.class_names (the generic reader)
  label_pattern: re.Pattern
  label_example: str
  palette: str                  # a key of mask_files.PALETTES for RGB ground-truth masks
  background: str = "white"     # the pseudo-mask background rule (masks.BACKGROUND_RULES)
  mean: tuple | None = None     # RGB channel statistics in [0, 1] (REFERENCE.md gives them in BGR)
  std: tuple | None = None
  extensions: tuple = (".png",)


SPECS = {
    "luad_histoseg": DatasetSpec("luad_histoseg", ("TE", "NEC", "LYM", "TAS"), _SPACED,
                                 "name-[1 0 0 1].png", "luad", "white",
                                 (0.7343, 0.5050, 0.6916), (0.1885, 0.2277, 0.1552)),
    "bcss_wsss": DatasetSpec("bcss_wsss", ("TUM", "STR", "LYM", "NEC"), _PACKED,
                             "name+0[1101].png", "bcss", "none",
                             (0.7062, 0.4779, 0.6679), (0.1982, 0.2256, 0.1737)),
    "folder": DatasetSpec("folder", None, _ANY, "name-[1 0 1].png or name[101].png", "luad",
                          extensions=IMAGE_EXTENSIONS),
}
_TRAIN_DIRS = ("training", "train")
_SPLIT_DIRS = {"val": ("val", "valid", "validation"), "test": ("test", "testing")}


def class_names(data_cfg) -> tuple:
  """The dataset's class names; a release's fixed names must agree with data.num_classes."""
  spec = SPECS[data_cfg.name]
  configured = tuple(data_cfg.get("class_names") or ())
  if spec.class_names and configured and configured != spec.class_names:
    raise UserError(f"data.class_names={configured} but {spec.name} has classes "
                    f"{spec.class_names}; set dataset={spec.name} in the config argument")
  names = tuple(spec.class_names or configured)
  if data_cfg.get("num_classes") not in (None, len(names)):
    raise UserError(f"data.num_classes={data_cfg.num_classes} but {data_cfg.name} has "
                    f"{len(names)} classes {names}")
  return names


def parse_labels(filename: str, spec: DatasetSpec, num_classes: int) -> np.ndarray:
  """The multi-label vector (float32, 0/1) written in a training tile's file name."""
  stem = os.path.splitext(os.path.basename(filename))[0]
  match = spec.label_pattern.search(stem)
  if match is None:
    raise UserError(f"{filename}: the file name carries no label vector in the {spec.name} "
                    f"convention (expected e.g. {spec.label_example!r})")
  labels = np.array([int(c) for c in match.group(1).replace(" ", "")], np.float32)
  if labels.size != num_classes:
    raise UserError(f"{filename}: the file name has {labels.size} labels but the dataset has "
                    f"{num_classes} classes")
  return labels


LABELS_CSV = "labels.csv"


def read_labels_csv(image_dir: str, names: tuple) -> dict:
  """{file: label vector} from `<image_dir>/labels.csv` (columns `file,labels`; labels: class
  names joined by '+', '' for a normal image, or a 0/1 vector like `1 0 1`); {} without one."""
  path = os.path.join(image_dir, LABELS_CSV)
  if not os.path.isfile(path):
    return {}
  out = {}
  with open(path, newline="", encoding="utf-8-sig") as f:
    rows = list(csv.DictReader(f))
  for line, row in enumerate(rows, start=2):
    if row.get("file") is None or row.get("labels") is None:
      raise UserError(f"{path}: the columns must be file,labels (line {line})")
    out[os.path.basename(row["file"].strip())] = _csv_labels(row["labels"], names,
                                                             f"{path} line {line}")
  return out


def _csv_labels(cell: str, names: tuple, where: str) -> np.ndarray:
  cell = cell.strip()
  bits = cell.replace(" ", "")
  if bits and set(bits) <= {"0", "1"} and len(bits) == len(names):
    return np.array([int(c) for c in bits], np.float32)
  vector = np.zeros(len(names), np.float32)
  for name in filter(None, (n.strip() for n in cell.replace(";", "+").split("+"))):
    if name not in names:
      raise UserError(f"{where}: {name!r} is not one of the classes {names}")
    vector[names.index(name)] = 1.0
  return vector


# --- Layout ------------------------------------------------------------------------------------------
def _subdir(parent: str, names) -> str | None:
  for name in names:
    path = os.path.join(parent, name)
    if os.path.isdir(path):
      return path
  return None


def dataset_root(root: str) -> str:
  """The folder that holds the split folders: `root` itself, or a folder one or two levels below
  it (the release unpacks as `LUAD-HistoSeg/LUAD-HistoSeg/`)."""
  if not root:
    raise UserError("data.root is empty; point it at the dataset's folder")
  if not os.path.isdir(root):
    raise UserError(f"data.root={root!r} is not a folder")
  frontier = [root]
  for _ in range(3):
    for folder in frontier:
      if _subdir(folder, _TRAIN_DIRS + _SPLIT_DIRS["val"] + _SPLIT_DIRS["test"]):
        return folder
    frontier = [os.path.join(f, d) for f in frontier for d in sorted(os.listdir(f))
                if os.path.isdir(os.path.join(f, d))]
  raise UserError(f"data.root={root!r} holds no training/, train/, val/ or test/ folder "
                  f"(searched two levels down)")


def split_folders(root: str, split: str) -> tuple[str, str | None]:
  """(image folder, mask folder or None) of a split."""
  base = dataset_root(root)
  folder = _subdir(base, _TRAIN_DIRS if split == "train" else _SPLIT_DIRS[split])
  if folder is None:
    names = _TRAIN_DIRS if split == "train" else _SPLIT_DIRS[split]
    hint = ("; without one, the segmenter scores on val with --config.segment.test_split=val "
            "(configs/segment.py: --config.test_split=val)") * (split == "test")
    raise UserError(f"{base} has no {split} split (looked for {'/, '.join(names)}/){hint}")
  images = _subdir(folder, ("img", "images", "image"))
  return (images or folder), _subdir(folder, ("mask", "masks", "label", "labels", "gt"))


def list_images(folder: str, extensions) -> list[str]:
  names = sorted(n for n in os.listdir(folder)
                 if not n.startswith(".") and n.lower().endswith(tuple(extensions)))
  if not names:
    raise UserError(f"{folder} holds no image files ({', '.join(extensions)})")
  return names


# --- Files -------------------------------------------------------------------------------------------
def read_image(path: str, rule: intensity.IntensityRule = intensity.IntensityRule()
               ) -> np.ndarray:
  """(H, W, 3) uint8 RGB by the intensity rule (8-bit RGB files as they are); a truncated or
  undecodable file is named in the error."""
  return intensity.read_rgb8(path, rule)


def read_ground_truth(path: str, size: tuple[int, int], num_classes: int, palette: str
                      ) -> np.ndarray:
  """(H, W) uint8 class indices of a ground-truth mask: indexed PNGs as they are, RGB masks mapped
  through the palette (a colour outside it is an error naming the file)."""
  try:
    with Image.open(path) as image:
      mode = image.mode
      rgb = np.asarray(image.convert("RGB")) if mode not in ("P", "L") else None
  except (OSError, SyntaxError, ValueError):
    rgb = None  # read_mask names the problem
  if rgb is None:
    mask = mask_files.read_mask(path, size, 255)
    top = int(mask.max()) if mask.size else 0
    if top > num_classes:
      hint = (" (one finding: 0 = finding, 1 = background; a 0/255 mask must be rewritten as "
              "1 - mask / 255)" if num_classes == 1 else "")
      raise UserError(f"mask {path} has palette index {top}, outside the class range "
                      f"0..{num_classes} ({num_classes} = background){hint}")
    return mask
  if num_classes + 1 > len(mask_files.PALETTES[palette]):
    raise UserError(f"mask {path} is an RGB image; with {num_classes} classes masks must be "
                    f"indexed PNGs of class indices")
  colours = mask_files.PALETTES[palette][:num_classes] + ((255, 255, 255),)  # index K = background
  mask = np.full(rgb.shape[:2], 255, np.uint8)
  for index, colour in enumerate(colours):
    mask[(rgb == colour).all(axis=-1)] = index
  if (mask == 255).any():
    y, x = np.argwhere(mask == 255)[0]
    raise UserError(f"mask {path}: colour {tuple(int(v) for v in rgb[y, x])} at ({y}, {x}) is not "
                    f"in the {palette} palette")
  if mask.shape != tuple(size):
    raise UserError(f"mask {path} is {mask.shape[0]}x{mask.shape[1]} but its image is "
                    f"{size[0]}x{size[1]}")
  return mask


def labels_from_mask(mask: np.ndarray, num_classes: int) -> np.ndarray:
  """The classes a ground-truth mask shows (background index K excluded)."""
  present = np.bincount(mask.ravel(), minlength=num_classes + 1)[:num_classes] > 0
  return present.astype(np.float32)


BAD_FILES = ("strict", "skip")


def _check_size(path: str, min_side: int) -> str | None:
  """Why a tile is too small for the model input (read from its header, not decoded), or None."""
  shape = intensity.image_shape(path)
  if shape is None:
    return None  # the decode check (or the first read) names an unreadable file
  h, w = shape
  if min(h, w) < min_side:
    return (f"{path} is {h}x{w} pixels, smaller than data.image_size={min_side}; lower "
            f"data.image_size or drop the image")
  return None


def _check_file(source: "FolderSource", filename: str, decode: bool, min_side: int
                ) -> str | None:
  """Why a tile is unusable (too small; with `decode` also decoding, mask size and indices),
  or None."""
  why = _check_size(os.path.join(source.image_dir, filename), min_side) if min_side else None
  if why or not decode:
    return why
  try:
    source.read(filename, None)
  except UserError as e:
    return str(e)
  return None


@functools.lru_cache(maxsize=32)
def _scan(image_dir: str, mask_dir: str | None, spec_name: str, names: tuple, split: str,
          decode: bool, threads: int, stamp: tuple, min_side: int = 0,
          rule: intensity.IntensityRule = intensity.IntensityRule()) -> tuple:
  """(files, labels, problems) of one split, memoised per process (`stamp`: the folders' mtimes,
  so an edited folder is scanned again). Problems: a name without a parsable label vector or with
  the wrong length, names that collide once made file-safe (`mask_files.file_stem`: the pseudo masks
  of both would be one file), an image without its mask, and with `decode` every tile decoded
  (truncated or unreadable PNGs, masks of another size or with an index out of range); every
  tile's size (from its header) against `min_side`, the model input, so that no tile stops a run
  part-way."""
  del stamp
  spec, k = SPECS[spec_name], len(names)
  files = list_images(image_dir, spec.extensions)
  problems, labels = {}, {}
  listed = read_labels_csv(image_dir, names) if k else {}
  for f in files:
    if k and (split == "train" or mask_dir is None):
      path = os.path.join(image_dir, f)
      try:  # labels.csv first, else the file name
        labels[f] = listed[f] if f in listed else parse_labels(path, spec, k)
      except UserError as e:
        problems[f] = (f"{path}: not listed in the folder's {LABELS_CSV}, and "
                       f"{str(e).removeprefix(path + ': ')}" if listed else str(e))
  stems = collections.defaultdict(list)
  for f in files:
    stems[mask_files.file_stem(os.path.splitext(f)[0])].append(f)
  for group in stems.values():
    for f in group[1:] if len(group) > 1 else ():
      problems.setdefault(f, f"{os.path.join(image_dir, f)}: its name collides with "
                             f"{group[0]!r} (same file-safe name)")
  if mask_dir is not None and k:
    present = set(os.listdir(mask_dir))
    for f in files:
      if FolderSource.mask_name(f) not in present:
        problems.setdefault(f, f"{os.path.join(image_dir, f)} has no mask in {mask_dir}")
  if decode or min_side:
    probe = FolderSource.__new__(FolderSource)
    probe.image_dir, probe.mask_dir, probe.spec, probe.num_classes = image_dir, mask_dir, spec, k
    probe.labels, probe.intensity = labels, rule
    todo = [f for f in files if f not in problems]
    progress = Progress(f"scanning the {split} split", len(todo))
    progress.update(0)
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
      checks = pool.map(lambda f: _check_file(probe, f, decode, min_side), todo)
      for i, (f, why) in enumerate(zip(todo, checks)):
        progress.update(i + 1)
        if why:
          problems[f] = why
  return tuple(files), labels, tuple((f, problems[f]) for f in files if f in problems)


class FolderSource:
  """Random-access source (grain) of one split: `image`, `labels`, `name`, and `mask` where the
  split has ground truth. The split is scanned when the source is built (see `_scan`); with
  `bad_files='strict'` any problem stops with one message listing every offending file, with
  'skip' those files are dropped and listed in `skipped` (and in `<report_dir>/skipped_files.txt`)."""

  def __init__(self, root: str, split: str, spec: DatasetSpec, names: tuple,
               bad_files: str = "strict", decode_check: bool = True, threads: int = 4,
               report_dir: str = "", min_side: int = 0,
               rule: intensity.IntensityRule = intensity.IntensityRule()):
    if bad_files not in BAD_FILES:
      raise UserError(f"data.bad_files={bad_files!r} is not one of {BAD_FILES}")
    self.split, self.spec, self.class_names, self.intensity = split, spec, tuple(names), rule
    self.num_classes = len(names)
    self.image_dir, self.mask_dir = split_folders(root, split)
    if not self.num_classes:  # an unlabelled folder (pretraining): images only
      self.mask_dir = None
    elif split == "train" and self.mask_dir is not None:
      masked = set(os.listdir(self.mask_dir))
      if not all(self.mask_name(f) in masked for f in list_images(self.image_dir,
                                                                  spec.extensions)):
        self.mask_dir = None  # training tiles without (complete) ground truth
    csv_file = os.path.join(self.image_dir, LABELS_CSV)
    stamp = tuple(os.stat(d).st_mtime_ns for d in (self.image_dir, self.mask_dir, csv_file)
                  if d and os.path.exists(d))
    files, self.labels, problems = _scan(self.image_dir, self.mask_dir, spec.name,
                                         self.class_names, split, decode_check, threads, stamp,
                                         min_side, rule)
    self.skipped = list(problems)
    if problems and bad_files == "strict":
      listing = "\n  ".join(why for _, why in problems)
      raise UserError(f"{len(problems)} bad file(s) in the {split} split of {root} "
                      f"(data.bad_files='skip' drops them):\n  {listing}")
    bad = {f for f, _ in problems}
    self.files = [f for f in files if f not in bad]
    if problems and report_dir:
      with open(os.path.join(report_dir, f"skipped_files_{split}.txt"), "w",
                encoding="utf-8") as out:
        out.writelines(f"{why}\n" for _, why in problems)
    if problems:
      where = os.path.join(report_dir, f"skipped_files_{split}.txt") if report_dir else "unlisted"
      print(f"skipped {len(problems)} bad file(s) of the {split} split ({where})")
    if not self.files:
      raise UserError(f"the {split} split of {root} ({self.image_dir}) has no usable image")

  @staticmethod
  def mask_name(filename: str) -> str:
    return os.path.splitext(filename)[0] + ".png"

  def __len__(self) -> int:
    return len(self.files)

  def name(self, index: int) -> str:
    return os.path.splitext(self.files[int(index)])[0]

  def read(self, filename: str, name: str | None) -> dict:
    image = read_image(os.path.join(self.image_dir, filename), self.intensity)
    example = {"image": image, "name": name or os.path.splitext(filename)[0]}
    if self.mask_dir is not None:
      example["mask"] = read_ground_truth(os.path.join(self.mask_dir, self.mask_name(filename)),
                                          image.shape[:2], self.num_classes, self.spec.palette)
    if self.num_classes:
      example["labels"] = (self.labels[filename] if filename in self.labels
                           else labels_from_mask(example["mask"], self.num_classes))
    return example

  def __getitem__(self, index: int) -> dict:
    return self.read(self.files[int(index)], self.name(index))

  def __repr__(self) -> str:
    return f"FolderSource({self.spec.name}, {self.image_dir!r}, {len(self)} images)"


# What a dataset preset fills in where the user gave nothing: setting, background rule, palette.
@dataclasses.dataclass(frozen=True)
class Preset:
  class_names: tuple | None
  setting: str
  background: str
  palette: str
  mean: tuple | None = None
  std: tuple | None = None


GREY_MEAN, GREY_STD = (0.25, 0.25, 0.25), (0.2, 0.2, 0.2)  # ultrasound-like: mostly dark
EMBEDDED = {
    "synthetic": Preset(("TE", "NEC", "LYM", "TAS"), "tissue", "white", "luad"),
    "synthetic_lesions": Preset(("lesion",), "finding", "threshold", "finding", GREY_MEAN,
                                GREY_STD),
    "synthetic_cells": Preset(("cell",), "finding", "threshold", "finding", (0.13,) * 3,
                              (0.14,) * 3),  # measured on 64 of its test images
}


def preset(name: str, setting: str) -> Preset:
  """The defaults of dataset `name` in `setting` ("" = the dataset's own). A folder assumes no
  white glass: its tissue default is no background rule, its finding default the map threshold."""
  if name in EMBEDDED:
    return dataclasses.replace(EMBEDDED[name], setting=setting or EMBEDDED[name].setting)
  if name not in SPECS:  # slides: unlabelled tiles
    return Preset((), setting or "tissue", "none", "luad")
  spec = SPECS[name]
  setting = setting or "tissue"
  background = "threshold" if setting == "finding" else (
      spec.background if spec.class_names else "none")
  palette = "finding" if setting == "finding" else spec.palette
  # findings are mostly grey images (ultrasound, X-ray, fluorescence): not H&E's colour statistics
  grey = setting == "finding" and spec.mean is None
  return Preset(spec.class_names, setting, background, palette,
                GREY_MEAN if grey else spec.mean, GREY_STD if grey else spec.std)


SETTINGS = ("tissue", "finding")
# "dataset": the dataset preset's value, or for a phase reading a classifier the classifier's
FROM_DATASET = "dataset"


def _given(value: str) -> bool:
  return value not in ("", FROM_DATASET)  # "": what runs written before the named mode hold


def resolve(data_cfg, field: str, value: str = FROM_DATASET):
  """A preset-backed field's value: `value` when the user gave one, else the preset of
  data.name in data.setting (field: setting, background, palette)."""
  setting = data_cfg.get("setting", FROM_DATASET)
  return value if _given(value) else getattr(
      preset(data_cfg.name, setting if _given(setting) else ""), field)


def settle(data_cfg):
  """A copy of a data section with its setting resolved: the one place `setting=dataset`
  becomes tissue or finding (each phase calls it once, on the data it ends up with)."""
  data = data_cfg.copy_and_resolve_references()
  with data.unlocked():
    data.setting = resolve(data_cfg, "setting", data_cfg.get("setting", FROM_DATASET))
  if data.setting not in SETTINGS:
    raise UserError(f"data.setting={data.setting!r} is not one of {SETTINGS + (FROM_DATASET,)}")
  return data


@dataclasses.dataclass(frozen=True)
class DatasetChoice:
  """What a config file's dataset arguments (`dataset`, `root`, `classes` joined by '+',
  `setting`, and where it has them `palette`, `background`) pick. The setting, palette and
  background rule stay "dataset" unless a dataset or setting argument was given: a phase
  reading a classifier then takes the classifier's."""
  name: str = "synthetic"
  root: str = ""
  class_names: tuple = ()            # (): the config's own
  setting: str = FROM_DATASET
  palette: str = FROM_DATASET
  background: str = FROM_DATASET
  mean: tuple | None = None          # None: the config's own
  std: tuple | None = None
  intensity: str = "auto"            # data.intensity (data/intensity.py)


def choose_dataset(arg) -> DatasetChoice:
  """The dataset a config file's arguments name, checked; the preset fills what they leave."""
  given = set(arg.get("given_args", ()))
  rule = str(intensity.parse_rule(arg.get("intensity", "auto"), "intensity"))
  if arg.dataset == "slides":  # tiles cut from large images (wsss_jax.data.slides): unlabelled
    return DatasetChoice(arg.dataset, arg.root, intensity=rule)
  known = ("slides",) + tuple(EMBEDDED) + tuple(SPECS)
  if arg.dataset not in known:
    raise UserError(f"dataset={arg.dataset!r} is not one of {known}")
  if _given(arg.get("setting", "")) and arg.setting not in SETTINGS:
    raise UserError(f"setting={arg.setting!r} is not one of {SETTINGS}")
  setting = arg.setting if _given(arg.get("setting", "")) else ""
  p = preset(arg.dataset, setting)
  names = tuple(n for n in arg.get("classes", "").split("+") if n)
  if "classes" in given and p.class_names and names != p.class_names:
    raise UserError(f"classes={arg.classes} but {arg.dataset} has classes "
                    f"{'+'.join(p.class_names)}")
  names = names or p.class_names or ()
  chose = "dataset" in given or "setting" in given
  if chose and p.setting == "finding" and any(n.lower() == "background" for n in names):
    raise UserError(f"classes={'+'.join(names)}: in the finding setting background is not a "
                    f"class (index {len(names)}, after the findings); name only "
                    f"the findings, e.g. classes=nucleus")

  def own(field: str, from_preset: str) -> str:  # the user's argument, else the preset's
    if field in given and _given(arg[field]):
      return arg[field]
    return from_preset if chose else FROM_DATASET

  return DatasetChoice(arg.dataset, arg.root, names, p.setting if chose else FROM_DATASET,
                       own("palette", p.palette), own("background", p.background), p.mean, p.std,
                       rule)


def folder_source(data_cfg, split: str) -> FolderSource:
  return FolderSource(data_cfg.root, split, SPECS[data_cfg.name], class_names(data_cfg),
                      data_cfg.get("bad_files", "strict"), data_cfg.get("decode_check", True),
                      max(1, data_cfg.get("num_threads", 4)), data_cfg.get("report_dir", ""),
                      data_cfg.get("image_size", 0),
                      intensity.parse_rule(data_cfg.get("intensity", "auto")))
