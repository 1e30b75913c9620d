"""Folder readers of the public releases and their ArrayRecord packing, on real PNG files."""
import os

import numpy as np
import pytest
from PIL import Image

from wsss_jax import config_lib
from wsss_jax.data import folders, pipeline, synthetic
from wsss_jax.errors import UserError
from wsss_jax.data import mask_files

LUAD_NAMES = ("TE", "NEC", "LYM", "TAS")


def _label_text(labels, spec: str) -> str:
  bits = [str(int(v)) for v in labels]
  return f"-[{' '.join(bits)}]" if spec == "luad_histoseg" else f"+0[{''.join(bits)}]"


def _save_indexed(path: str, mask: np.ndarray, palette: str) -> None:
  image = Image.fromarray(mask, mode="P")
  image.putpalette(mask_files.palette_bytes(palette, 5))
  image.save(path)


def write_release(root: str, spec: str = "luad_histoseg", n_train: int = 12, n_val: int = 4,
                  size: int = 40, train_dir: str = "training", nested: bool = False) -> dict:
  """A miniature release from the embedded generator: training tiles named with their labels,
  val/test with img/ and palette mask/. Returns {split: [(file stem, image, mask, labels)]}."""
  base = os.path.join(root, "LUAD-HistoSeg", "LUAD-HistoSeg") if nested else root
  palette = folders.SPECS[spec].palette
  written = {}
  for split, n in (("train", n_train), ("val", n_val), ("test", n_val)):
    img_dir = os.path.join(base, train_dir if split == "train" else split,
                           "" if split == "train" else "img")
    os.makedirs(img_dir, exist_ok=True)
    if split != "train":
      os.makedirs(os.path.join(base, split, "mask"), exist_ok=True)
    written[split] = []
    for i in range(n):
      image, mask, labels = synthetic.generate_tile(5, split, i, size)
      stem = f"tile{i:03d}" + (_label_text(labels, spec) if split == "train" else "")
      Image.fromarray(image).save(os.path.join(img_dir, stem + ".png"))
      if split != "train":
        _save_indexed(os.path.join(base, split, "mask", stem + ".png"), mask, palette)
      written[split].append((stem, image, mask, labels))
  return written


def _cfg(root, name="luad_histoseg", **kw):
  d = config_lib.data(32, folders.DatasetChoice(name))
  d.root, d.num_classes, d.class_names, d.num_threads = root, 4, (), 1
  d.update(kw)
  return d


@pytest.mark.parametrize("spec,name,expected", [
    ("luad_histoseg", "1031280-2300-27920-[1 0 0 1].png", [1, 0, 0, 1]),
    ("bcss_wsss", "TCGA-A1-A0SK-DX1_xmin45749_ymin25055_MPP-0.2500+0[1101].png", [1, 1, 0, 1]),
    ("folder", "anything-[0 1 1].png", [0, 1, 1]),
    ("folder", "case+12[011].png", [0, 1, 1]),
])
def test_label_vectors_from_file_names(spec, name, expected):
  labels = folders.parse_labels(name, folders.SPECS[spec], len(expected))
  np.testing.assert_array_equal(labels, np.array(expected, np.float32))


@pytest.mark.parametrize("spec,name,message", [
    ("luad_histoseg", "x-[1 0 1].png", "has 3 labels but the dataset has 4"),
    ("luad_histoseg", "x+0[1001].png", "no label vector in the luad_histoseg convention"),
    ("bcss_wsss", "x-[1 0 0 1].png", "no label vector in the bcss_wsss convention"),
    ("luad_histoseg", "x-[1 0 2 1].png", "no label vector"),
])
def test_malformed_file_names_are_named(spec, name, message):
  with pytest.raises(UserError, match=message) as e:
    folders.parse_labels(name, folders.SPECS[spec], 4)
  assert name in str(e.value)


@pytest.mark.parametrize("layout", ["training", "train", "train/img", "nested"])
def test_layouts_and_examples_match_the_files(tmp_path, layout):
  written = write_release(str(tmp_path), train_dir="training" if layout == "nested" else layout,
                          nested=layout == "nested")
  cfg = _cfg(str(tmp_path))
  for split in ("train", "val", "test"):
    source = pipeline.build_source(cfg, split)
    assert len(source) == len(written[split])
    for i, (stem, image, mask, labels) in enumerate(written[split]):
      example = source[i]
      assert example["name"] == stem == source.name(i)
      np.testing.assert_array_equal(example["image"], image)  # PNG is lossless
      if split == "train":
        np.testing.assert_array_equal(example["labels"], labels)  # from the name
        assert "mask" not in example
      else:
        np.testing.assert_array_equal(example["mask"], mask)
        shown = [(mask == k).any() for k in range(4)]  # from the mask: every class it shows
        np.testing.assert_array_equal(example["labels"], np.array(shown, np.float32))


