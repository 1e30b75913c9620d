import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config

from wsss_jax.data import folders
from wsss_jax.device import hlo_report, profiler
from wsss_jax.errors import UserError
from wsss_jax.phases import benchmark
from wsss_jax.tasks import segment

def _config(batch):
  config = load_config("benchmark", f"variant=mu/8,image_size=32,batch={batch},steps=2,"
                       "warmup=1,paper=False")
  config.num_devices = 1
  config.matmul_size = 256
  return config


def test_benchmark_reports_flops_throughput_and_mfu(tmp_path):
  small = benchmark.run(_config(8), str(tmp_path))
  assert json.load(open(tmp_path / "benchmark.json"))["images_per_sec"] == small["images_per_sec"]
  assert small["images_per_sec"] == pytest.approx(8 / small["step_time_median"])
  assert 0 < small["mfu"] < 2 and small["gflops_per_image"] > 0
  # FLOPs per image are a property of the model, not of the batch size
  large = benchmark.run(_config(16), str(tmp_path))
  assert large["gflops_per_image"] == pytest.approx(small["gflops_per_image"], rel=0.05)


def test_remat_counts_model_flops_for_mfu_and_recomputation_apart(tmp_path):
  plain = benchmark.run(_config(8), str(tmp_path))
  config = _config(8)
  config.model.remat = "block"
  remat = benchmark.run(config, str(tmp_path))
  assert remat["gflops_per_image"] == pytest.approx(plain["gflops_per_image"], rel=1e-6)
  # the forward pass of every block is computed twice: more hardware FLOPs, not model FLOPs
  assert remat["hardware_gflops_per_image"] > 1.1 * plain["hardware_gflops_per_image"]
  assert plain["hardware_gflops_per_image"] == plain["gflops_per_image"]


def test_real_input_reports_the_wait_for_the_grain_pipeline(tmp_path):
  config = _config(8)
  config.real_input = True
  result = benchmark.run(config, str(tmp_path))
  assert 0 < result["data_wait_fraction"] < 1 and result["input_images_per_sec"] > 0
  assert result["input_threads"] == config.data.num_threads
  # (how the fed step compares with the resident one is a speed figure: BENCHMARKS.md, not a test)
  with pytest.raises(UserError, match="real_input=True times the MAE and classifier steps"):
    _small_run("model=mrn,width=0.0625,batch=2,paper=False,real_input=True", tmp_path)


def test_benchmark_rejects_unknown_model(tmp_path):
  config = _config(8)
  config.model.name = "resnet1000"
  with pytest.raises(UserError, match="model.name='resnet1000'"):
    benchmark.run(config, str(tmp_path))


def _small_run(spec: str, tmp_path):
  """(config, result) of a 2-step benchmark of `spec` at 32 px on one device."""
  config = load_config("benchmark", f"{spec},image_size=32,steps=2,warmup=1")
  config.num_devices, config.matmul_size = 1, 256
  return config, benchmark.run(config, str(tmp_path))


@pytest.mark.parametrize("model", ["resnet38", "resnet50", "vit"])
def test_benchmark_times_the_classifiers(model, tmp_path):
  _, result = _small_run(f"model={model},variant=mu/8,width=0.0625,batch=4", tmp_path)
  assert result["model"] == model and result["gflops_per_image"] > 0
  assert result["pda"] is (model != "vit")
  assert result["images_per_sec"] == pytest.approx(4 / result["step_time_median"])


@pytest.mark.parametrize("model", ["deeplabv3plus", "mrn"])
def test_benchmark_times_the_segmenters(model, tmp_path):
  """A train step costs about 3 forward passes (input and weight gradients of every layer)."""
  config, result = _small_run(f"model={model},backbone=resnet38,width=0.0625,batch=2,paper=False",
                              tmp_path)
  assert result["model"] == model and result["images_per_sec"] > 0
  config.data = folders.settle(config.data)
  seg = segment.build_training(config, benchmark.parallel.make_mesh(1))
  state = jax.eval_shape(seg.init_state)  # shapes are all a jaxpr needs
  images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  forward = jax.make_jaxpr(lambda v, x: seg.model.apply(v, x, context=x))(
      {"params": state.params, "batch_stats": state.batch_stats}, images)
  ratio = result["gflops_per_image"] * 1e9 / hlo_report.jaxpr_flops(forward)
  assert 2.5 < ratio < 3.05, ratio


