"""The device suite's summary: goals read from the results the suite writes (the script itself
runs on the CPU with small sizes: VARIANT=mu/8 BATCH=4 ... bash benchmarks/gpu_suite.sh)."""
import json

from benchmarks import gpu_suite_summary


def _write(folder, name, **fields):
  (folder / f"{name}.json").write_text(json.dumps(fields))


def test_the_summary_checks_each_goal_against_what_was_measured(tmp_path):
  base = dict(batch_size=256, image_size=224, variant="B/16", peak_memory_gib=20.0, mfu=0.5)
  _write(tmp_path, "mae", images_per_sec=6600.0, mfu_datasheet=0.46, **base)
  _write(tmp_path, "vit", images_per_sec=3400.0, mfu_datasheet=0.30, **base)
  _write(tmp_path, "resnet50", **{**base, "mfu": 0.39}, images_per_sec=5000.0,
         mfu_datasheet=0.2)
  _write(tmp_path, "resnet50_fed", **base, images_per_sec=4900.0, mfu_datasheet=0.2,
         data_wait_fraction=0.07, input_images_per_sec=4600.0)
  (tmp_path / "side_by_side.json").write_text(json.dumps({"torch": "2.x", "rows": [
      {"model": "vit", "jax": {"images_per_sec": 3400.0}, "ratio": 1.31,
       "torch": {"eager": {"images_per_sec": 2000.0}, "max-autotune": None,
                 "default": {"images_per_sec": 2600.0}}}]}))
  text = gpu_suite_summary.summary(str(tmp_path))
  assert "MFU (datasheet) >= 45%: met" in text           # 46%
  assert ">= 3,500 images/s: missed" in text              # 3,400
  assert "MFU >= 40%: missed" in text                     # 39%
  assert "waited 7.0%" in text and "goal < 5%: missed" in text
  assert "max-autotune: past its budget" in text and "1.31x | >= 1.3x: met" in text
  assert "not measured (see resnet38.txt)" in text        # a stage that did not finish
  _write(tmp_path, "vit", images_per_sec=9000.0, **{**base, "variant": "mu/8"})
  assert "set for B/16 at 224 px" in gpu_suite_summary.summary(str(tmp_path))
