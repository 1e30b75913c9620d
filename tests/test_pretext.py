"""Pretext tasks (rotation, jigsaw, exemplar) on the MAE encoder and on the ResNet trunks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wsss_jax import runner
from wsss_jax.errors import UserError
from wsss_jax.models import pretext
from wsss_jax.phases import pretrain
from wsss_jax.train import earlier_runs


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
  # 4x4 tiles: 16! permutations cannot be listed; a random candidate pool keeps them far apart
  big = pretext.maximal_hamming_permutations(16, 50, max_candidates=20000)
  dist = (big[:, None] != big[None]).sum(-1)[~np.eye(50, dtype=bool)]
  assert sorted(big[0]) == list(range(16)) and dist.min() >= 12 and dist.mean() > 15
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


def nt_xent_numpy(z1, z2, t):
  """The NT-Xent loss written out per anchor, as in the SimCLR paper's Algorithm 1."""
  z = np.concatenate([z1, z2]).astype(np.float64)
  n, b = len(z), len(z1)
  losses, hits = [], []
  for i in range(n):
    j = (i + b) % n
    sims = np.array([z[i] @ z[k] / t for k in range(n)])
    others = [k for k in range(n) if k != i]
    losses.append(-(sims[j] - np.log(np.exp(sims[others]).sum())))
    hits.append(others[int(np.argmax(sims[others]))] == j)
  return np.mean(losses), np.mean(hits)


def test_nt_xent_matches_numpy_and_its_closed_form():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(2, 5, 8))
  z /= np.linalg.norm(z, axis=-1, keepdims=True)
  loss, acc = pretext.nt_xent(jnp.asarray(z[0], jnp.float32), jnp.asarray(z[1], jnp.float32), 0.5)
  want_loss, want_acc = nt_xent_numpy(z[0], z[1], 0.5)
  assert float(loss) == pytest.approx(want_loss, rel=1e-5) and float(acc) == pytest.approx(want_acc)
  # both views of image i equal to e_i: each anchor sees e^(1/t) once and e^0 for 2B - 2 views
  e = jnp.eye(4, dtype=jnp.float32)
  loss, acc = pretext.nt_xent(e, e, 0.2)
  assert float(loss) == pytest.approx(-np.log(np.exp(5) / (np.exp(5) + 6)), rel=1e-5)
  assert float(acc) == 1.0


def test_strong_views_keep_what_each_augmentation_promises():
  from ml_collections import ConfigDict

  from wsss_jax.data import strong_augment as sa
  rng = np.random.default_rng(1)
  images = jnp.asarray(rng.random((6, 16, 16, 3)), jnp.float32)
  # a full-image box with aspect 1 resamples each image onto itself
  top, left, h, w = sa.crop_boxes(jax.random.PRNGKey(0), 6, 16, 16, (1.0, 1.0), (1.0, 1.0))
  np.testing.assert_allclose(np.asarray(sa.resized_crops(images, top, left, h, w)), images,
                             atol=1e-5)
  # a 4x4 box at (8, 4) upsampled x4: pixel (8 + 4y' ...) -> the box's own top-left pixel region
  one = sa.resized_crops(images[:1], jnp.array([8.0]), jnp.array([4.0]), jnp.array([8.0]),
                         jnp.array([8.0]))
  np.testing.assert_allclose(np.asarray(one[0, 1::2, 1::2]).mean(), float(images[0, 8:16, 4:12].mean()),
                             rtol=0.05)
  # hue turns keep the luma; grayscale makes the channels equal with the same luma
  turned = sa.rotate_hue(images, jnp.linspace(-1, 1, 6))
  np.testing.assert_allclose(np.asarray(turned @ sa.LUMA), np.asarray(images @ sa.LUMA), atol=1e-5)
  np.testing.assert_allclose(np.asarray(sa.rotate_hue(images, jnp.zeros(6))), images, atol=1e-5)
  gray = np.asarray(sa.grayscale(images))
  assert np.allclose(gray[..., 0], gray[..., 2])
  # blur keeps a constant image and the mean, lowers the variance
  blurred = sa.gaussian_blur(jax.random.PRNGKey(2), images, (1.0, 1.0), 3)
  const = sa.gaussian_blur(jax.random.PRNGKey(2), jnp.full_like(images, 0.3), (0.5, 2.0), 3)
  np.testing.assert_allclose(np.asarray(const), 0.3, atol=1e-6)
  assert float(blurred.var()) < 0.5 * float(images.var())
  assert abs(float(blurred.mean()) - float(images.mean())) < 0.01
  cfg = ConfigDict(dict(crop_min=0.08, colour_strength=1.0, colour_p=0.8, grayscale_p=0.2,
                        blur_p=0.5))
  a = sa.strong_view(jax.random.PRNGKey(3), images, cfg)
  b = sa.strong_view(jax.random.PRNGKey(4), images, cfg)
  assert a.shape == images.shape and 0 <= float(a.min()) and float(a.max()) <= 1
  assert not np.allclose(a, b)  # two views of the same images differ


