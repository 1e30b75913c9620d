"""Erasing phase: adversarial erasing (Wei et al. 2017), rounds of classify runs in one workdir.

  round_0/            the classify phase on the tiles as they are
  erased/round_1/     one PNG per training tile: the regions round 0 mined (erased next)
  round_1/            the classify phase on the tiles with those regions erased (mean colour)
  erased/round_2/     the union of the regions of rounds 0 and 1, and so on
  erasing.json        the accepted rounds, the region settings, each round's scores, why it stopped

After each round its classifier is scored (mAP) on its own, erased, training tiles. The stop
rule against over-erasing: a round whose mAP falls below `erasing.stop_ratio` x round 0's has
lost the object (its classifier "cannot converge", in the paper's words) and is not used; and no
new round is trained once the union covers more than `erasing.max_erased` of the labelled
tiles. The pseudo-mask phase with `erasing_workdir` fuses the accepted rounds' maps (the union).
Each classify run resumes, so a re-run continues where an interrupted one stopped. With
`erasing.round0_workdir` a finished classify run elsewhere (the pipeline's classifier) is round 0:
it is scored, not trained again, and there is no round_0/.
"""
from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from wsss_jax import atomic, relevance
from wsss_jax.data import mask_files, pipeline
from wsss_jax.device import parallel
from wsss_jax.errors import UserError
from wsss_jax.pseudo import adversarial_erasing
from wsss_jax.tasks.classify import split_metrics
from wsss_jax.tasks.common import prepare_images
from wsss_jax.train import earlier_runs


def round_dir(workdir: str, k: int) -> str:
  return os.path.join(workdir, f"round_{k}")


def erase_dir(workdir: str, k: int) -> str:
  return os.path.join(workdir, "erased", f"round_{k}")


def train_score(directory: str, data, batch: int, mesh) -> float:
  """mAP of the classifier in `directory` on its own training tiles (as erased for it)."""
  model, variables, _, _, _ = earlier_runs.load_classifier(directory, mesh)
  predict = jax.jit(lambda u8: jax.nn.sigmoid(model.apply(
      variables, prepare_images(u8, data, jnp.float32), train=False)))
  return split_metrics(predict, data, batch, mesh, "train")["mAP"]


def write_regions(loaded, settings: dict, data, batch: int, mesh, target: str) -> float:
  """Runs the chain of `rounds` on the (unerased) training tiles and writes each tile's union
  region to `target` (a PNG per tile at tile size; the folder appears whole, by renaming).
  Returns the mean erased fraction of the labelled tiles."""
  data = data.copy_and_resolve_references()
  with data.unlocked():
    data.erase_dir = ""
  rounds, variables = loaded
  run = adversarial_erasing.chain(rounds, settings, adversarial_erasing.fill_value(data))
  tmp = target + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  fractions = []
  keys = ("image", "labels", "name", "input")
  for b in pipeline.tile_batches(data, "train", batch, {"input": data.image_size}, keys):
    x = prepare_images(parallel.shard_identical(b["input"], mesh), data, jnp.float32)
    _, region = run(variables, x, jnp.asarray(b["labels"]))
    region = np.asarray(parallel.to_host(region))
    for i in np.flatnonzero(b["valid"]):
      h, w = b["image"][i].shape[:2]
      full = np.asarray(Image.fromarray(region[i].astype(np.uint8)).resize((w, h), Image.NEAREST))
      if parallel.is_main_process():
        mask_files.write_binary(os.path.join(tmp, mask_files.file_stem(str(b["name"][i])) + ".png"),
                           full > 0)
      if b["labels"][i].any():
        fractions.append(float(region[i].mean()))
  if parallel.is_main_process():
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
  return float(np.mean(fractions)) if fractions else 0.0


