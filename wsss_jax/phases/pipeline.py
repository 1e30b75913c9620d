"""Pipeline phase: the weakly supervised pipeline end to end in sub-directories of one workdir.

[pretrain ->] classify [-> erasing] -> pseudo_masks -> segment (-> segment_full) -> pseudo masks of the test
tiles (scored, and drawn beside the segmenter's predictions in overlays.png) -> table.md. Each
phase resumes:
a finished training run only re-validates; pseudo masks are not recomputed when summary.json
shows they came from the same classifier step and training set.
"""
from __future__ import annotations

import json
import os
from typing import NamedTuple

import numpy as np

from wsss_jax import atomic, config_lib
from wsss_jax.data import folders, mask_files, pipeline as data_pipeline
from wsss_jax.device import parallel
from wsss_jax.errors import UserError
from wsss_jax.outputs import overlays
from wsss_jax.tasks.segment import SELF_LAYER
from wsss_jax.train import run_record
from wsss_jax.train.checkpoint import Checkpointer
from wsss_jax.train.writers import MetricWriter


def _classifier_step(classify_dir: str) -> int | None:
  directory = os.path.join(classify_dir, "checkpoints")
  if not os.path.isdir(directory):
    return None
  ckpt = Checkpointer(directory, async_save=False)
  step = ckpt.latest_step()
  ckpt.close()
  return step


def pseudo_masks_done(pm_dir: str, classify_dir: str, num_images: int,
                      erasing: dict | None = None, section=None) -> dict | None:
  """The pseudo-mask summary when the masks there are those of the current classifier (and of
  the same erasing rounds: `erasing` as the pseudo-mask summary records it, or None) and, where
  `section` is given, of the same pseudo-mask settings (its recorded config.json)."""
  summary = _read_summary(pm_dir)
  if summary and (summary.get("classifier_step") == _classifier_step(classify_dir)
      and summary.get("num_images") == num_images and summary.get("erasing") == erasing
      and (section is None or _same_settings(pm_dir, section))):
    return summary
  return None


def _same_settings(workdir: str, section) -> bool:
  """Whether `workdir`'s config.json records `section` (the data's report_dir, which the runner
  fills in with the workdir, aside)."""
  recorded = run_record.recorded_config(workdir)
  if recorded is None:
    return False
  current = _recorded_fields(json.loads(section.to_json_best_effort()), recorded)
  for settings in (recorded, current):
    settings.get("data", {}).pop("report_dir", None)
  return recorded == current


def _recorded_fields(current, recorded):
  """`current` without the fields a run recorded before they existed (each added with the
  default that keeps the earlier behaviour, e.g. nan_policy, data.intensity)."""
  if not (isinstance(current, dict) and isinstance(recorded, dict)):
    return current
  return {k: _recorded_fields(v, recorded[k]) for k, v in current.items() if k in recorded}


def table(result: dict) -> str:
  """One markdown table: pseudo-mask mIoU per layer, then the segmenter's test scores per class
  with and without the gate (and of the ground-truth-trained upper bound), after a line per
  choice the pipeline made (input side, erasing rounds, band width, self-training round)."""
  names = result["class_names"] + (["background"] if result.get("setting") == "finding" else [])
  finding = result.get("setting") == "finding"
  scored = ("finding scoring: background a class" if finding else "{} scoring")
  keys = ["mIoU"] + ["finding_IoU", "finding_Dice"] * finding + ["FwIoU", "accuracy"]
  heads = [key.replace("_", " ") for key in keys]
  lines = [line for choice in _choices(result) for line in (choice, "")]
  lines += [f"Pseudo masks ({scored.format('stage-1')}):", "",
            "| split | layer | " + " | ".join(heads) + " |", "|---" * (2 + len(heads)) + "|"]
  for key in ("pseudo_masks", "pseudo_masks_test"):
    for layer, s in result.get(key, {}).get("layers", {}).items():
      lines.append(f"| {result[key]['split']} | {layer} | {_cells(s, keys)} |")
  walked = result.get("affinity", {})
  if walked.get("scores"):
    lines.append(f"| train | rw (random walk of {walked['layer']}) | "
                 f"{_cells(walked['scores'], keys)} |")
  lines += ["", f"Segmentation ({result['test_split']} split, {scored.format('stage-2')}):", "",
            "| supervision | gate | " + " | ".join(heads + names) + " |",
            "|---" * (2 + len(heads) + len(names)) + "|"]
  for key in ("segment", "segment_full"):
    for gate, s in result.get(key, {}).get("test", {}).items():
      per = " | ".join(f"{s[f'IoU/{c}']:.3f}" for c in names)
      lines.append(f"| {result[key]['supervision']} | {gate} | {_cells(s, keys)} | {per} |")
  return "\n".join(lines) + "\n"


