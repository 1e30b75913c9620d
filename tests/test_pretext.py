"""Rotation and jigsaw pretext tasks on the MAE encoder."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wsss_jax.errors import UserError
from wsss_jax.models import pretext
from wsss_jax.phases import pretrain


def test_permutation_set_has_maximal_hamming_distance():
  # 4 tiles: 4 permutations can differ pairwise everywhere (the rows of a Latin square)
  four = pretext.maximal_hamming_permutations(4, 4)
  dist = (four[:, None] != four[None]).sum(-1)
  assert dist[~np.eye(4, dtype=bool)].min() == 4
  # 9 tiles, 100 permutations: distinct, far apart (the paper's set averages about 8)
  hundred = pretext.maximal_hamming_permutations(9, 100)
  dist = (hundred[:, None] != hundred[None]).sum(-1)[~np.eye(100, dtype=bool)]
  assert len({p.tobytes() for p in hundred}) == 100 and dist.min() >= 6 and dist.mean() > 7.9
  rand = np.array([np.random.default_rng(i).permutation(9) for i in range(100)])
  rdist = (rand[:, None] != rand[None]).sum(-1)[~np.eye(100, dtype=bool)]
  assert dist.mean() > rdist.mean()
  with pytest.raises(UserError, match="jigsaw.permutations=30 must lie in"):
    pretext.maximal_hamming_permutations(4, 30)


def test_shuffle_tiles_matches_numpy_and_rotation_matches_rot90():
  rng = np.random.default_rng(0)
  images = rng.random((3, 12, 12, 2)).astype(np.float32)
  perms = np.stack([rng.permutation(9) for _ in range(3)]).astype(np.int32)
  got = np.asarray(pretext.shuffle_tiles(jnp.asarray(images), jnp.asarray(perms), 3))
  for b in range(3):
    for i in range(9):
      src = perms[b, i]
      np.testing.assert_array_equal(got[b, 4 * (i // 3):4 * (i // 3) + 4, 4 * (i % 3):4 * (i % 3) + 4],
                                    images[b, 4 * (src // 3):4 * (src // 3) + 4,
                                           4 * (src % 3):4 * (src % 3) + 4])
  rotated, k = pretext.rotate_batch(jax.random.PRNGKey(1), jnp.asarray(images))
  for b in range(3):
    np.testing.assert_array_equal(np.asarray(rotated[b]), np.rot90(images[b], int(k[b])))
  many = pretext.rotate_batch(jax.random.PRNGKey(2), jnp.zeros((400, 4, 4, 1)))[1]
  assert set(np.asarray(many).tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("objective", ["rotation", "jigsaw"])
def test_pretext_run_learns_and_initialises_a_classifier(objective, tiny_pretrain_config, tmp_path):
  """The task starts at chance (cross-entropy ln n with a fresh head), trains, logs its accuracy,
  and its encoder then starts a ViT classifier."""
  import json
  from conftest import load_config
  from wsss_jax import parallel
  from wsss_jax.phases import classify
  config = tiny_pretrain_config.copy_and_resolve_references()
  config.objective = objective
  config.jigsaw.grid, config.jigsaw.permutations = 2, 24
  config.total_steps, config.checkpoint_every, config.log_every = 4, 4, 1
  summary = pretrain.run(config, str(tmp_path / "pre"))
  rows = [json.loads(line) for line in open(tmp_path / "pre" / "metrics.jsonl")]
  chance = np.log(4 if objective == "rotation" else 24)
  assert rows[0]["loss"] == pytest.approx(chance, rel=0.1)
  assert np.isfinite(summary["final_loss"]) and 0 <= rows[-1]["pretext_accuracy"] <= 1
  cls_cfg = load_config("classify", "backbone=vit,variant=mu/8,image_size=32")
  mesh = parallel.make_mesh(1)
  t = classify.build_training(cls_cfg, mesh)
  state = classify.load_pretrained(jax.jit(t.init_state)(), str(tmp_path / "pre"), t.model, mesh)
  fresh = jax.jit(t.init_state)()
  assert not np.allclose(state.params["encoder"]["blocks_0"]["attn"]["qkv"]["kernel"],
                         fresh.params["encoder"]["blocks_0"]["attn"]["qkv"]["kernel"])


def test_bad_pretext_settings_are_refused(tiny_pretrain_config, tmp_path):
  config = tiny_pretrain_config.copy_and_resolve_references()
  config.objective, config.jigsaw.grid = "jigsaw", 3  # 32 px does not split into 3 tiles
  with pytest.raises(UserError, match="jigsaw.grid=3 must be >= 2 and divide data.image_size=32"):
    pretrain.run(config, str(tmp_path))
  config.objective = "colorization"
  with pytest.raises(UserError, match="objective='colorization' is not one of"):
    pretrain.run(config, str(tmp_path))
