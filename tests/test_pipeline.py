"""The whole pipeline (configs/pipeline.py) end to end on tiny settings: erasing, the upper
bound, resume, the paper and pretrain arguments, a CNN pretext run as the encoder."""
import json
import os

import ml_collections
import numpy as np
import pytest
from conftest import load_config, tiny_pipeline_config
from PIL import Image

from wsss_jax import runner
from wsss_jax.data import mask_files, pipeline as data_pipeline
from wsss_jax.errors import UserError
from wsss_jax.phases import pipeline
from wsss_jax.runner import run_phase


def _tiny_erasing_pipeline():
  config = tiny_pipeline_config("erasing=2,upper_bound=True,paper=True,affinity=True")
  config.erasing.erasing.max_erased, config.erasing.erasing.stop_ratio = 0.99, 0.01
  aff = config.affinity
  aff.model.width, aff.data.image_size, aff.batch_size, aff.num_epochs = 0.0625, 32, 8, 1
  aff.data.tile_size, aff.data.num_threads, aff.async_checkpointing = 48, 1, False
  return config


def test_pipeline_end_to_end_with_erasing_affinity_upper_bound_and_resume(tmp_path):
  """The whole pipeline once, with adversarial erasing (2 rounds), AffinityNet and the
  ground-truth upper bound: its classifier is erasing's round 0, round 1 trains on tiles erased
  where round 0's maps were high, the pseudo masks fuse both rounds, AffinityNet learns from
  their banded layer and the segmenter from its random walk's masks, and a re-run resumes every
  phase and recomputes nothing. paper=True: the default adds SEAM and the CRF, each tested in
  its phase, and costs this test 75 s more (under load)."""
  result = pipeline.run(_tiny_erasing_pipeline(), str(tmp_path), dispatch=runner.DISPATCH)
  config_of = lambda phase: json.load(open(tmp_path / phase / "config.json"))  # noqa: E731
  text = open(tmp_path / "table.md").read()
  for row in ("| train | b4_5 |", "| train | bn7 |", "| test | bn7 |", "| pseudo | off |",
              "| pseudo | exclude |", "| full | off |", "Adversarial erasing: 2 round(s) fused"):
    assert row in text
  from wsss_jax.outputs import \
    overlays  # 48 px tiles drawn at a legible 192 px, with headers and a legend
  width, height = Image.open(tmp_path / "overlays.png").size
  assert width == 4 * overlays.MIN_SIDE + 5 * overlays.GAP  # image, truth, pseudo mask, segmenter
  assert 6 * overlays.MIN_SIDE < height < 6 * overlays.MIN_SIDE + 200  # 6 tiles
  assert result["segment"]["supervision"] == "pseudo"
  assert result["segment_full"]["supervision"] == "full"
  # AffinityNet learnt from the banded pseudo masks, the segmenter from its random walk
  assert config_of("pseudo_masks")["ignore_band"] == 0.1  # it learns from confident pixels
  seg = config_of("segment")["data"]
  assert seg["masks_dir"] == str(tmp_path / "affinity" / "masks") and seg["mask_layers"] == ["rw"]
  aff = config_of("affinity")
  assert aff["pseudo_workdir"] == str(tmp_path / "pseudo_masks")
  assert aff["data"]["mask_layers"] == [result["affinity"]["layer"]]
  assert len(os.listdir(tmp_path / "affinity" / "masks" / "rw")) == 32  # every training tile
  assert "| train | rw (random walk of" in text
  # erasing: round 0 is the pipeline's classifier, not trained again; the masks fuse both rounds
  work, classify = tmp_path / "erasing", str(tmp_path / "classify")
  summary = result["erasing"]
  assert summary["rounds"] == [classify, str(work / "round_1")]
  assert not (work / "round_0").exists()
  assert json.load(open(work / "erasing.json"))["rounds"] == summary["rounds"]
  assert 0 < summary["report"][0]["erased_fraction_next"] <= 0.99
  assert result["pseudo_masks"]["erasing"] == {"workdir": str(work), "rounds": 2}
  assert result["pseudo_masks"]["classifier"] == classify
  assert result["pseudo_masks_test"]["erasing"]["rounds"] == 2
  # round 1 saw the mean colour exactly where erased/round_1 says
  r1 = json.load(open(work / "round_1" / "config.json"))["data"]
  assert r1["erase_dir"] == str(work / "erased" / "round_1")
  assert r1["report_dir"] == str(work / "round_1")
  data = ml_collections.ConfigDict(r1)
  erased = data_pipeline.build_source(data, "train")
  plain = data_pipeline.build_source(ml_collections.ConfigDict(dict(r1, erase_dir="")), "train")
  fill = np.round(np.asarray(data.mean) * 255).astype(np.uint8)
  for i in range(4):
    region = mask_files.read_binary(erased._path(i), (48, 48))
    np.testing.assert_array_equal(erased[i]["image"][region], np.tile(fill, (region.sum(), 1)))
    np.testing.assert_array_equal(erased[i]["image"][~region], plain[i]["image"][~region])
  # a re-run resumes every phase and finds the pseudo masks current: nothing is written again
  mask = tmp_path / "pseudo_masks" / "masks" / "bn7" / "synthetic_train_3.png"
  written = os.path.getmtime(mask)
  again = pipeline.run(_tiny_erasing_pipeline(), str(tmp_path), dispatch=runner.DISPATCH)
  assert os.path.getmtime(mask) == written
  assert again["erasing"]["rounds"] == summary["rounds"]
  assert again["classify"]["resumed_from"] == again["classify"]["steps"]
  assert again["affinity"]["resumed_from"] == again["affinity"]["steps"]
  assert again["segment"]["resumed_from"] == again["segment"]["steps"]
  assert again["segment"]["test"] == result["segment"]["test"]

  # pseudo masks of a one-round plan are exactly the plain classifier's
  def pseudo(arg, out):
    pm = load_config("pseudo_masks", arg)
    pm.data.num_train = 8
    return run_phase(pm, str(tmp_path / out))

  one = tmp_path / "one_round"
  one.mkdir()
  plan = json.load(open(work / "erasing.json"))
  plan["rounds"] = [classify]
  json.dump(plan, open(one / "erasing.json", "w"))
  pseudo(f"erasing={one}", "pm1")
  pseudo(f"classifier={classify}", "pm0")
  for layer in ("b4_5", "bn7"):
    for name in os.listdir(tmp_path / "pm0" / "masks" / layer):
      a = mask_files.read_mask(str(tmp_path / "pm0" / "masks" / layer / name), (48, 48), 4)
      b = mask_files.read_mask(str(tmp_path / "pm1" / "masks" / layer / name), (48, 48), 4)
      np.testing.assert_array_equal(a, b)