def _choices(result: dict) -> list[str]:
  """One sentence per choice the run made: input side, erasing rounds, band width, round."""
  out = []
  erasing, band, rounds, size = (result.get(k) for k in ("erasing", "ignore_band",
                                                          "self_training", "image_size"))
  if size:
    out.append("Input side (the pseudo masks' best val mIoU per side): " + ", ".join(
        f"{t['side']} px {t['val_mIoU']:.3f}" for t in size["sides"]) + f"; kept {size['kept']} px.")
  if erasing:
    out.append(f"Adversarial erasing: {len(erasing['rounds'])} round(s) fused; "
               f"{erasing['stopped']}.")
  if band:
    out.append("Ignore band (the segmenter's val mIoU per width of the pseudo masks' band): "
               + ", ".join(f"{h['width']:g} {h['val_mIoU']:.3f}" for h in band["widths"])
               + f"; kept {band['kept']:g}.")
  if rounds:
    out.append("Self-training (val mIoU per round; the best round is the segmenter below): "
               + ", ".join(f"round {h['round']} {h['val_mIoU']:.3f}" for h in rounds["rounds"])
               + f"; kept round {rounds['kept']}.")
  return out


def _cells(scores: dict, keys: list) -> str:
  return " | ".join(f"{scores.get(key, float('nan')):.3f}" for key in keys)


def validate(config, dispatch=None) -> None:
  """The pipeline's own choices, and through `dispatch` (the runner's) the sections it will
  run, before the first of them starts."""
  if config.supervision not in ("pseudo", "full"):
    raise UserError(f"supervision={config.supervision!r} is not 'pseudo' or 'full'")
  found = config.get("pretrain_workdir")
  if found and not os.path.isdir(os.path.join(os.path.expanduser(found), "checkpoints")):
    raise UserError(f"pretrain_workdir={found}: no pretrain checkpoints there; run "
                    f"configs/mae.py there first")
  if found:
    check_pretrained_matches(found, config.classify.model)
  if config.supervision != "pseudo" and str(config.self_training.rounds) not in ("0", "auto"):
    raise UserError("self_training.rounds relabels pseudo masks; supervision=full has none")
  gain = config.get("val_min_gain", 0.0)
  if not -1 < gain < 1:
    raise UserError(f"val_min_gain={gain!r} is not a difference of val mIoU in (-1, 1)")
  scan_splits(config)  # every split's bad files in one message, before any choice reads them
  self_training_rounds(config)  # refuses a misspelt number of rounds, or rounds without val masks
  widths = band_widths(config)  # refuses a width out of range
  input_sides(config)  # refuses image_size=auto where the pseudo masks are not scored on val
  if config.run_affinity and (len(widths) > 1 or not widths[0]):
    raise UserError(f"affinity learns from the confident pixels of one banded set of pseudo "
                    f"masks; ignore_band.width={config.ignore_band.width!r}: give "
                    f"configs/pipeline.py:affinity=True,band=<width above 0> (0.1 by default)")
  if found and config.run_pretrain:
    raise UserError(f"run_pretrain and pretrain_workdir={found} both set: pretrain here or "
                    f"start from that run, not both")
  if config.run_affinity and config.classify.model.backbone != "resnet38":
    raise UserError(f"affinity: AffinityNet's trunk is the ResNet38; the classifier is "
                    f"{config.classify.model.backbone!r}")
  if config.run_erasing and config.pseudo_masks.dilations:
    raise UserError("erasing and pseudo_masks.dilations do not combine; use one or the other")
  if config.run_erasing and config.pseudo_masks.scales_validate:
    raise UserError("erasing fuses its rounds' maps, which pseudo_masks.scales_validate does not "
                    "choose among: set --config.pseudo_masks.scales_validate=False")
  if dispatch is not None:
    sections = ("pretrain",) * config.run_pretrain + ("classify", "pseudo_masks", "segment")
    for section in sections + ("erasing",) * config.run_erasing + (
        ("affinity",) * config.run_affinity):
      dispatch.validate(config[section])
    if config.upper_bound and config.supervision == "pseudo":
      dispatch.validate(full_supervision(config.segment))
    check_inputs(config)