def test_jaxpr_flops_match_closed_forms():
  """Matmul and convolution FLOPs by hand, through jit, remat, scan and a train-step gradient."""
  x, w = jnp.ones((4, 8)), jnp.ones((8, 16))
  assert hlo_report.jaxpr_flops(jax.make_jaxpr(jnp.matmul)(x, w)) == 2 * 4 * 8 * 16

  def conv(img, kernel, stride):
    return jax.lax.conv_general_dilated(img, kernel, (stride, stride), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
  img, kernel = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 5))
  forward = 2 * (2 * 4 * 4 * 5) * (3 * 3 * 3)  # output size x window, stride 2
  assert hlo_report.jaxpr_flops(jax.make_jaxpr(lambda a, k: conv(a, k, 2))(img, kernel)) == forward
  # Gradient w.r.t. kernel and input: each costs as much as the forward pass (the input gradient
  # of the strided conv dilates the cotangent; its zeros are not counted).
  grad = jax.make_jaxpr(jax.grad(lambda a, k: conv(a, k, 2).sum(), argnums=(0, 1)))(img, kernel)
  assert hlo_report.jaxpr_flops(grad) == 3 * forward

  def body(carry, _):
    return jax.checkpoint(lambda c: c @ jnp.ones((8, 8)))(carry), None
  scanned = jax.make_jaxpr(jax.jit(lambda c: jax.lax.scan(body, c, None, length=5)[0]))(x)
  assert hlo_report.jaxpr_flops(scanned) == 5 * 2 * 4 * 8 * 8


def test_profile_summary_attributes_device_time_to_ops(tmp_path):
  """A traced matmul-heavy step: its device time is mostly matmul, shares sum to at most 1."""
  a = jnp.ones((384, 384))
  step = jax.jit(lambda a: jnp.tanh(a @ a @ a).sum())
  step(a).block_until_ready()
  with jax.profiler.trace(str(tmp_path)):
    for _ in range(2):
      step(a).block_until_ready()
  summary = profiler.profile_summary(str(tmp_path), steps=2)
  assert summary["device_busy_ms_per_step"] > 0
  shares = {row["name"]: row["share"] for row in summary["categories"]}
  assert max(shares, key=shares.get) == "matmul"
  assert sum(shares.values()) == pytest.approx(1.0)
  assert profiler.profile_summary(str(tmp_path / "nothing"), steps=1) == {}


_HLO = """HloModule m

%fused_computation (param_0: f32[4,8]) -> f32[4,8] {
  %param_0 = f32[4,8]{1,0} parameter(0)
  ROOT %rsqrt.1 = f32[4,8]{1,0} rsqrt(%param_0), metadata={op_name="jit(step)/blocks_0/norm1/rsqrt"}
}

%add_reducer (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %add = f32[] add(%a, %b), metadata={op_name="jit(step)/blocks_0/norm1/reduce_sum"}
}

ENTRY %main (p: f32[4,8]) -> bf16[4,8] {
  %p = f32[4,8]{1,0} parameter(0)
  %fusion = f32[4,8]{1,0} fusion(%p), kind=kLoop, calls=%fused_computation, metadata={op_name="jit(step)/blocks_0/norm1/rsqrt"}
  %zero = f32[] constant(0)
  %reduce.2 = f32[4]{0} reduce(%fusion, %zero), dimensions={1}, to_apply=%add_reducer, metadata={op_name="jit(step)/blocks_0/norm2/reduce_sum"}
  %erf.3 = f32[4,8]{1,0} erf(%fusion), metadata={op_name="jit(step)/blocks_0/mlp/mlp.activation/erf"}
  ROOT %convert = bf16[4,8]{1,0} convert(%erf.3), metadata={op_name="jit(step)/blocks_0/mlp/mlp.activation/convert"}
}
"""