def test_pipeline_paper_and_pretrain_arguments_and_a_workdir_without_checkpoints(tmp_path):
  modes = {arg: load_config("pipeline", f"pretrain={arg}") for arg in
           ("False", "True", "scratch", str(tmp_path))}
  assert modes["False"].classify.model.backbone == "resnet38"
  paper = load_config("pipeline", "paper=True")
  assert paper.classify.equivariance.weight == 0 and not paper.pseudo_masks.crf.enabled
  assert paper.segment.loss_weights == (0.2, 0.2, 0.6)
  assert modes["False"].classify.equivariance.weight == 1.0  # the default: SEAM, CRF, b4_5
  assert modes["False"].pseudo_masks.crf.enabled
  assert modes["False"].segment.data.mask_layers == ("b4_5",)
  assert modes["False"].segment.loss_weights == (1.0,)
  assert not modes["False"].run_pretrain and not modes["False"].pretrain_workdir
  assert modes["True"].run_pretrain and not modes["True"].pretrain_workdir
  assert not modes["scratch"].run_pretrain and not modes["scratch"].pretrain_workdir
  assert modes[str(tmp_path)].pretrain_workdir == str(tmp_path)
  for arg in ("True", "scratch", str(tmp_path)):
    assert modes[arg].classify.model.backbone == "vit"
    assert modes[arg].pseudo_masks.scales == (1.0,)
    assert modes[arg].classify.equivariance.weight == 0  # SEAM needs a CNN's class maps
  with pytest.raises(UserError, match=f"pretrain_workdir={tmp_path}: no pretrain checkpoints"):
    pipeline.run(modes[str(tmp_path)], str(tmp_path / "run"), dispatch=runner.DISPATCH)
  (tmp_path / "checkpoints").mkdir()
  both = modes[str(tmp_path)]
  both.run_pretrain = True
  with pytest.raises(UserError, match="run_pretrain and pretrain_workdir"):
    pipeline.run(both, str(tmp_path / "run"), dispatch=runner.DISPATCH)
  assert not (tmp_path / "run").exists()  # refused before anything is written