def scan_splits(config) -> None:
  """Every split the phases will read, scanned (memoised for them): the bad files of all
  splits in one message, so that one run shows everything to mend (a bad test tile found now,
  not after training)."""
  problems = []
  test = config.segment.test_split
  for section, splits in (("classify", ("train", "val")), ("segment", ("val", test))):
    data = data_pipeline.images_only(config[section].data)
    for split in splits:
      try:
        data_pipeline.build_source(data, split)
      except UserError as e:
        problems.append(str(e))
  if problems:
    raise UserError("\n".join(dict.fromkeys(problems)))  # a split both sections read: once


def check_inputs(config) -> None:
  """What the background rule of the pseudo masks will need, checked before the first phase
  starts (negative training images, or val masks for alpha=auto); `validate` has scanned every
  split's files by then."""
  if config.supervision != "pseudo":
    return
  pm = config.pseudo_masks
  rule = folders.resolve(folders.settle(pm.data), "background", pm.background.rule)
  negatives = data_pipeline.has_negatives(config.classify.data)
  if "negatives" in rule and negatives is False:
    raise UserError(f"pseudo_masks.background.rule={rule!r} needs negative training images "
                    f"(all-zero labels) and the training split has none; use threshold, power "
                    f"or otsu")
  if pm.background.alpha == "auto" and negatives is False and not data_pipeline.has_masks(
      config.segment.data, "val"):
    raise UserError("pseudo_masks.background.alpha=auto chooses alpha on val masks or by the "
                    "negative training images, and this dataset has neither; give "
                    "--config.pseudo_masks.background.alpha a number")


def full_supervision(segment):
  """The segment section of upper_bound=True: the same segmenter on the ground truth."""
  full = segment.copy_and_resolve_references()
  full.supervision = "full"
  full.self_labels.write = False  # self-training relabels pseudo masks, not the ground truth
  return full


def check_pretrained_matches(workdir: str, model) -> None:
  """The classifier the pipeline builds has the encoder (and a CNN's width) of the pretrain run
  that starts it; the config arguments to give are named when it does not."""
  pretrained = config_lib.run_model(workdir)
  encoder = pretrained.get("encoder", "vit")
  width = pretrained.get("width", model.width)
  if encoder not in ("vit", "resnet38"):
    raise UserError(f"pretrain_workdir={workdir} pretrained model.encoder={encoder!r}; the "
                    f"pipeline's classifier starts from a ViT run or a ResNet38 pretext run")
  if encoder != model.backbone or (encoder != "vit" and width != model.width):
    width_arg = "" if encoder == "vit" else f",width={width:g}"
    raise UserError(f"pretrain_workdir={workdir} pretrained model.encoder={encoder!r}"
                    f"{width_arg.replace(',width=', ' of width ')}; the pipeline's classifier "
                    f"is {model.backbone!r} of width {model.width:g}: give configs/pipeline.py:"
                    f"pretrain={workdir},encoder={encoder}{width_arg}")


class Dirs(NamedTuple):
  """The phases' sub-directories of the pipeline's workdir."""
  pretrain: str
  classify: str
  erasing: str
  pseudo_masks: str
  affinity: str
  segment: str
  segment_full: str
  pseudo_masks_test: str

  @classmethod
  def under(cls, workdir: str) -> "Dirs":
    return cls(*(os.path.join(workdir, name) for name in cls._fields))