def over_erased(score, reference, erased_fraction, e) -> str:
  """Why erasing stops here ("" to go on): a round's mAP on its own tiles below stop_ratio x
  round 0's (the object is gone), or a union of regions above max_erased of the tiles."""
  if score is not None and score < e.stop_ratio * reference:
    return (f"mAP {score:.3f} < stop_ratio {e.stop_ratio} x round 0's {reference:.3f}: "
            f"over-erased, round not used")
  if erased_fraction is not None and erased_fraction > e.max_erased:
    return (f"the regions cover {erased_fraction:.2f} of the labelled tiles > max_erased "
            f"{e.max_erased}: no further round")
  return ""


def settings_of(config) -> dict:
  e = config.erasing
  return {"method": e.method, "layer": e.layer, "threshold": float(e.threshold)}


def validate(config, dispatch=None) -> None:
  """The erasing settings, and through `dispatch` (the runner's) the rounds' classify section
  where this config has one (in the pipeline the classify section is the pipeline's)."""
  e = config.erasing
  if e.rounds < 1:
    raise UserError(f"erasing.rounds={e.rounds} must be at least 1")
  if not 0 < e.threshold < 1:
    raise UserError(f"erasing.threshold={e.threshold} must lie in (0, 1) (maps are max-normalised)")
  if not 0 < e.stop_ratio <= 1 or not 0 < e.max_erased <= 1:
    raise UserError(f"erasing.stop_ratio={e.stop_ratio} and erasing.max_erased={e.max_erased} "
                    f"must lie in (0, 1]")
  first = e.get("round0_workdir")
  if first and not os.path.isdir(os.path.join(os.path.expanduser(first), "checkpoints")):
    raise UserError(f"erasing.round0_workdir={first}: no classify checkpoints there; run the "
                    f"classify phase there first")
  relevance.check_method(e.method)
  if e.method not in ("cam", "gradcam", "gradcam++", "xgradcam", "layercam", "hirescam"):
    raise UserError(f"erasing.method={e.method!r}: the regions come from a class-activation "
                    f"method (cam, gradcam, gradcam++, xgradcam, layercam, hirescam)")
  if dispatch is not None and "classify" in config:
    dispatch.validate(config.classify)


def run(config, workdir: str, *, dispatch) -> dict:
  """The rounds, each a classify run through `dispatch.run` (the runner's)."""
  validate(config, dispatch)
  mesh = parallel.mesh_from_config(config)
  settings = settings_of(config)
  e = config.erasing
  accepted, report, stop = [], [], f"{e.rounds} rounds done"
  reference = None
  for k in range(e.rounds):
    cls = config.classify.copy_and_resolve_references()
    with cls.unlocked():
      cls.seed, cls.num_devices = config.seed, config.num_devices
      cls.data.erase_dir = erase_dir(workdir, k) if k else ""
    directory = round_dir(workdir, k)
    if k == 0 and e.get("round0_workdir"):
      directory = os.path.abspath(os.path.expanduser(e.round0_workdir))  # trained already
    else:
      dispatch.run(cls, directory)
    batch = parallel.eval_batch_size(cls.batch_size, mesh)
    score = train_score(directory, cls.data, batch, mesh)
    reference = score if reference is None else reference
    entry = {"round": k, "train_mAP_on_erased": score, "accepted": True}
    report.append(entry)
    print(f"erasing round {k}: mAP {score:.3f} on its own training tiles", flush=True)
    stop_now = k and over_erased(score, reference, None, e)
    if stop_now:
      entry["accepted"], stop = False, f"round {k}: {stop_now}"
      break
    accepted.append(directory)
    if k + 1 == e.rounds:
      break
    loaded = adversarial_erasing.load_rounds(accepted, mesh, settings)
    entry["erased_fraction_next"] = write_regions(loaded, settings, cls.data, batch, mesh,
                                                  erase_dir(workdir, k + 1))
    stop_now = over_erased(None, None, entry["erased_fraction_next"], e)
    if stop_now:
      stop = f"after {len(accepted)} round(s): {stop_now}"
      break
  plan = {"rounds": accepted, **settings, "report": report, "stopped": stop}
  if parallel.is_main_process():
    atomic.write_json(os.path.join(workdir, "erasing.json"), plan)
  print(f"erasing: {len(accepted)} round(s) used; {stop}", flush=True)
  return {"phase": "erasing", **plan}