def _oriented_folder(root, n=64, size=48):
  """An easy set for both tasks: smooth diagonal ramps (dark top-left, bright bottom-right) with
  a little noise, so each quarter turn and each tile's place can be read from the intensities."""
  from PIL import Image
  rng = np.random.default_rng(0)
  y, x = np.mgrid[0:size, 0:size] / (size - 1)
  for split in ("train", "val"):
    (root / split).mkdir(parents=True)
  for i in range(n):
    ramp = 40 + 170 * (0.6 * y + 0.4 * x) + rng.normal(0, 8, (size, size))
    rgb = np.repeat(ramp.clip(0, 255).astype(np.uint8)[..., None], 3, -1)
    Image.fromarray(rgb).save(root / ("val" if i < 4 else "train") / f"ramp_{i:03d}.png")
  return str(root)


def test_rotation_run_learns_and_initialises_a_classifier(tiny_pretrain_config, tmp_path):
  """On an easy set (oriented ramps) rotation starts at chance (cross-entropy ln 4 with a fresh
  head) and ends well below it; its encoder then starts a ViT classifier."""
  import json
  config = tiny_pretrain_config.copy_and_resolve_references()
  config.objective = "rotation"
  config.data.name, config.data.root = "folder", _oriented_folder(tmp_path / "ramps")
  config.data.num_classes, config.data.class_names = None, ()
  config.data.hflip = False  # a mirrored ramp is another quarter turn of the same ramp
  config.data.crop_scale = (0.5, 1.0)
  config.optim.base_lr = 0.05  # 1.6e-3 at batch 8 (the lr scales with batch / 256)
  config.total_steps, config.checkpoint_every, config.log_every = 60, 60, 1
  summary = pretrain.run(config, str(tmp_path / "pre"), dispatch=runner.DISPATCH)
  rows = [json.loads(line) for line in open(tmp_path / "pre" / "metrics.jsonl")]
  chance = np.log(4)
  assert rows[0]["loss"] == pytest.approx(chance, rel=0.1)
  assert np.mean([r["loss"] for r in rows[-10:]]) < 0.6 * chance  # it has learnt the task
  assert np.mean([r["pretext_accuracy"] for r in rows[-10:]]) > 0.5  # chance: 0.25
  assert np.isfinite(summary["final_loss"])
  assert_initialises_a_vit_classifier(str(tmp_path / "pre"))


def test_jigsaw_run_starts_at_chance_and_initialises_a_classifier(tiny_pretrain_config,
                                                                  tmp_path):
  """Jigsaw's 24-way task runs, starts at chance (ln 24) and its encoder starts a classifier.
  (It learns far more slowly than rotation: on the ramps above a 2-block ViT is still near chance
  after 200 steps, too long for a test.)"""
  import json
  config = tiny_pretrain_config.copy_and_resolve_references()
  config.objective = "jigsaw"
  config.jigsaw.grid, config.jigsaw.permutations = 2, 24
  config.total_steps, config.checkpoint_every, config.log_every = 4, 4, 1
  summary = pretrain.run(config, str(tmp_path / "pre"), dispatch=runner.DISPATCH)
  rows = [json.loads(line) for line in open(tmp_path / "pre" / "metrics.jsonl")]
  assert rows[0]["loss"] == pytest.approx(np.log(24), rel=0.1)
  assert np.isfinite(summary["final_loss"]) and 0 <= rows[-1]["pretext_accuracy"] <= 1
  assert_initialises_a_vit_classifier(str(tmp_path / "pre"))