def test_pipeline_from_a_cnn_pretext_run_needs_its_encoder_and_width(tmp_path):
  def pretext_run(name, model):
    (tmp_path / name / "checkpoints").mkdir(parents=True)
    (tmp_path / name / "config.json").write_text(json.dumps({"phase": "pretrain", "model": model}))
    return str(tmp_path / name)

  r38 = pretext_run("r38", {"encoder": "resnet38", "width": 0.25})
  with pytest.raises(UserError, match=f"encoder='resnet38' of width 0.25; the pipeline's "
                                      f"classifier is 'vit' of width 0.125: give configs/"
                                      f"pipeline.py:pretrain={r38},encoder=resnet38,width=0.25$"):
    pipeline.run(load_config("pipeline", f"pretrain={r38}"), str(tmp_path / "run"),
                 dispatch=runner.DISPATCH)
  with pytest.raises(UserError, match="of width 0.25; the pipeline's classifier is 'resnet38' "
                                      "of width 0.5"):
    pipeline.validate(load_config("pipeline", f"pretrain={r38},encoder=resnet38,width=0.5"))
  cnn = load_config("pipeline", f"pretrain={r38},encoder=resnet38,width=0.25")
  pipeline.validate(cnn)
  assert cnn.classify.model.backbone == "resnet38" and cnn.classify.model.width == 0.25
  assert cnn.segment.model.width == 0.25  # the segmenter starts from that classifier
  assert cnn.classify.equivariance.weight == 1.0 and cnn.pseudo_masks.scales == (1.0, 1.5, 2.0)
  r50 = load_config("pipeline", "pretrain=" + pretext_run("r50", {"encoder": "resnet50",
                                                                  "width": 0.125}))
  with pytest.raises(UserError, match="pretrained model.encoder='resnet50'; the pipeline's "
                                      "classifier starts from a ViT run or a ResNet38"):
    pipeline.run(r50, str(tmp_path / "run"), dispatch=runner.DISPATCH)
  assert not (tmp_path / "run").exists()


