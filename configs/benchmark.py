"""Train-step throughput and MFU: `--config=configs/benchmark.py:model=mae,variant=B/16,batch=64`.

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
  config.model = m = config_lib.ml_collections.ConfigDict()
  m.name = arg.model
  m.variant = arg.variant
  m.mask_ratio = 0.75
  m.norm_pix_loss = True
  m.decoder_width = 512 if arg.paper else 256
  m.decoder_depth = 8 if arg.paper else 4
  m.decoder_heads = 16 if arg.paper else 8
  m.gather = arg.gather
  config.optim = o = config_lib.ml_collections.ConfigDict()
  o.base_lr, o.b1, o.b2, o.weight_decay = 1.5e-4, 0.9, 0.95, 0.05
  o.warmup_steps, o.end_lr, o.grad_clip_norm = 1, 0.0, 0.0
  return config