def test_exemplar_run_tells_instances_apart_and_initialises_a_classifier(tiny_pretrain_config,
                                                                         tmp_path):
  """Instance discrimination on 64 tiles, batches of 8 (chance: 1 of 15 views) with mild views
  (a 32 px tile cropped to 8% is noise): it learns to find each view's twin."""
  import json
  config = tiny_pretrain_config.copy_and_resolve_references()
  config.objective = "exemplar"
  config.total_steps, config.checkpoint_every, config.log_every = 30, 30, 1
  config.exemplar.update(crop_min=0.5, blur_p=0.0, colour_strength=0.3)
  pretrain.run(config, str(tmp_path / "pre"), dispatch=runner.DISPATCH)
  rows = [json.loads(line) for line in open(tmp_path / "pre" / "metrics.jsonl")][-15:]
  chance = 1 / (2 * config.batch_size - 1)
  assert np.mean([r["instance_accuracy"] for r in rows]) > 2.5 * chance
  assert np.mean([r["loss"] for r in rows]) < np.log(2 * config.batch_size - 1) - 0.3
  assert_initialises_a_vit_classifier(str(tmp_path / "pre"))


def assert_initialises_a_vit_classifier(workdir: str):
  """The pretrained encoder (not the pretext head) is what a ViT classifier starts from."""
  from conftest import load_config

  from wsss_jax.device import parallel
  from wsss_jax.phases import classify
  cls_cfg = load_config("classify", "backbone=vit,variant=mu/8,image_size=32")
  mesh = parallel.make_mesh(1)
  t = classify.build_training(cls_cfg, mesh)
  state = earlier_runs.load_pretrained(jax.jit(t.init_state)(), workdir, t.model, mesh, "vit")
  fresh = jax.jit(t.init_state)()
  assert not np.allclose(state.params["encoder"]["blocks_0"]["attn"]["qkv"]["kernel"],
                         fresh.params["encoder"]["blocks_0"]["attn"]["qkv"]["kernel"])


def test_bad_pretext_settings_are_refused(tiny_pretrain_config, tmp_path):
  config = tiny_pretrain_config.copy_and_resolve_references()
  config.objective, config.jigsaw.grid = "jigsaw", 3  # 32 px does not split into 3 tiles
  with pytest.raises(UserError, match="jigsaw.grid=3 must be >= 2 and divide data.image_size=32"):
    pretrain.run(config, str(tmp_path), dispatch=runner.DISPATCH)
  config.objective, config.exemplar.temperature = "exemplar", 0.0
  with pytest.raises(UserError, match="exemplar.temperature=0.0 must be positive"):
    pretrain.run(config, str(tmp_path), dispatch=runner.DISPATCH)
  config.exemplar.temperature, config.exemplar.blur_p = 0.1, 1.5
  with pytest.raises(UserError, match=r"exemplar.blur_p=1.5 must lie in \[0, 1\]"):
    pretrain.run(config, str(tmp_path), dispatch=runner.DISPATCH)
  config.objective, config.evaluation.runs = "mae", "always"
  with pytest.raises(UserError, match="evaluation.runs='always' is not one of"):
    pretrain.run(config, str(tmp_path), dispatch=runner.DISPATCH)
  config.evaluation.runs = "probe"  # the probe's config is checked before pretraining starts
  config.evaluation.linear_probe.data.class_names = ("TE", "NEC")
  with pytest.raises(UserError, match="data.class_names has 2 names but data.num_classes=4"):
    pretrain.run(config, str(tmp_path / "never"), dispatch=runner.DISPATCH)
  assert not (tmp_path / "never" / "checkpoints").exists()
  config.objective = "colorization"
  with pytest.raises(UserError, match="objective='colorization' is not one of"):
    pretrain.run(config, str(tmp_path), dispatch=runner.DISPATCH)
  config.objective, config.model.encoder = "mae", "resnet38"
  with pytest.raises(UserError, match="model.encoder='resnet38': MAE pretrains a ViT"):
    pretrain.run(config, str(tmp_path), dispatch=runner.DISPATCH)
  config.model.encoder = "vgg16"
  with pytest.raises(UserError, match="model.encoder='vgg16' is not one of"):
    pretrain.run(config, str(tmp_path), dispatch=runner.DISPATCH)


