"""MAE pretraining of a ViT encoder (He et al. 2022) on the embedded histology dataset.

  python -m wsss_jax.main --config=configs/mae.py --workdir=runs/mae
  python -m wsss_jax.main --config=configs/mae.py:variant=B/16,image_size=224,batch=4096 ...

The defaults are a laptop-sized run (ViT-S/16 at 112 px, a 4-block decoder) that finishes on a
2-core CPU in minutes; `:paper=True` gives the paper's model (8-block 512-wide decoder, 224 px).
"""
from wsss_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="S/16", image_size=112, batch=32, steps=200,
                             mask_ratio=0.75, paper=False)
  config = config_lib.common("pretrain")
  config.batch_size = arg.batch
  config.total_steps = arg.steps
  config.checkpoint_every = 100
  config.num_figure_images = 8

  config.data = config_lib.data("synthetic", 224 if arg.paper else arg.image_size)

  config.model = m = config_lib.ml_collections.ConfigDict()
  m.variant = arg.variant
  m.mask_ratio = arg.mask_ratio     # 0.75 natural images; 0.9 the chest X-ray recipe
  m.norm_pix_loss = True            # per-patch normalised pixel targets
  m.decoder_width = 512 if arg.paper else 256
  m.decoder_depth = 8 if arg.paper else 4
  m.decoder_heads = 16 if arg.paper else 8
  m.gather = "take"                 # "take" (take_along_axis) or "onehot" (einsum)

  config.optim = o = config_lib.ml_collections.ConfigDict()
  o.base_lr = 1.5e-4                # scaled by batch_size / 256
  o.b1, o.b2 = 0.9, 0.95
  o.weight_decay = 0.05
  o.warmup_steps = max(1, arg.steps // 20)  # 40 of 800 epochs in the paper
  o.end_lr = 0.0
  o.grad_clip_norm = 0.0            # 0: no clipping (the MAE recipe)
  return config
