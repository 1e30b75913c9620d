"""Adversarial erasing: the chain of rounds on device, erased training tiles, the phase, and the
pseudo masks fused over its rounds (in the pipeline: tests/test_segment.py)."""
import os

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from wsss_jax.data import mask_files
from wsss_jax.errors import UserError
from wsss_jax.phases import erasing as erasing_phase
from wsss_jax.pseudo import adversarial_erasing
from wsss_jax.train import earlier_runs


def channel_map(v, x, labels):
  """A stand-in classifier's class map: `v` times the red channel, one class, full size."""
  return v * x[..., 0][:, None]


def test_chain_erases_each_rounds_region_before_the_next_and_fuses_by_maximum():
  # red: 1.0 on the left half, 0.5 on the right; round 0 mines the left half (> 0.6 of its max)
  red = np.concatenate([np.ones((4, 2)), np.full((4, 2), 0.5)], axis=1)
  images = jnp.asarray(np.stack([red, red, red], -1)[None], jnp.float32)
  labels = jnp.ones((1, 1))
  rounds = [(lambda v, x, y: {"m": channel_map(v, x, y)}, channel_map)] * 2
  fused, region = adversarial_erasing.erasing_chain(rounds, [1.0, 2.0], images, labels, jnp.zeros(3), 0.6)
  # round 1 sees the left half filled with 0: its map is 2 x (0 | 0.5), its region the right half
  round0 = red
  round1 = 2 * np.concatenate([np.zeros((4, 2)), np.full((4, 2), 0.5)], axis=1)
  np.testing.assert_allclose(np.asarray(fused["m"])[0, 0], np.maximum(round0, round1))
  assert np.asarray(region)[0].all()
  # an absent class mines nothing; a region below the threshold neither
  assert not np.asarray(adversarial_erasing.mined_region(jnp.ones((1, 1, 2, 2)), jnp.zeros((1, 1)), (4, 4),
                                             0.5)).any()
  flat = adversarial_erasing.mined_region(jnp.full((1, 1, 2, 2), 0.3), labels, (4, 4), 0.5)
  assert np.asarray(flat).all()  # max-normalised: a flat map is 1 everywhere


def test_erased_source_fills_the_mined_pixels_with_the_mean_colour(tmp_path):
  from wsss_jax.data import pipeline, synthetic
  base = synthetic.SyntheticHistology(3, "train", seed=0, size=16)
  region = np.zeros((16, 16), bool)
  region[4:8, 2:10] = True
  for i in range(3):
    mask_files.write_binary(str(tmp_path / (mask_files.file_stem(pipeline.example_name(base, i)) + ".png")),
                       region if i == 1 else np.zeros_like(region))
  source = pipeline.ErasedSource(base, str(tmp_path), (0.5, 0.25, 1.0))
  got, orig = source[1]["image"], base[1]["image"]
  np.testing.assert_array_equal(got[region], np.tile([128, 64, 255], (region.sum(), 1)))
  np.testing.assert_array_equal(got[~region], orig[~region])
  np.testing.assert_array_equal(source[0]["image"], base[0]["image"])
  os.remove(tmp_path / (mask_files.file_stem(pipeline.example_name(base, 2)) + ".png"))
  with pytest.raises(UserError, match="1 of 3 erasure masks are missing"):
    pipeline.ErasedSource(base, str(tmp_path), (0.5, 0.25, 1.0))


def test_stop_rule_and_bad_settings():
  e = ml_collections.ConfigDict(dict(stop_ratio=0.8, max_erased=0.6))
  assert erasing_phase.over_erased(0.85, 1.0, None, e) == ""
  assert "over-erased" in erasing_phase.over_erased(0.7, 1.0, None, e)
  assert erasing_phase.over_erased(None, None, 0.5, e) == ""
  assert "max_erased 0.6" in erasing_phase.over_erased(None, None, 0.7, e)
  from conftest import load_config
  config = load_config("erasing")
  config.erasing.threshold = 1.0
  with pytest.raises(UserError, match=r"erasing.threshold=1.0 must lie in \(0, 1\)"):
    erasing_phase.validate(config)
  config.erasing.threshold, config.erasing.method = 0.5, "lrp"
  with pytest.raises(UserError, match="erasing.method='lrp'"):
    erasing_phase.validate(config)
  with pytest.raises(UserError, match="no erasing.json there"):
    earlier_runs.load_erasing_plan("/nonexistent")
  config = load_config("erasing", "round0=/nonexistent")
  with pytest.raises(UserError, match="erasing.round0_workdir=/nonexistent: no classify"):
    erasing_phase.validate(config)
  from conftest import tiny_pipeline_config

  from wsss_jax.phases import pipeline as pipeline_phase
  config = tiny_pipeline_config("erasing=2,paper=True")
  config.pseudo_masks.dilations = (8, 12)
  with pytest.raises(UserError, match="erasing and pseudo_masks.dilations do not combine"):
    pipeline_phase.validate(config)
  config = tiny_pipeline_config("erasing=2")
  assert not config.pseudo_masks.scales_validate  # the pipeline's default gives way to erasing
  config.pseudo_masks.scales_validate = True
  with pytest.raises(UserError, match="set --config.pseudo_masks.scales_validate=False"):
    pipeline_phase.validate(config)
  assert tiny_pipeline_config("").pseudo_masks.scales_validate
