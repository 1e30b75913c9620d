"""MAE pretraining of a ViT encoder (He et al. 2022) on the embedded histology dataset.

  python -m wsss_jax.main --config=configs/mae.py --workdir=runs/mae
  python -m wsss_jax.main --config=configs/mae.py:variant=B/16,batch=4096,paper=True ...

  ...:sampling=centre,crop_min=0.5    (centre-weighted masks, crops of 50-100% of the area)
  ...:init=runs/mae_large              (chained: start from another pretrain run's weights)
  ...:eval=none                         (skip the linear probe and fine-tune at the end)
  ...:objective=rotation               (pretext tasks on the same encoder: rotation, jigsaw,
                                        exemplar = instance discrimination, SimCLR-style)
  ...:objective=jigsaw,encoder=resnet38,jigsaw_grid=4   (a pretext task on a ResNet38 / ResNet-50
                                        trunk of `width`; classify takes it with init=<workdir>)

The defaults are a laptop-sized run (ViT-S/16 at 112 px, a 4-block decoder) that finishes on a
2-core CPU in minutes; `:paper=True` gives the paper's model (8-block 512-wide decoder, 224 px).
"""
from wsss_jax import config_lib
from wsss_jax.data import folders


def get_config(arg=None, **overrides):
  arg = config_lib.parse_arg(arg, overrides, **config_lib.DATASET_ARGS, variant="S/16",
                             image_size=112, batch=32, steps=200, mask_ratio=0.75, paper=False,
                             sampling="random", crop_min=0.2, init="", objective="mae", jigsaw_grid=3, eval="both", eval_epochs=2,
                             encoder="vit", width=0.125, attention="xla", gelu="exact")
  config = config_lib.common("pretrain")
  config.batch_size = arg.batch
  config.total_steps = arg.steps
  config.checkpoint_every = 100
  config.num_figure_images = 8
  # a release on disk: its name and statistics
  config.data = config_lib.data(224 if arg.paper else arg.image_size,
                                folders.choose_dataset(arg))
  config.data.crop_scale = (arg.crop_min, 1.0)  # 0.5 for X-ray-like data
  # what the classify phase feeds this encoder: (x - mean) / std for a ViT, [0, 1] for a CNN
  config.data.normalize = arg.encoder == "vit"
  config.model = config_lib.mae_model(arg.variant, arg.mask_ratio, arg.paper)
  config.model.mask_sampling = arg.sampling     # random | block | grid | centre
  config.model.attention = arg.attention        # xla | jax | cudnn (GPU) | pallas (TPU)
  config.model.gelu = arg.gelu                  # exact (erf, the checkpoints') | tanh
  config.model.init_from = arg.init             # chained pretraining: a pretrain workdir
  config.model.encoder = arg.encoder            # vit | resnet38 | resnet50 (pretext tasks only)
  config.model.width = arg.width                # CNN channel multiplier (classify's default)
  config.objective = arg.objective              # mae | rotation | jigsaw (pretext tasks)
  # jigsaw: grid x grid tiles (grid must divide the crop), permutations of maximal Hamming distance
  config.jigsaw = dict(grid=arg.jigsaw_grid, permutations=100 if arg.jigsaw_grid > 2 else 24)
  # exemplar: NT-Xent temperature, projection head, and the strong views made on device (SimCLR's
  # recipe: crops of 8-100%, colour jitter of strength 1 with p 0.8, grayscale 0.2, blur 0.5;
  # a milder colour strength suits stained tissue, whose colour carries meaning)
  config.exemplar = dict(temperature=0.1, hidden=1024, dim=128, crop_min=0.08,
                         colour_strength=0.5, colour_p=0.8, grayscale_p=0.2, blur_p=0.5)
  config.optim = config_lib.mae_optim(arg.steps)
  # The representation check at the end of the run (so variants meet on one table): a classifier
  # started from this run's encoder, trained as a linear probe (frozen encoder) and fine-tuned,
  # on the labelled tiles; their val mAP lands in summary.json. The encoder (ViT variant or CNN
  # and width), image size and seed are this run's; the rest (data, epochs, lr) is theirs:
  # --config.evaluation...
  config.evaluation = dict(runs=arg.eval)  # both | probe | finetune | none
  labelled = dict(backbone=arg.encoder, width=arg.width, pda="off", dataset=arg.dataset,
                  root=arg.root, epochs=arg.eval_epochs)
  config.evaluation.linear_probe = config_lib.sibling_config(__file__, "classify", probe=True,
                                                             **labelled)
  config.evaluation.finetune = config_lib.sibling_config(__file__, "classify", **labelled)
  # a short fine-tune at small batch: the recipe's lr at batch 256 (5e-4), not scaled down to
  # 16/256 of it, which barely moves the weights in a few dozen steps
  config.evaluation.finetune.optim.lr_batch_scaling = False
  return config
