"""Train-step throughput and MFU: `--config=configs/benchmark.py:model=mae,variant=B/16,batch=32`.

Times steady-state steps on a device-resident batch and divides XLA's FLOP count by a matmul
peak measured in the same run. `total_steps` is the number of timed steps.
"""
from wsss_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, model="mae", variant="B/16", image_size=224, batch=32,
                             steps=10, warmup=2, bf16=False, gather="take", paper=True)
  config = config_lib.common("benchmark")
  config.batch_size = arg.batch
  config.total_steps = arg.steps
  config.warmup_steps = arg.warmup
  config.mixed_precision = arg.bf16
  config.matmul_size = 2048
  config.data = config_lib.data("synthetic", arg.image_size)
  config.model = config_lib.mae_model(arg.variant, 0.75, arg.paper, arg.gather)
  config.model.name = arg.model
  config.optim = config_lib.mae_optim(arg.steps)
  return config