def run(config, workdir: str, *, dispatch) -> dict:
  """Every phase in turn through `dispatch.run` (the runner's: each writes its config.json)."""
  validate(config, dispatch)
  dirs = Dirs.under(workdir)
  result = {"phase": "pipeline", "workdir": workdir}
  for section in ("pretrain", "classify", "erasing", "pseudo_masks", "affinity", "segment"):
    with config[section].unlocked():
      config[section].seed, config[section].num_devices = config.seed, config.num_devices
  seg = config.segment
  widths = band_widths(config)
  config.pseudo_masks.ignore_band = widths[0]
  dirs, erasing = run_input_sides(config, workdir, dirs, result, dispatch)
  with seg.unlocked():
    seg.gate.classifier_workdir = dirs.classify
    if seg.model.init_from:
      seg.model.init_from = dirs.classify
    seg.data.num_train = config.classify.data.num_train  # the tiles that have pseudo masks
  if config.run_affinity and config.supervision == "pseudo":
    run_affinity(config, dirs, result, dispatch)
  seg.self_labels.write = config.supervision == "pseudo" and self_training_rounds(config)[0] > 0
  result["segment"] = run_segment(dispatch, seg, dirs.segment)
  if len(widths) > 1:
    run_band_widths(config, workdir, result, dispatch, erasing, widths)
  if seg.self_labels.write:
    run_self_training(config, workdir, result, dispatch)
  if config.supervision == "pseudo":
    run_test_pseudo_masks(config, dirs, result, erasing, workdir, dispatch)
  if config.upper_bound and config.supervision == "pseudo":
    result["segment_full"] = run_segment(dispatch, full_supervision(seg), dirs.segment_full)
  result["class_names"] = list(seg.data.class_names)
  result["setting"] = result["segment"].get("setting", "tissue")
  result["test_split"] = seg.test_split
  text = table(result)
  print(text, flush=True)
  if parallel.is_main_process():
    atomic.write_text(os.path.join(workdir, "table.md"), text)
  writer = MetricWriter(workdir, parallel.is_main_process())
  writer.summary(result)
  writer.close()
  return result


def self_training_rounds(config) -> tuple[int, bool]:
  """(rounds at most, stop early): self_training.rounds is a number or "auto" (up to
  max_rounds, stopping at the first round whose val mIoU does not improve)."""
  text = str(config.self_training.rounds).strip().lower()
  if text != "auto" and not text.isdigit():
    raise UserError(f"self_training.rounds={config.self_training.rounds!r} is not a number of "
                    f"rounds or 'auto'")
  if config.supervision != "pseudo" or text == "0":
    return 0, False
  # the round kept is the best on the val masks: without them "auto" runs none
  has_val = data_pipeline.has_masks(config.segment.data, "val")
  if text == "auto":
    return (int(config.self_training.max_rounds) if has_val else 0), True
  if not has_val:
    raise UserError(f"self_training.rounds={text} keeps the round that scores best on the val "
                    f"masks, and the val split has none; use rounds=auto (none run) or 0")
  return int(text), False


def input_sides(config) -> tuple[int, ...]:
  """The classifier's input sides to try: image_sizes (configs/pipeline.py:image_size=auto)
  where the pseudo masks are scored on val masks (alpha=auto's sweep), else its own."""
  sides, own = tuple(int(s) for s in config.get("image_sizes", ())), config.classify.data.image_size
  if len(sides) < 2 or config.supervision != "pseudo" or not data_pipeline.has_masks(
      config.segment.data, "val"):
    return (sides or (own,))[:1]
  if config.pseudo_masks.background.alpha != "auto":
    raise UserError(f"image_size=auto compares the pseudo masks' val mIoU at sides {list(sides)}"
                    f", which background.alpha=auto measures (the finding recipe's); here "
                    f"alpha={config.pseudo_masks.background.alpha!r}: give image_size=N")
  if list(sides) != sorted(set(sides)):
    raise UserError(f"image_sizes={list(sides)}: image_size=auto tries rising sides")
  if own != sides[0]:
    raise UserError(f"classify.data.image_size={own} and image_size=auto (sides "
                    f"{list(sides)}): give configs/pipeline.py:image_size=N for one side")
  return sides


class Side(NamedTuple):
  """A classifier and its pseudo masks at one input side."""
  side: int
  dirs: Dirs
  erasing: dict | None
  result: dict       # its classify (and pseudo_masks) summaries
  data: tuple        # the segment section's masks_dir, mask_layers, loss_weights