def test_rgb_masks_map_through_the_palette(tmp_path):
  write_release(str(tmp_path), spec="bcss_wsss", n_train=2, n_val=2)
  mask_path = tmp_path / "val" / "mask" / "tile000.png"
  indices = np.asarray(Image.open(mask_path))
  rgb = np.asarray(mask_files.PALETTES["bcss"], np.uint8)[indices]
  Image.fromarray(rgb).save(mask_path)
  source = pipeline.build_source(_cfg(str(tmp_path), "bcss_wsss"), "val")
  np.testing.assert_array_equal(source[0]["mask"], indices)
  rgb = rgb.copy()
  rgb[3, 5] = (12, 34, 56)
  Image.fromarray(rgb).save(mask_path)
  with pytest.raises(UserError, match=r"colour \(12, 34, 56\) at \(3, 5\) is not in the bcss"):
    source[0]


def test_bad_files_and_folders_are_named(tmp_path):
  written = write_release(str(tmp_path), n_train=3, n_val=2)
  cfg = _cfg(str(tmp_path))
  # A truncated PNG: refused on access, naming the file.
  path = tmp_path / "training" / (written["train"][1][0] + ".png")
  path.write_bytes(path.read_bytes()[:200])
  with pytest.raises(UserError, match="cannot be decoded") as e:
    pipeline.build_source(cfg, "train")[1]
  assert str(path) in str(e.value)
  # A validation image without its mask.
  os.remove(tmp_path / "val" / "mask" / "tile001.png")
  with pytest.raises(UserError, match="(?s)1 bad file.*tile001.png has no mask"):
    pipeline.build_source(cfg, "val")
  # A malformed training name.
  (tmp_path / "training" / "stray.png").write_bytes(b"")
  with pytest.raises(UserError, match="(?s)2 bad file.*stray.png: the file name carries no"):
    pipeline.build_source(cfg, "train")
  with pytest.raises(UserError, match="holds no training/, train/, val/ or test/"):
    pipeline.build_source(_cfg(str(tmp_path / "training")), "train")
  with pytest.raises(UserError, match="is not a folder"):
    pipeline.build_source(_cfg(str(tmp_path / "nope")), "train")
  with pytest.raises(UserError, match="data.class_names=.* but bcss_wsss has classes"):
    folders.class_names(_cfg(str(tmp_path), "bcss_wsss", class_names=LUAD_NAMES))
  with pytest.raises(UserError, match="data.num_classes=3 but luad_histoseg has 4"):
    folders.class_names(_cfg(str(tmp_path), num_classes=3))


def test_unlabelled_folder_for_pretraining(tmp_path):
  os.makedirs(tmp_path / "train")
  for i in range(3):
    Image.fromarray(synthetic.generate_tile(1, "train", i, 40)[0]).save(
        tmp_path / "train" / f"slide_{i}.png")
  source = pipeline.build_source(_cfg(str(tmp_path), "folder", num_classes=None), "train")
  assert len(source) == 3 and set(source[2]) == {"image", "name"}


def test_choose_dataset_sets_the_release_fields_and_settle_names_the_setting():
  from conftest import load_config as load
  config = load("segment", "dataset=bcss_wsss,root=/data/bcss")
  assert (config.data.name, config.data.root) == ("bcss_wsss", "/data/bcss")
  assert config.data.class_names == ("TUM", "STR", "LYM", "NEC") and config.palette == "bcss"
  assert config.data.mean == (0.7062, 0.4779, 0.6679)  # REFERENCE.md's BGR statistics, reversed
  assert config.data.setting == "tissue"
  assert load("pseudo_masks", "dataset=bcss_wsss").background.rule == "none"
  assert load("pseudo_masks", "dataset=bcss_wsss,background=otsu").background.rule == "otsu"
  with pytest.raises(UserError, match="dataset='kitti' is not one of"):
    load("classify", "dataset=kitti")
  with pytest.raises(UserError, match="setting='lesion' is not one of"):
    load("classify", "setting=lesion")
  # no dataset argument: the setting stays "dataset" until the phase settles it once
  default = load("segment")
  assert default.data.setting == "dataset" and default.palette == "dataset"
  assert folders.settle(default.data).setting == "tissue"
  lesions = load("segment")
  lesions.data.name = "synthetic_lesions"
  assert folders.settle(lesions.data).setting == "finding"
  lesions.data.setting = "tissue"  # a named setting wins over the dataset's
  assert folders.settle(lesions.data).setting == "tissue"
  lesions.data.setting = ""  # what runs written before the named mode recorded
  assert folders.settle(lesions.data).setting == "finding"
  lesions.data.setting = "lesions"
  with pytest.raises(UserError, match="data.setting='lesions' is not one of"):
    folders.settle(lesions.data)