def test_the_fusion_report_tells_fused_from_unfused_work_by_source():
  report = hlo_report.fusion_report(_HLO)
  norm, gelu = report["layernorm"], report["gelu"]
  assert (norm["fused_ops"], norm["fusions"], norm["unfused_ops"]) == (1, 1, 1)  # norm2's reduce
  assert norm["fusion_output_bytes"] == {"f32": 4 * 8 * 4}
  assert "reduce.2" in norm["unfused"][0]
  assert (gelu["fused_ops"], gelu["unfused_ops"]) == (0, 2)  # the reducer's add is not counted
  assert gelu["unfused_by_op"] == {"erf": 1, "convert": 1}
  assert report["mae_gather"]["fused_ops"] == report["mae_gather"]["unfused_ops"] == 0


@pytest.mark.parametrize("model", ["vit", "mae"])
def test_layernorm_gelu_and_the_mae_gathers_are_fused_in_the_compiled_step(model, tmp_path):
  """XLA:CPU's fusion of the step (GPUs: benchmarks/gpu_suite.sh prints the same report). The
  forward passes are fused whole; what the CPU leaves apart is reported, not hidden: the
  LayerNorm scale's broadcast into the next matmul, the reductions of the LayerNorm parameters'
  gradients, and the gathers' gradient (a scatter-add)."""
  config = _config(4)
  if model == "vit":
    config = load_config("benchmark", "model=vit,variant=mu/8,image_size=32,batch=4,steps=1,"
                                      "warmup=1")
    config.num_devices, config.matmul_size = 1, 256
  fusion = benchmark.run(config, str(tmp_path))["fusion"]
  assert fusion["gelu"]["fused_ops"] > 0 and fusion["gelu"]["unfused_ops"] == 0, fusion["gelu"]
  norm = fusion["layernorm"]
  assert norm["fused_ops"] > 0 and not {"rsqrt", "divide", "subtract"} & set(norm["unfused_by_op"])
  assert set(norm["unfused_by_op"]) <= {"broadcast", "reduce", "multiply"}, norm
  if model == "mae":
    gather = fusion["mae_gather"]
    assert gather["fused_ops"] > 0 and "gather" not in gather["unfused_by_op"], gather


def test_the_ablation_variants_share_the_base_runs_classifier_at_every_side(tmp_path):
  from benchmarks import ablation
  base, out = tmp_path / "base", tmp_path / "band"
  for classifier in ("classify", "size128/classify"):
    (base / classifier / "checkpoints").mkdir(parents=True)
    (base / classifier / "config.json").write_text(classifier)
  (base / "segment").mkdir()
  (out / "classify").mkdir(parents=True)  # already there: kept as it is
  ablation.share_classifiers(str(base), str(out))
  assert sorted(p.name for p in out.iterdir()) == ["classify", "size128"]
  assert not (out / "classify" / "config.json").exists()
  assert (out / "size128" / "classify" / "config.json").read_text() == "size128/classify"