def run_input_sides(config, workdir: str, dirs: Dirs, result: dict,
                    dispatch) -> tuple[Dirs, dict | None]:
  """[pretrain ->] classify [-> erasing -> pseudo masks] at each input side (the first in the
  workdir, others in size<N>/) until one scores no better on the val masks; the side whose
  pseudo masks score best there is the pipeline's (its classifier, its masks, the segmenter's
  input side). (Its dirs, its erasing.)"""
  sides = input_sides(config)

  def run_side(side, tried):
    at = dirs if not tried else dirs._replace(**{
        f: os.path.join(workdir, f"size{side}", f)
        for f in ("classify", "erasing", "pseudo_masks", "affinity")})
    config.classify.data.image_size = side
    run_classifier(config, at, result, dispatch)
    erasing = (run_pseudo_masks(config, at, result, dispatch)
               if config.supervision == "pseudo" else None)
    score = best_val_score(result.get("pseudo_masks", {}))
    return Side(side, at, erasing, {k: result.get(k) for k in ("classify", "pseudo_masks")},
                section_data(config.segment)), score

  tried, kept = search_on_val(sides, run_side, config, lambda side: f"input side {side} px")
  if len(tried) == 1:
    return dirs, tried[0].outcome.erasing
  best = tried[kept].outcome
  print("image_size=auto: val pseudo-mask mIoU " + ", ".join(
      f"{t.candidate} px {t.score:.3f}" for t in tried) + f"; the pipeline goes on at "
      f"{best.side} px", flush=True)
  config.classify.data.image_size = config.segment.data.image_size = best.side
  seg = config.segment
  seg.data.masks_dir, seg.data.mask_layers, seg.loss_weights = best.data
  config.pseudo_masks.classifier_workdir = best.dirs.classify
  if best.erasing:
    config.pseudo_masks.erasing_workdir = best.dirs.erasing
  result.update(best.result)
  result["image_size"] = {"sides": [{"side": t.candidate, "val_mIoU": t.score} for t in tried],
                          "kept": best.side}
  return best.dirs, best.erasing


def best_val_score(pm_summary: dict) -> float:
  """The pseudo masks' best val mIoU over their layers."""
  sweep = pm_summary.get("alpha_sweep") or {}
  return max((val_score(s) for s in sweep.values()), default=-1.0)


def val_score(layer_sweep: dict) -> float:
  """A layer's val mIoU at its alpha, with the refinements the val masks kept (par / crf
  .validate)."""
  return layer_sweep.get("refined_mIoU", max(layer_sweep["mIoU"]))


def beats(candidate: float, incumbent: float, config) -> bool:
  """Whether a candidate's val mIoU (a wider band, a larger side, one more round) beats the
  incumbent's by more than val_min_gain: smaller differences are within the noise of one val
  split and one training run, and the cheaper choice stays."""
  return candidate > incumbent + float(config.get("val_min_gain", 0.0))


class Tried(NamedTuple):
  """One candidate of a search on the val masks: what running it gave and its val mIoU."""
  candidate: object
  outcome: object
  score: float


def search_on_val(candidates, run_candidate, config, name, stop: bool = True) -> tuple[list, int]:
  """Runs `run_candidate` (candidate, those tried -> (outcome, val mIoU)) on each candidate in
  turn: one replaces the best so far only when it `beats` it; with `stop`, the first that does
  not ends the search (candidates cost more as they go: a larger side, a wider band, one more
  round). `name(candidate)` names it in the log. (Every candidate tried, the best's index.)"""
  tried, best = [], 0
  for candidate in candidates:
    tried.append(Tried(candidate, *run_candidate(candidate, tried)))
    if len(tried) == 1:
      continue
    improved = beats(tried[-1].score, tried[best].score, config)
    print(f"{name(candidate)}: val mIoU {tried[-1].score:.3f} "
          f"({'best so far' if improved else 'no better'})", flush=True)
    if improved:
      best = len(tried) - 1
    elif stop:
      break
  return tried, best