# --- ArrayRecord ------------------------------------------------------------------------------------
def test_records_hold_the_same_examples_and_resume(tmp_path):
  from wsss_jax.data import records
  written = write_release(str(tmp_path / "release"), n_train=10, n_val=3)
  cfg = _cfg(str(tmp_path / "release"))
  folder = records.build(cfg, str(tmp_path / "records"))
  assert any(f.startswith("luad_histoseg-train.array_record") for f in os.listdir(folder))
  rec_cfg = _cfg(str(tmp_path / "release"), records_dir=str(tmp_path / "records"))
  for split in ("train", "val"):
    source = pipeline.build_source(rec_cfg, split)
    assert len(source) == len(written[split])
    by_name = {source.name(i): source[i] for i in range(len(source))}
    for stem, image, mask, labels in written[split]:
      np.testing.assert_array_equal(by_name[stem]["image"], image)
      if split == "val":
        np.testing.assert_array_equal(by_name[stem]["mask"], mask)
      else:
        np.testing.assert_array_equal(by_name[stem]["labels"], labels)
  # grain over the records: per-process shards are disjoint, and a resumed iterator continues.
  rec_cfg.update(crop_scale=(1.0, 1.0), hflip=False)
  shards = [np.concatenate([b["image"] for b, _ in zip(iter(pipeline.train_dataset(
      rec_cfg, seed=1, local_batch=5, process_index=p, process_count=2)), range(1))])
      for p in range(2)]
  assert not {x.tobytes() for x in shards[0]} & {x.tobytes() for x in shards[1]}
  it = iter(pipeline.train_dataset(rec_cfg, seed=1, local_batch=4))
  next(it)
  state = it.get_state()
  expected = [next(it)["image"] for _ in range(3)]
  resumed = iter(pipeline.train_dataset(rec_cfg, seed=1, local_batch=4))
  resumed.set_state(state)
  for a in expected:
    np.testing.assert_array_equal(next(resumed)["image"], a)
  with pytest.raises(UserError, match="holds no built bcss_wsss dataset"):
    pipeline.build_source(_cfg("", "bcss_wsss", records_dir=str(tmp_path / "records")), "train")
  with pytest.raises(UserError, match="have classes .* but the config names"):
    records.RecordSource(str(tmp_path / "records"), "luad_histoseg", "train", ("a", "b", "c", "d"))


# --- Statistics and the dataset phase ---------------------------------------------------------------
def test_stats_phase_counts_and_checks(tmp_path):
  import json
  import shutil
  from conftest import load_config
  from wsss_jax import runner
  root = tmp_path / "release"
  written = write_release(str(root), n_train=8, n_val=3)
  # Leak a training tile into the test split, and truncate a validation image.
  stem = written["train"][2][0]
  shutil.copy(root / "training" / f"{stem}.png", root / "test" / "img" / "leak.png")
  _save_indexed(str(root / "test" / "mask" / "leak.png"), np.full((40, 40), 4, np.uint8), "luad")
  broken = root / "val" / "img" / "tile001.png"
  broken.write_bytes(broken.read_bytes()[:300])
  config = load_config("dataset", f"action=stats,dataset=luad_histoseg,root={root},threads=1")
  summary = runner.run_phase(config, str(tmp_path / "out"))
  assert summary["splits"] == {"train": 8, "val": 3, "test": 4} and summary["problems"] == 2
  result = json.loads((tmp_path / "out" / "stats.json").read_text())
  train = result["splits"]["train"]
  labels = np.stack([w[3] for w in written["train"]])
  assert [v["tiles"] for v in train["label_frequency"].values()] == labels.sum(0).tolist()
  pixels = np.stack([w[1] for w in written["train"]]).reshape(-1, 3) / 255.0
  np.testing.assert_allclose(train["mean"], pixels.mean(0), rtol=1e-9)
  np.testing.assert_allclose(train["std"], pixels.std(0), rtol=1e-9)
  test = result["splits"]["test"]
  expected = np.bincount(np.concatenate([w[2].ravel() for w in written["test"]]
                                        + [np.full(1600, 4)]), minlength=5) / (4 * 1600)
  np.testing.assert_allclose(list(test["mask_pixel_share"].values()), expected)
  assert test["empty_label_vectors"] == 1 and train["image_sizes"] == {"40x40": 8}
  problems = result["splits"]["val"]["problems"] + test["problems"]
  assert any("tile001.png cannot be decoded" in p for p in problems)
  assert any(f"test/leak has the same pixels as train/{stem}" in p for p in problems)
  report = (tmp_path / "out" / "stats.md").read_text()
  assert "## Check: 2 problem(s)" in report
  assert json.loads((tmp_path / "out" / "stats.json").read_text())["splits"]["val"]["tiles"] == 3