def test_context_free_network_sees_each_tile_alone():
  """The CNN jigsaw network is the paper's siamese one: its logits equal a numpy-side assembly of
  the shared encoder applied to every tile on its own, then fc6 per tile, fc7 on the tiles'
  concatenation in puzzle order, and the head."""
  from wsss_jax.models.resnet import ResNet
  model = pretext.ContextFreeNetwork(ResNet(50, 32, width=1 / 16), 6, grid=2, tile_dim=8,
                                     hidden=16)
  puzzles = np.asarray(jax.random.uniform(jax.random.PRNGKey(0), (3, 32, 32, 3)))
  variables = jax.jit(model.init)(jax.random.PRNGKey(1), puzzles)
  logits = np.asarray(jax.jit(model.apply)(variables, puzzles))
  p = jax.device_get(variables["params"])
  encoder = {"params": p["encoder"], "batch_stats": variables["batch_stats"]["encoder"]}
  # the 12 tiles cut here with numpy, row-major; inference-mode BatchNorm treats each on its own
  tiles = np.stack([puzzles[b, 16 * (i // 2):16 * (i // 2) + 16, 16 * (i % 2):16 * (i % 2) + 16]
                    for b in range(3) for i in range(4)])
  feats = np.asarray(jax.jit(model.encoder.apply)(encoder, tiles)).mean((1, 2))
  relu = lambda x: np.maximum(x, 0)  # noqa: E731
  fc6 = relu(feats @ p["fc6"]["kernel"] + p["fc6"]["bias"]).reshape(3, 4 * 8)  # puzzle order
  h = relu(fc6 @ p["fc7"]["kernel"] + p["fc7"]["bias"])
  want = h @ p["pretext_head"]["kernel"] + p["pretext_head"]["bias"]
  np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-5)


def test_resnet_pretext_run_initialises_a_resnet_classifier(tiny_pretrain_config, tmp_path):
  """A ResNet38 trunk pretrained by jigsaw (BatchNorm statistics trained with it) starts
  the classify phase's ResNet38: the parameters and statistics are the pretrain run's, the
  evaluation probe trains only the head on the frozen trunk, and other backbones are refused."""
  import json

  from conftest import load_config

  from wsss_jax.device import parallel
  from wsss_jax.phases import classify
  from wsss_jax.train.checkpoint import Checkpointer
  config = tiny_pretrain_config.copy_and_resolve_references()
  config.objective, config.model.encoder, config.model.width = "jigsaw", "resnet38", 1 / 16
  config.data.normalize = False
  config.jigsaw.grid, config.jigsaw.permutations = 2, 24
  config.total_steps, config.checkpoint_every, config.log_every = 3, 3, 1
  config.evaluation.runs = "probe"
  probe = config.evaluation.linear_probe = load_config(
      "classify", "backbone=resnet38,width=0.0625,pda=off,probe=True,image_size=32,batch=8,"
                  "epochs=1,num_train=16")
  probe.data.num_val, probe.data.tile_size, probe.data.num_threads = 8, 48, 1
  workdir = tmp_path / "pre"
  summary = pretrain.run(config, str(workdir), dispatch=runner.DISPATCH)
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert rows[0]["loss"] == pytest.approx(np.log(24), rel=0.1)  # a fresh head: chance
  assert np.isfinite(summary["final_loss"])
  assert set(summary["evaluation"]) == {"linear_probe"}
  assert 0 <= summary["evaluation"]["linear_probe"]["mAP"] <= 1

  mesh = parallel.make_mesh(1)
  t = pretrain.build_training(config, mesh)
  ck = Checkpointer(str(workdir / "checkpoints"))
  saved, _ = ck.restore(3, t.abstract_state, t.state_sharding, pretrain.checkpoint_meta(config))
  ck.close()
  # the statistics moved away from BatchNorm's initial mean 0 and variance 1
  stats = jax.device_get(saved.batch_stats["encoder"])
  moved = [not np.allclose(s["mean"], 0) or not np.allclose(s["var"], 1)
           for s in jax.tree.leaves(stats, is_leaf=lambda n: isinstance(n, dict) and "mean" in n)]
  assert moved and all(moved)
  # the probe started from the pretrained trunk and left it (parameters and statistics) as it was
  ck = Checkpointer(str(workdir / "eval" / "linear_probe" / "checkpoints"))
  step = ck.latest_step()
  cls = classify.build_training(probe, mesh)
  probed, _ = ck.restore(step, cls.abstract_state, cls.state_sharding,
                         classify.checkpoint_meta(probe))
  ck.close()
  same = lambda a, b: jax.tree.map(np.testing.assert_array_equal, *jax.device_get((a, b)))  # noqa: E731
  same(probed.params["backbone"], saved.params["encoder"])
  same(probed.batch_stats["backbone"], saved.batch_stats["encoder"])

  for arg, match in (("backbone=resnet50,width=0.0625", "pretrained model.encoder='resnet38'"),
                     ("backbone=vit,variant=mu/8", "initialises model.backbone='resnet38' only")):
    other = load_config("classify", arg + ",image_size=32")
    t = classify.build_training(other, mesh)
    with pytest.raises(UserError, match=match):
      earlier_runs.load_pretrained(jax.eval_shape(t.init_state), str(workdir), t.model, mesh,
                               other.model.backbone)