def test_config_sections_take_keyword_overrides_checked_like_text(tmp_path):
  import importlib.util

  from conftest import load_config as load
  spec = importlib.util.spec_from_file_location(
      "classify_cfg", os.path.join(os.path.dirname(__file__), "..", "configs", "classify.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  by_text = module.get_config("backbone=vit,epochs=3,seam=True,width=1")
  by_keyword = module.get_config(backbone="vit", epochs=3, seam=True, width=1)
  assert by_text.to_json(sort_keys=True) == by_keyword.to_json(sort_keys=True)
  assert by_keyword.num_epochs == 3 and by_keyword.equivariance.weight == 1.0
  with pytest.raises(UserError, match="config argument epochs='3x' is not a valid int"):
    module.get_config(epochs="3x")
  with pytest.raises(UserError, match="config argument seam=2 is not a valid bool"):
    module.get_config(seam=2)
  with pytest.raises(UserError, match="config argument 'epoch' is unknown"):
    module.get_config(epoch=3)
  assert load("pipeline").erasing.get("classify") is None  # the pipeline's classify trains it


def test_input_side_band_width_and_rounds_are_chosen_on_val(tmp_path):
  """The finding recipe's three choices on val in one run. image_size=auto over sides 32 and 48:
  a classifier and its pseudo masks at each (the second in size48/), the side of the better val
  pseudo masks kept (by the rule re-implemented below) with its classifier and masks for the
  segmenter. band=auto over widths 0 and 0.1: a segmenter on each width's masks, the kept width's
  masks and segmenter go on. rounds=2: the kept segmenter's confident labels teach round 1,
  round 1's teach round 2; the round of the best val mIoU is the pipeline's. table.md names
  every choice, and every pseudo-mask run is current for a re-run."""
  def config():
    out = tiny_pipeline_config("dataset=synthetic_lesions,image_size=auto,band=auto,rounds=2")
    out.image_sizes, out.ignore_band.widths = (32, 48), (0.0, 0.1)
    pm = out.pseudo_masks  # the choices, not the refinements, are under test
    pm.scales, pm.crf.enabled, pm.par.enabled = (1.0,), False, False
    out.val_min_gain = -0.01  # a later candidate is kept unless clearly worse: both paths run
    return out
  result = run_phase(config(), str(tmp_path))  # as main runs it: config.json written
  gain = config().val_min_gain
  scores = {}
  for side, sub in ((32, tmp_path), (48, tmp_path / "size48")):
    pm = json.load(open(sub / "pseudo_masks" / "summary.json"))
    scores[side] = max(pipeline.val_score(s) for s in pm["alpha_sweep"].values())
    assert json.load(open(sub / "classify" / "config.json"))["data"]["image_size"] == side
  assert [(t["side"], t["val_mIoU"]) for t in result["image_size"]["sides"]] == list(
      scores.items())
  side = (32, 48)[_kept(list(scores.values()), gain)]
  assert result["image_size"]["kept"] == side
  classify = str(tmp_path / ("classify" if side == 32 else "size48/classify"))
  seg = json.load(open(tmp_path / "segment" / "config.json"))
  assert seg["data"]["image_size"] == side and seg["gate"]["classifier_workdir"] == classify
  assert seg["data"]["masks_dir"] == str(tmp_path / (
      "pseudo_masks" if side == 32 else "size48/pseudo_masks") / "masks")

  band = result["ignore_band"]
  assert [h["width"] for h in band["widths"]] == [0.0, 0.1]
  assert band["kept"] == (0.0, 0.1)[_kept([h["val_mIoU"] for h in band["widths"]], gain)]
  banded = json.load(open(tmp_path / "segment_band0.1" / "config.json"))["data"]
  assert banded["masks_dir"] == str(tmp_path / "pseudo_masks_band0.1" / "masks")
  pm_band = json.load(open(tmp_path / "pseudo_masks_band0.1" / "summary.json"))
  assert pm_band["ignore_band"] == 0.1 and pm_band["classifier"] == classify
  assert 0 < max(pm_band["ignored_share"].values()) < 1
  test_pm = json.load(open(tmp_path / "pseudo_masks_test" / "config.json"))
  assert test_pm["classifier_workdir"] == classify and test_pm["ignore_band"] == band["kept"]

  kept = "segment" if band["kept"] == 0 else "segment_band0.1"
  rounds = result["self_training"]["rounds"]
  assert [h["round"] for h in rounds] == [0, 1, 2]
  assert rounds[0]["val_mIoU"] == next(h["val_mIoU"] for h in band["widths"]
                                       if h["width"] == band["kept"])
  best = rounds[_kept([h["val_mIoU"] for h in rounds], gain, stop=False)]
  assert result["self_training"]["kept"] == best["round"]
  assert result["segment"]["test"] == best["test"]
  # overlays.png and benchmarks/pipeline_figure.py draw the kept segmenter, not segment/'s
  kept_dir = f"segment_round{best['round']}" if best["round"] else kept
  assert result["segment"]["workdir"] == str(tmp_path / kept_dir)
  assert result["mask_layer"] == json.load(open(tmp_path / kept / "config.json"))["data"][
      "mask_layers"][-1]
  # predict's model=<the pipeline's workdir> is that segmenter too, wherever the run moves
  from wsss_jax.device import parallel as device_parallel
  from wsss_jax.train import earlier_runs
  moved = tmp_path.parent / "moved"
  os.rename(tmp_path, moved)
  try:
    loaded = earlier_runs.load_segmenter(str(moved), device_parallel.make_mesh(1))
    assert loaded.workdir == str(moved / kept_dir) and loaded.config["phase"] == "segment"
    os.rename(moved / "summary.json", moved / "kept.json")  # an unfinished pipeline run
    with pytest.raises(UserError, match="is a pipeline run without a finished summary.json"):
      earlier_runs.load_segmenter(str(moved), device_parallel.make_mesh(1))
    os.rename(moved / "kept.json", moved / "summary.json")
    from benchmarks import pipeline_figure
    from wsss_jax.outputs import overlays
    figure = pipeline_figure.figure_rows(str(moved), 2, "gradcam")  # its classifier moved too
    shown = np.load(moved / kept_dir / "overlays" / "test.npz")
    for row, image, prediction in zip(figure.rows, shown["image"], shown["prediction"]):
      np.testing.assert_array_equal(row[3], overlays.blend(image, prediction, figure.palette, 1))
  finally:
    os.rename(moved, tmp_path)
  r1 = json.load(open(tmp_path / "segment_round1" / "config.json"))
  assert r1["data"]["masks_dir"] == str(tmp_path / kept / "self_labels" / "masks")
  assert r1["data"]["mask_layers"] == ["self"] and r1["self_labels"]["write"]
  assert not json.load(open(tmp_path / "segment_round2" / "config.json"))["self_labels"]["write"]
  labels = os.listdir(tmp_path / kept / "self_labels" / "masks" / "self")
  assert len(labels) == config().classify.data.num_train
  text = open(tmp_path / "table.md").read()
  assert f"kept {side} px" in text and "Ignore band (the segmenter's" in text
  assert "Self-training (val mIoU per round" in text

  # what a re-run resumes by: every pseudo-mask run here is current for its section
  for sub, width in ((tmp_path / "pseudo_masks", 0.0), (tmp_path / "pseudo_masks_band0.1", 0.1)):
    section = ml_collections.ConfigDict(json.load(open(sub / "config.json")))
    assert section.ignore_band == width
    assert pipeline.pseudo_masks_done(str(sub), section.classifier_workdir,
                                      config().classify.data.num_train, None, section)


def _kept(scores, gain, stop=True):
  """The choice rule by hand: a candidate replaces the best so far when its val score is more
  than `gain` above it; with `stop`, the first that is not ends the search."""
  best = 0
  for i in range(1, len(scores)):
    if scores[i] > scores[best] + gain:
      best = i
    elif stop:
      break
  return best


def test_the_search_on_val_keeps_a_candidate_only_for_more_than_the_minimum_gain():
  """search_on_val (sides, widths, rounds) against the rule by hand on random val scores: which
  candidates run, which is kept, each run seeing those tried before it."""
  config = ml_collections.ConfigDict({"val_min_gain": 0.005})
  rng = np.random.default_rng(0)
  for _ in range(200):
    scores = list(np.round(0.5 + rng.normal(0, 0.01, rng.integers(1, 6)), 3))
    for stop in (True, False):
      seen = []

      def run(i, tried):
        assert [t.candidate for t in tried] == list(range(i))
        seen.append(i)
        return f"run {i}", scores[i]
      tried, kept = pipeline.search_on_val(range(len(scores)), run, config, str, stop=stop)
      assert kept == _kept(scores, 0.005, stop) and tried[kept].outcome == f"run {kept}"
      ran = len(scores)
      if stop:  # up to and including the first candidate no better than the best before it
        ran = next((i + 1 for i in range(1, len(scores))
                    if _kept(scores[:i + 1], 0.005) != i), len(scores))
      assert seen == list(range(ran))


def test_rounds_and_band_choices_are_checked_before_work():
  for gain in (1.5, -1.0):
    config = tiny_pipeline_config()
    config.val_min_gain = gain
    with pytest.raises(UserError, match=f"val_min_gain={gain!r} is not a difference of val"):
      pipeline.validate(config)
  with pytest.raises(UserError, match="self_training.rounds='two' is not a number"):
    pipeline.validate(tiny_pipeline_config("rounds=two"))
  with pytest.raises(UserError, match="relabels pseudo masks; supervision=full has none"):
    pipeline.validate(tiny_pipeline_config("rounds=2,supervision=full"))
  full = tiny_pipeline_config("rounds=auto,supervision=full,band=auto")  # the default: none run
  pipeline.validate(full)
  assert pipeline.self_training_rounds(full) == (0, False)
  assert pipeline.band_widths(full) == (0.0,)
  assert pipeline.band_widths(tiny_pipeline_config("band=auto")) == (0.0, 0.1, 0.2)
  assert pipeline.band_widths(tiny_pipeline_config("band=0.15")) == (0.15,)
  for band in ("wide", "1.5", "-0.1"):
    with pytest.raises(UserError, match=f"ignore_band.width='{band}' is not a width in"):
      pipeline.validate(tiny_pipeline_config(f"band={band}"))
  both = tiny_pipeline_config("band=auto")
  both.pseudo_masks.ignore_band = 0.1
  with pytest.raises(UserError, match="ignore_band=0.1 and band=auto .*:band=0.1 for one width"):
    pipeline.validate(both)
  both.pseudo_masks.ignore_band, both.ignore_band.widths = 0.0, (0.2, 0.1)
  with pytest.raises(UserError, match=r"widths=\[0.2, 0.1\]: band=auto tries rising widths"):
    pipeline.validate(both)
  with pytest.raises(UserError, match="affinity learns from the confident pixels of one banded"):
    pipeline.validate(tiny_pipeline_config("affinity=True,band=auto"))


def test_pseudo_masks_are_recomputed_when_their_settings_change(tmp_path):
  """A re-run keeps the pseudo masks only when their recorded config.json is the section's
  (the runner's report_dir aside): a changed refinement is never served stale masks."""
  section = load_config("pseudo_masks", "classifier=runs/cls")
  recorded = section.copy_and_resolve_references()
  recorded.data.report_dir = str(tmp_path)
  (tmp_path / "config.json").write_text(recorded.to_json_best_effort())
  assert pipeline._same_settings(str(tmp_path), section)
  section.par.enabled = True
  assert not pipeline._same_settings(str(tmp_path), section)
  assert not pipeline._same_settings(str(tmp_path / "missing"), section)
  # a run recorded before a field existed (added with the old behaviour as its default) is kept
  section.par.enabled = False
  older = json.loads(recorded.to_json_best_effort())
  del older["nan_policy"], older["data"]["intensity"]
  (tmp_path / "config.json").write_text(json.dumps(older))
  assert pipeline._same_settings(str(tmp_path), section)


def test_affinity_needs_the_resnet38_trunk():
  with pytest.raises(UserError, match="AffinityNet's trunk is the ResNet38"):
    pipeline.validate(tiny_pipeline_config("pretrain=scratch,affinity=True"))
  assert tiny_pipeline_config("affinity=True").ignore_band.width == "0.1"


def test_the_upper_bound_of_a_self_training_pipeline_is_a_valid_full_supervision_run():
  """With self-training (the default rounds=auto) the weak segmenter writes self labels; its
  ground-truth copy for upper_bound=True must not (the segment phase refuses that)."""
  config = tiny_pipeline_config("upper_bound=True,rounds=auto")
  config.segment.self_labels.write = True  # as the pipeline sets it before the weak segmenter
  full = pipeline.full_supervision(config.segment)
  assert full.supervision == "full" and not full.self_labels.write
  runner.DISPATCH.validate(full)
  with pytest.raises(UserError, match="self_labels.write relabels"):
    broken = full.copy_and_resolve_references()
    broken.self_labels.write = True
    runner.DISPATCH.validate(broken)


def test_a_segmenter_that_learnt_from_other_masks_is_not_resumed_as_this_recipes(tmp_path):
  """A finished segment run is only re-tested on resume; where the pipeline now asks for other
  masks (another band width kept, another round's labels), its scores would be another
  recipe's: refused in one line naming the directory and the field."""
  seg = tiny_pipeline_config().segment
  seg.data.masks_dir = str(tmp_path / "pseudo_masks_band0.1" / "masks")
  recorded = seg.copy_and_resolve_references()
  recorded.data.masks_dir = str(tmp_path / "pseudo_masks" / "masks")
  (tmp_path / "segment").mkdir()
  (tmp_path / "segment" / "config.json").write_text(recorded.to_json_best_effort())
  with pytest.raises(UserError, match=r"segment holds a segmenter trained with data.masks_dir="
                                      r".*pseudo_masks/masks; the pipeline now trains it with "
                                      r"data.masks_dir=.*band0.1/masks: delete "):
    pipeline.run_segment(runner.DISPATCH, seg, str(tmp_path / "segment"))
  full = pipeline.full_supervision(seg)
  recorded = full.copy_and_resolve_references()
  recorded.data.masks_dir, recorded.data.image_size = "", 48  # as the segment phase records it
  (tmp_path / "segment" / "config.json").write_text(recorded.to_json_best_effort())
  with pytest.raises(UserError, match="trained with data.image_size=48; .* data.image_size=32"):
    pipeline.run_segment(runner.DISPATCH, full, str(tmp_path / "segment"))


def test_a_full_supervision_pipeline_runs_segmenter_is_found_without_pseudo_masks(tmp_path):
  """supervision=full writes no pseudo_masks_test: its kept segmenter is still the model
  predict finds, and the figure's classifier is refused in one line."""
  from wsss_jax.train import earlier_runs
  (tmp_path / "summary.json").write_text(json.dumps(
      {"phase": "pipeline", "workdir": "/elsewhere/run",
       "segment": {"workdir": "/elsewhere/run/segment"}}))
  assert earlier_runs.pipeline_segmenter(str(tmp_path), "model") == str(tmp_path / "segment")
  with pytest.raises(UserError, match="without pseudo masks \\(supervision=full\\)"):
    earlier_runs.pipeline_classifier(str(tmp_path), "--workdir")
  (tmp_path / "summary.json").write_text(json.dumps({"phase": "pipeline"}))  # unfinished
  with pytest.raises(UserError, match="without a finished summary.json"):
    earlier_runs.pipeline_segmenter(str(tmp_path), "model")