def test_strict_and_skip_modes_list_every_bad_file(tmp_path):
  root = tmp_path / "release"
  written = write_release(str(root), n_train=6, n_val=4)
  train = root / "training"
  good = (train / (written["train"][0][0] + ".png")).read_bytes()
  (train / "nolabel.png").write_bytes(good)                  # no label vector
  (train / "short-[1 0 1].png").write_bytes(good)            # three labels for four classes
  (train / "cut-[1 0 0 1].png").write_bytes(good[:150])      # truncated PNG
  (train / "dup a-[1 0 0 1].png").write_bytes(good)          # collides with the next once file-safe
  (train / "dup_a-[1 0 0 1].png").write_bytes(good)
  _save_indexed(str(root / "val" / "mask" / "tile001.png"), np.zeros((20, 40), np.uint8), "luad")
  _save_indexed(str(root / "val" / "mask" / "tile002.png"), np.full((40, 40), 7, np.uint8), "luad")
  for f in (root / "test" / "img").iterdir():
    f.unlink()
  cfg = _cfg(str(root))
  with pytest.raises(UserError) as e:
    pipeline.build_source(cfg, "train")
  message = str(e.value)
  assert message.startswith("4 bad file(s) in the train split")
  for name, why in (("nolabel.png", "carries no label vector"), ("short-[1 0 1].png", "has 3 labels"),
                    ("cut-[1 0 0 1].png", "cannot be decoded"),
                    ("dup_a-[1 0 0 1].png", "collides with 'dup a-[1 0 0 1].png'")):
    assert any(name in line and why in line for line in message.splitlines()), name
  with pytest.raises(UserError, match=r"(?s)2 bad file.*tile001.png is 20x40 but its image is 40x40"
                                      r".*tile002.png has palette index 7"):
    pipeline.build_source(cfg, "val")
  with pytest.raises(UserError, match="holds no image files"):
    pipeline.build_source(cfg, "test")
  report = tmp_path / "run"
  report.mkdir()
  skip = _cfg(str(root), bad_files="skip", report_dir=str(report))
  source = pipeline.build_source(skip, "train")
  assert len(source) == 7 and len(source.skipped) == 4  # the 6 tiles and 'dup a'
  assert sorted(source.name(i) for i in range(len(source)))[:1] == ["dup a-[1 0 0 1]"]
  listed = (report / "skipped_files_train.txt").read_text().splitlines()
  assert len(listed) == 4 and any("cut-[1 0 0 1].png" in line for line in listed)
  assert len(pipeline.build_source(skip, "val")) == 2
  with pytest.raises(UserError, match="data.bad_files='lenient' is not one of"):
    pipeline.build_source(_cfg(str(root), bad_files="lenient"), "train")


def test_the_pipeline_names_every_splits_bad_files_in_one_message(tmp_path):
  from conftest import load_config
  from wsss_jax import runner
  write_release(str(tmp_path), n_train=3, n_val=2, size=64)
  os.remove(tmp_path / "val" / "mask" / "tile001.png")
  (tmp_path / "training" / "stray.png").write_bytes(b"")
  config = load_config("pipeline", f"dataset=luad_histoseg,root={tmp_path}")
  with pytest.raises(UserError) as refused:
    runner.validate_phase(config)
  message = str(refused.value)
  assert "stray.png: the file name carries no label vector" in message  # train
  assert message.count("tile001.png has no mask") == 1  # val, read by two phases: named once
