"""tfds builders that pack a folder release into ArrayRecord shards, and the grain source that
reads them back with random access.

`python -m wsss_jax.main --config=configs/dataset.py:action=build` runs the builder with the release
folder as tfds's manual_dir (nothing is downloaded). Tiles are stored as their original encoded
bytes (no re-encoding, so a 224 px PNG tile costs what its file costs), with the label vector, the
name and, where the split has ground truth, the mask as an indexed PNG. TensorFlow is not needed
to build or to read. Training reads the shards through grain exactly as it reads folders: global
shuffling by index, each process its own slice, the iterator position saved in every checkpoint.
"""
from __future__ import annotations

import io
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from wsss_jax.data import folders
from wsss_jax.errors import UserError

VERSION = "1.0.0"


def _png_bytes(mask: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(mask).save(buffer, format="PNG")
  return buffer.getvalue()


class _TileBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """One split per folder split; features: image (encoded bytes), mask (indexed PNG bytes, empty
  when the split has none), labels (float32, K), name (the file stem)."""
  VERSION = tfds.core.Version(VERSION)
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Point data.root (the manual_dir) at the unpacked release."
  SPEC = ""

  def __init__(self, *, class_names: tuple, **kwargs):
    self._class_names = tuple(class_names)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    k = len(self._class_names)
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"{self.SPEC} tiles with image-level labels ({', '.join(self._class_names)})",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(), dtype=np.object_),
            "mask": tfds.features.Tensor(shape=(), dtype=np.object_),
            "labels": tfds.features.Tensor(shape=(k,), dtype=np.float32),
            "name": tfds.features.Text(),
        }),
        metadata=tfds.core.MetadataDict(class_names=list(self._class_names)))

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    splits = {}
    for split in ("train", "val", "test"):
      try:
        source = folders.FolderSource(root, split, folders.SPECS[self.SPEC], self._class_names)
      except UserError:
        if split == "train":
          raise
        continue  # a release without this split
      splits[split] = self._generate_examples(source)
    return splits

  def _generate_examples(self, source: folders.FolderSource):
    for i, filename in enumerate(source.files):
      with open(os.path.join(source.image_dir, filename), "rb") as f:
        encoded = f.read()
      example = source[i]  # decodes: a broken file is refused here, not at training time
      mask = _png_bytes(example["mask"]) if "mask" in example else b""
      yield filename, {"image": encoded, "mask": mask, "labels": example["labels"],
                       "name": example["name"]}


class LuadHistoseg(_TileBuilder):
  SPEC = "luad_histoseg"


class BcssWsss(_TileBuilder):
  SPEC = "bcss_wsss"


class WsssFolder(_TileBuilder):
  SPEC = "folder"


BUILDERS = {"luad_histoseg": LuadHistoseg, "bcss_wsss": BcssWsss, "folder": WsssFolder}


def build(data_cfg, records_dir: str) -> str:
  """Packs the release at data.root into ArrayRecord shards under `records_dir`; returns the
  dataset's folder."""
  builder = BUILDERS[data_cfg.name](class_names=folders.class_names(data_cfg),
                                    data_dir=records_dir, file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=data_cfg.root))
  return os.fspath(builder.data_dir)


def _decode(encoded: bytes, what: str, mode: str | None) -> np.ndarray:
  try:
    with Image.open(io.BytesIO(encoded)) as image:
      return np.asarray(image.convert(mode) if mode else image)
  except (OSError, SyntaxError, ValueError) as e:
    raise UserError(f"{what} cannot be decoded ({e})") from None


class RecordSource:
  """Random-access source over the ArrayRecord shards of one split, decoding on access."""

  def __init__(self, records_dir: str, name: str, split: str, class_names: tuple):
    folder = os.path.join(records_dir, BUILDERS[name].name, VERSION)
    if not os.path.isfile(os.path.join(folder, "dataset_info.json")):
      raise UserError(f"data.records_dir={records_dir!r} holds no built {name} dataset (looked "
                      f"for {folder}); build it with configs/dataset.py:action=build")
    builder = tfds.builder_from_directory(folder)
    stored = tuple(builder.info.metadata.get("class_names", ()))
    if stored != tuple(class_names):
      raise UserError(f"the records in {folder} have classes {stored} but the config names "
                      f"{tuple(class_names)}")
    if split not in builder.info.splits:
      raise UserError(f"the records in {folder} have no {split!r} split; they have "
                      f"{sorted(builder.info.splits)}")
    self.source, self.split, self.folder = builder.as_data_source(split), split, folder

  def __len__(self) -> int:
    return len(self.source)

  def _record(self, index: int) -> tuple[dict, str]:
    record = self.source[int(index)]
    name = record["name"]
    return record, (name.decode() if isinstance(name, bytes) else str(name))

  def __getitem__(self, index: int) -> dict:
    record, name = self._record(index)
    example = {"image": _decode(record["image"], f"record {name}", "RGB"), "name": name,
               "labels": np.asarray(record["labels"], np.float32)}
    if record["mask"]:
      example["mask"] = _decode(record["mask"], f"mask of record {name}", None)
    return example

  def name(self, index: int) -> str:
    return self._record(index)[1]

  def __repr__(self) -> str:
    return f"RecordSource({self.folder!r}, {self.split!r}, {len(self)} records)"