def band_widths(config) -> tuple[float, ...]:
  """The ignore-band widths to try: ignore_band.width is one width or "auto" (each of
  ignore_band.widths in turn while the segmenter's val mIoU improves; without val masks only the
  pseudo-mask section's own width)."""
  text = str(config.ignore_band.width).strip().lower()
  own = float(config.pseudo_masks.ignore_band)
  if text != "auto":
    try:
      width = float(text)
    except ValueError:
      width = -1.0
    if not 0 <= width < 1:
      raise UserError(f"ignore_band.width={config.ignore_band.width!r} is not a width in [0, 1) "
                      f"of the map scores or 'auto'")
    return (width,)
  if config.supervision != "pseudo" or not data_pipeline.has_masks(config.segment.data, "val"):
    return (own,)
  widths = tuple(float(w) for w in config.ignore_band.widths)
  if not widths or any(not 0 <= w < 1 for w in widths) or list(widths) != sorted(widths):
    raise UserError(f"ignore_band.widths={list(widths)}: band=auto tries rising widths in [0, 1)")
  if own:
    raise UserError(f"pseudo_masks.ignore_band={own:g} and band=auto (widths {list(widths)}): "
                    f"give configs/pipeline.py:band={own:g} for one width")
  return widths


class BandRun(NamedTuple):
  """A segmenter trained on the pseudo masks of one ignore-band width."""
  width: float
  segment: dict        # its summary
  pseudo_masks: dict   # the masks' summary
  data: tuple          # the segment section's masks_dir, mask_layers, loss_weights


def run_band_widths(config, workdir: str, result: dict, dispatch, erasing, widths: tuple) -> None:
  """A segmenter per ignore-band width after the first (pseudo_masks_band<w>/,
  segment_band<w>/) until one is no better on val; the width of the best val mIoU is the
  pipeline's from here on (its masks, its segmenter, the test tiles' pseudo masks)."""
  pm, seg = config.pseudo_masks, config.segment

  def run_width(width, tried):
    if not tried:  # the pipeline's own segmenter learnt from the first width's masks
      return BandRun(width, result["segment"], result["pseudo_masks"],
                     section_data(seg)), result["segment"]["val"]["mIoU"]
    pm.ignore_band = width
    pm_dir = os.path.join(workdir, f"pseudo_masks_band{width:g}")
    summary = (pseudo_masks_done(pm_dir, pm.classifier_workdir, config.classify.data.num_train,
                                 erasing, pm) or dispatch.run(pm, pm_dir))
    learn_from(seg, os.path.join(pm_dir, "masks"), config.segment_layer, summary)
    out = run_segment(dispatch, seg, os.path.join(workdir, f"segment_band{width:g}"))
    return BandRun(width, out, summary, section_data(seg)), out["val"]["mIoU"]

  tried, kept = search_on_val(widths, run_width, config, lambda w: f"ignore band {w:g}")
  best = tried[kept].outcome
  pm.ignore_band = best.width
  seg.data.masks_dir, seg.data.mask_layers, seg.loss_weights = best.data
  result["segment"], result["pseudo_masks"] = best.segment, best.pseudo_masks
  result["ignore_band"] = {"widths": [{"width": t.candidate, "val_mIoU": t.score}
                                      for t in tried], "kept": best.width}


def run_segment(dispatch, seg, workdir: str) -> dict:
  """The segment phase in `workdir` (its summary, with that workdir: the band and round
  searches keep one of several), refused where a run there learnt from other masks (being
  finished, it would only be re-tested, and its scores would be another recipe's)."""
  recorded = run_record.recorded_config(workdir)
  if recorded:
    for name, old, new in (
        ("supervision", recorded.get("supervision"), seg.supervision),
        ("data.masks_dir", recorded["data"].get("masks_dir"),  # full supervision records none
         seg.data.masks_dir if seg.supervision != "full" else ""),
        ("data.mask_layers", recorded["data"].get("mask_layers"), list(seg.data.mask_layers)),
        ("data.image_size", recorded["data"].get("image_size"), seg.data.image_size)):
      if old != new:
        raise UserError(f"{workdir} holds a segmenter trained with {name}={old}; the pipeline "
                        f"now trains it with {name}={new}: delete {workdir} (or give another "
                        f"--workdir) to train it again")
  return dict(dispatch.run(seg, workdir), workdir=workdir)


def section_data(seg) -> tuple:
  """What the segmenter learns from: (masks_dir, mask_layers, loss_weights)."""
  return seg.data.masks_dir, tuple(seg.data.mask_layers), tuple(seg.loss_weights)


