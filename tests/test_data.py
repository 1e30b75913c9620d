import numpy as np
import pytest

from wsss_jax.data import pipeline, synthetic, transforms
from wsss_jax.errors import UserError


def test_tiles_are_deterministic_and_distinct():
  a = synthetic.generate_tile(3, "train", 7, 64)
  b = synthetic.generate_tile(3, "train", 7, 64)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  c = synthetic.generate_tile(3, "train", 8, 64)
  d = synthetic.generate_tile(3, "val", 7, 64)
  assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[0], d[0])


def test_labels_are_the_classes_covering_the_mask():
  for i in range(40):
    image, mask, labels = synthetic.generate_tile(0, "train", i, 96)
    assert image.shape == (96, 96, 3) and image.dtype == np.uint8
    assert mask.shape == (96, 96) and set(np.unique(mask)) <= {0, 1, 2, 3, 4}
    area = np.array([(mask == k).mean() for k in range(4)])
    expected = area >= 0.02
    if not expected.any():
      expected[np.argmax(area)] = True
    np.testing.assert_array_equal(labels.astype(bool), expected)


def test_classes_have_distinct_appearance():
  """Mean colour and nucleus density (dark-pixel fraction) separate the tissue classes."""
  stats = {k: [] for k in range(5)}
  for i in range(60):
    image, mask, _ = synthetic.generate_tile(1, "train", i, 96)
    grey = image.mean(-1)
    for k in range(5):
      if (mask == k).sum() > 500:
        stats[k].append(((grey[mask == k] < 110).mean(), image[mask == k].mean(0)))
  dark = {k: np.mean([s[0] for s in v]) for k, v in stats.items()}
  # lymphocytes are the most nucleus-dense, glass has no nuclei, stroma/necrosis are sparse
  assert dark[2] > dark[0] > max(dark[1], dark[3]) > dark[4]
  bright = {k: np.mean([s[1].mean() for s in v]) for k, v in stats.items()}
  assert bright[4] > 220 and all(bright[k] < bright[4] for k in range(4))


def test_random_resized_crop_box_stays_inside_and_respects_scale():
  rng = np.random.default_rng(0)
  for _ in range(500):
    top, left, h, w = transforms.random_resized_crop_box(rng, 100, 80, (0.3, 0.6))
    assert 0 <= top and top + h <= 100 and 0 <= left and left + w <= 80
    # a sampled box (area within the scale range, up to rounding) or the whole-image fallback
    assert 0.28 <= h * w / 8000 <= 0.62 or (h, w) == (100, 80)


def test_crop_flip_moves_mask_with_image():
  image, mask, _ = synthetic.generate_tile(0, "train", 5, 64)
  out = transforms.RandomResizedCropFlip(32, (0.5, 1.0))(
      {"image": image, "mask": mask}, np.random.default_rng(3))
  assert out["image"].shape == (32, 32, 3) and out["mask"].shape == (32, 32)
  # Pixels labelled glass stay bright after the shared crop.
  if (out["mask"] == 4).any():
    assert out["image"][out["mask"] == 4].mean() > 200


def _data_cfg(**kw):
  from wsss_jax import config_lib
  d = config_lib.data(32)
  d.num_train, d.num_val, d.tile_size, d.num_threads = 24, 4, 48, 1
  d.update(kw)
  return d


def _first_batches(it, n):
  return [next(it)["image"] for _ in range(n)]


@pytest.mark.parametrize("workers", [0, 1])  # in-process threads; grain worker processes
def test_pipeline_batches_epochs_and_resume(workers):
  ds = pipeline.train_dataset(_data_cfg(num_workers=workers), seed=0, local_batch=8)
  it = iter(ds)
  batches = _first_batches(it, 3)
  assert batches[0].shape == (8, 32, 32, 3) and batches[0].dtype == np.uint8
  state = it.get_state()
  following = _first_batches(it, 4)  # crosses into the second epoch
  fresh = iter(pipeline.train_dataset(_data_cfg(num_workers=workers), seed=0, local_batch=8))
  fresh.set_state(state)
  for a, b in zip(following, _first_batches(fresh, 4)):
    np.testing.assert_array_equal(a, b)


def test_pipeline_process_shards_are_disjoint():
  cfg = _data_cfg(hflip=False, crop_scale=(1.0, 1.0))
  seen = []
  for p in range(2):
    it = iter(pipeline.train_dataset(cfg, seed=0, local_batch=4, process_index=p,
                                     process_count=2))
    imgs = np.concatenate(_first_batches(it, 3))  # 12 images = one epoch of this shard
    seen.append({im.tobytes() for im in imgs})
    assert len(seen[-1]) == 12
  assert not seen[0] & seen[1]


def test_pipeline_rejects_unknown_dataset_and_tiny_shards():
  with pytest.raises(UserError, match="data.name='nope'"):
    pipeline.train_dataset(_data_cfg(name="nope"), seed=0, local_batch=8)
  with pytest.raises(UserError, match="fewer than its batch"):
    pipeline.train_dataset(_data_cfg(num_train=4), seed=0, local_batch=8)