def test_the_ablation_variants_are_the_pipeline_with_their_parts_changed():
  from benchmarks import ablation
  base = ablation.variant_config("synthetic_lesions", "base", 0)
  assert base.upper_bound and base.pseudo_masks.par.enabled  # the finding recipe's own
  off = ablation.variant_config("synthetic_lesions", "nopar+band+image_loss", 128)
  assert not off.upper_bound and not off.pseudo_masks.par.enabled
  assert off.ignore_band.width == "0.1" and off.segment.image_loss.weight == 0.1
  assert base.ignore_band.width == "auto"
  assert ablation.variant_config("synthetic", "noband", 0).ignore_band.width == "0"
  assert off.classify.data.image_size == off.segment.data.image_size == 128
  assert base.self_training.rounds == "auto"
  more = ablation.variant_config("synthetic_cells", "affinity+norounds+scalesval", 0)
  assert more.run_affinity and more.self_training.rounds == "0"
  assert more.pseudo_masks.scales_validate
  assert ablation.variant_config("synthetic_lesions", "median3", 0).pseudo_masks.par.smooth == (
      "median3") and base.pseudo_masks.par.smooth == "none"
  with pytest.raises(UserError, match="'crf' is not one of base, par"):
    ablation.variant_config("synthetic", "par+crf", 0)
  from benchmarks import refinements
  pm = refinements.variant_config("c", "test", 8, "par_validate+median3+band0.2+scalesval", True)
  assert pm.par.enabled and pm.par.validate and pm.par.smooth == "median3"
  assert pm.ignore_band == 0.2 and pm.scales_validate and pm.background.alpha == "auto"
  assert refinements.variant_config("c", "test", 8, "scales1/2", False).scales == (1.0, 2.0)
  with pytest.raises(UserError, match="parts are base, par, par_validate, median3"):
    refinements.variant_config("c", "test", 8, "par+crf", False)
  row = {"mIoU": 0.7, "mDice": 0.8, "finding_IoU": 0.4, "finding_Dice": 0.57}
  text = ablation.table({"synthetic_lesions": {
      "variants": {"base": {"pseudo_masks": row, "segment": row, "segment_full": row}},
      "otsu": {"all images": row}}})
  assert "| synthetic_lesions | base | 0.400 / 0.570 (0.700) |" in text
  assert "Otsu on the image, all images" in text


def test_the_ablation_table_keeps_the_rows_of_earlier_invocations_on_its_workdir(tmp_path):
  from benchmarks import ablation
  score = lambda v: {"pseudo_masks": {"mIoU": v, "mDice": v}, "segment": {"mIoU": v, "mDice": v}}
  first = {"synthetic": {"variants": {"base": score(0.8), "affinity": score(0.7)}},
           "synthetic_cells": {"variants": {"base": score(0.6)}, "otsu": {"all": {"mIoU": 0.2, "mDice": 0.3}}}}
  (tmp_path / "ablation.json").write_text(json.dumps(first))
  now = {"synthetic_cells": {"variants": {"base": score(0.65), "image_loss": score(0.5)},
                             "otsu": {"all": {"mIoU": 0.25, "mDice": 0.4}}}}
  kept = ablation.merged(ablation.earlier_results(str(tmp_path)), now)
  assert kept["synthetic"] == first["synthetic"]  # a set not run now keeps its rows
  assert kept["synthetic_cells"]["variants"] == {"base": score(0.65), "image_loss": score(0.5)}
  assert kept["synthetic_cells"]["otsu"] == now["synthetic_cells"]["otsu"]
  rows = [l for l in ablation.table(kept).splitlines() if l.startswith("| synthetic")]
  assert [r.split(" | ")[:2] for r in rows] == [
      ["| synthetic", "base"], ["| synthetic", "affinity"], ["| synthetic_cells", "base"],
      ["| synthetic_cells", "image_loss"], ["| synthetic_cells", "Otsu on the image, all"]]
  assert ablation.earlier_results(str(tmp_path / "none")) == {}


def test_the_nuclei_folder_is_a_folder_the_finding_recipe_reads(tmp_path):
  import tifffile

  from benchmarks import nuclei_folder
  from wsss_jax.data import pipeline as data_pipeline
  for split, count in (("train", 4), ("val", 2), ("test", 2)):
    nuclei_folder.write_split(str(tmp_path), split, count)
  raw = tifffile.imread(tmp_path / "train" / "img" / "train_0000.tif")
  assert raw.dtype == np.uint16 and raw.shape == (160, 160) and raw.max() > 255  # 12-bit counts
  config = load_config("pipeline", f"dataset=folder,root={tmp_path},classes=nucleus,"
                                   "setting=finding,intensity=window:10/2220")
  train = data_pipeline.build_source(config.classify.data, "train")
  for i in range(len(train)):
    item = train[i]
    assert item["labels"].tolist() == [float((item["mask"] == 0).any())]  # csv agrees with mask
  assert [train[i]["labels"][0] for i in range(4)] == [1, 0, 1, 0]
  val = data_pipeline.build_source(config.segment.data, "val")
  assert len(val) == 2 and set(np.unique(val[0]["mask"])) <= {0, 1}