def run_self_training(config, workdir: str, result: dict, dispatch) -> None:
  """Rounds of self-training (segment_round<r>/): each segmenter learns from the previous one's
  confident labels of the training tiles; the round of the best val mIoU is the result."""
  rounds, auto = self_training_rounds(config)

  def run_round(r, tried):
    if not tried:  # round 0: the segmenter on the pseudo masks
      return result["segment"], result["segment"]["val"]["mIoU"]
    section = config.segment.copy_and_resolve_references()
    section.data.masks_dir = tried[-1].outcome["self_labels"]["masks_dir"]
    section.data.mask_layers, section.loss_weights = (SELF_LAYER,), (1.0,)
    section.self_labels.write = r < rounds
    out = run_segment(dispatch, section, os.path.join(workdir, f"segment_round{r}"))
    return out, out["val"]["mIoU"]

  tried, kept = search_on_val(range(rounds + 1), run_round, config,
                              lambda r: f"self-training round {r}", stop=auto)
  result["segment"] = tried[kept].outcome
  result["self_training"] = {"rounds": [{"round": t.candidate, "val_mIoU": t.score,
                                         "test": t.outcome["test"]} for t in tried],
                             "kept": kept}


def run_classifier(config, dirs: Dirs, result: dict, dispatch) -> None:
  """[pretrain ->] classify; a finished pretrain run named by pretrain_workdir is only read."""
  if config.run_pretrain:
    result["pretrain"] = _summary(dispatch.run(config.pretrain, dirs.pretrain))
    config.classify.model.init_from = dirs.pretrain
  elif config.get("pretrain_workdir"):  # a finished run: its summary, not a new run
    config.classify.model.init_from = os.path.abspath(os.path.expanduser(config.pretrain_workdir))
    result["pretrain"] = {"workdir": config.classify.model.init_from,
                          **_summary(_read_summary(config.classify.model.init_from))}
  result["classify"] = _summary(dispatch.run(config.classify, dirs.classify))


def run_pseudo_masks(config, dirs: Dirs, result: dict, dispatch) -> dict | None:
  """[erasing ->] the training tiles' pseudo masks (kept when current); points the segment
  section at them and its layer. Returns the erasing record the summaries compare."""
  erasing = None
  if config.run_erasing:
    result["erasing"] = dispatch.run(erasing_config(config, dirs.classify), dirs.erasing)
    config.pseudo_masks.erasing_workdir = dirs.erasing
    erasing = {"workdir": os.path.abspath(dirs.erasing),
               "rounds": len(result["erasing"]["rounds"])}
  config.pseudo_masks.classifier_workdir = dirs.classify
  done = pseudo_masks_done(dirs.pseudo_masks, dirs.classify, config.classify.data.num_train,
                           erasing, config.pseudo_masks)
  if done is not None:
    print(f"pseudo masks in {dirs.pseudo_masks} are current; not recomputed", flush=True)
  result["pseudo_masks"] = done or dispatch.run(config.pseudo_masks, dirs.pseudo_masks)
  learn_from(config.segment, os.path.join(dirs.pseudo_masks, "masks"), config.segment_layer,
             result["pseudo_masks"])
  return erasing


def learn_from(seg, masks_dir: str, choice: str, pm_summary: dict) -> None:
  """Points the segment section at a pseudo-mask run's masks and the layer `choice` picks."""
  seg.data.masks_dir = masks_dir
  layer = segment_layer(choice, pm_summary)
  if layer:
    seg.data.mask_layers, seg.loss_weights = (layer,), (1.0,)


def run_affinity(config, dirs: Dirs, result: dict, dispatch) -> None:
  """AffinityNet on the segment section's pseudo-mask layer, then the segmenter learns from the
  random walk's masks."""
  aff, seg = config.affinity, config.segment
  aff.classifier_workdir, aff.pseudo_workdir = dirs.classify, dirs.pseudo_masks
  aff.data.masks_dir = seg.data.masks_dir
  aff.data.mask_layers = (seg.data.mask_layers[-1],)
  aff.data.num_train, aff.method = seg.data.num_train, config.pseudo_masks.method
  result["affinity"] = dispatch.run(aff, dirs.affinity)
  seg.data.masks_dir = result["affinity"]["masks_dir"]
  seg.data.mask_layers, seg.loss_weights = (result["affinity"]["mask_layer"],), (1.0,)


