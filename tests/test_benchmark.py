import json

import pytest
from conftest import load_config

from wsss_jax.errors import UserError
from wsss_jax.phases import benchmark

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


def test_benchmark_rejects_unknown_model(tmp_path):
  config = _config(8)
  config.model.name = "resnet1000"
  with pytest.raises(UserError, match="model.name='resnet1000'"):
    benchmark.run(config, str(tmp_path))


@pytest.mark.parametrize("model", ["resnet38", "resnet50", "vit"])
def test_benchmark_times_the_classifiers(model, tmp_path):
  config = load_config("benchmark", f"model={model},variant=mu/8,width=0.0625,image_size=32,"
                       "batch=4,steps=2,warmup=1")
  config.num_devices, config.matmul_size = 1, 256
  result = benchmark.run(config, str(tmp_path))
  assert result["model"] == model and result["gflops_per_image"] > 0
  assert result["pda"] is (model != "vit")
  assert result["images_per_sec"] == pytest.approx(4 / result["step_time_median"])