def run_test_pseudo_masks(config, dirs: Dirs, result: dict, erasing, workdir: str,
                          dispatch) -> None:
  """The test tiles' own pseudo masks: their scores, and overlays.png beside the segmenter."""
  seg = config.segment
  test_pm = config.pseudo_masks.copy_and_resolve_references()
  test_pm.split, test_pm.data.num_test = seg.test_split, seg.data.num_test
  result["pseudo_masks_test"] = (
      pseudo_masks_done(dirs.pseudo_masks_test, dirs.classify, seg.data.num_test, erasing,
                        test_pm)
      or dispatch.run(test_pm, dirs.pseudo_masks_test))
  # the pseudo-mask layer the segmenter learnt from (through AffinityNet, or its self labels)
  layer = result.get("affinity", {}).get("layer") or seg.data.mask_layers[-1]
  result["mask_layer"] = layer
  if parallel.is_main_process():
    save_overlays(workdir, result["segment"]["workdir"], dirs, layer,
                  result["pseudo_masks_test"].get("palette") or "luad", seg.data.num_classes,
                  result["pseudo_masks_test"])


def segment_layer(choice: str, pm_summary: dict) -> str | None:
  """The one pseudo-mask layer the segmenter learns from: `choice` when it names a layer the
  pseudo-mask run wrote; for "auto" the layer of the best validation mIoU where the run swept
  alpha on validation masks (with the CRF where crf.validate kept it); None ("section", or "auto"
  without a sweep): the segment section's own mask_layers."""
  written = pm_summary.get("layers_written", [])
  if choice not in ("section", "auto"):
    if choice not in written:
      raise UserError(f"segment_layer={choice!r}: the pseudo-mask run wrote {written}")
    return choice
  sweep = pm_summary.get("alpha_sweep") or {}
  if choice != "auto" or not sweep:
    return None
  best = max(sweep, key=lambda layer: val_score(sweep[layer]))
  print(f"segment_layer=auto: the segmenter learns from {best} (val pseudo-mask mIoU "
        f"{val_score(sweep[best]):.3f})", flush=True)
  return best


def erasing_config(config, classify_dir: str):
  """The erasing phase's config: its rounds train the pipeline's classifier on erased tiles,
  and the classify run already done is round 0."""
  er = config.erasing.copy_and_resolve_references()
  with er.unlocked():
    er.classify = config.classify.copy_and_resolve_references()
    er.classify.data.report_dir = ""  # each round's own workdir
    er.erasing.round0_workdir = classify_dir
  return er


def save_overlays(workdir: str, segment_dir: str, dirs: Dirs, layer: str, palette_name: str,
                  num_classes: int, pm_summary: dict) -> None:
  """overlays.png: image | ground truth | pseudo mask (`layer`) | prediction of the pipeline's
  segmenter (in `segment_dir`) for the test tiles the segment phase kept, blended over the
  image, with a legend."""
  path = os.path.join(segment_dir, "overlays", "test.npz")
  if not os.path.exists(path):
    return
  shown = np.load(path)
  palette = mask_files.palette_bytes(palette_name, num_classes + 1)
  items = []
  for image, truth, pred, name in zip(shown["image"], shown["truth"], shown["prediction"],
                                      shown["name"]):
    pm = mask_files.read_mask(os.path.join(dirs.pseudo_masks_test, "masks", layer,
                                      mask_files.file_stem(str(name)) + ".png"), truth.shape,
                         num_classes)
    items.append((image, truth, {f"pseudo mask {layer}": pm, "segmenter": pred}))
  figure = overlays.mask_figure(items, palette, pm_summary["class_names"],
                                f"test tiles: {pm_summary['method']} pseudo masks "
                                f"(background {pm_summary['background_rule']}) and the segmenter")
  overlays.save(os.path.join(workdir, "overlays.png"), figure)


def _read_summary(workdir: str) -> dict:
  """The run's summary.json, or {} when there is none (or it cannot be read)."""
  try:
    with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def _summary(s: dict) -> dict:
  """A phase summary without its bulky per-class fields."""
  return {k: v for k, v in s.items() if "/" not in k or k.startswith("val/m")}
