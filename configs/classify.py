"""Multi-label patch classification: ResNet38 + PDA, ResNet-50, or a ViT fine-tuned from MAE.

  python -m wsss_jax.main --config=configs/classify.py --workdir=runs/cls
  python -m wsss_jax.main --config=configs/classify.py:backbone=resnet50 ...
  python -m wsss_jax.main --config=configs/classify.py:backbone=vit,init=runs/mae ...
  python -m wsss_jax.main --config=configs/classify.py:paper=True,pda=released ...

The defaults are a laptop-sized run (an eighth-width ResNet38 at 64 px, 8 epochs of 512 tiles);
`:paper=True` is the published recipe: full width, 224 px, batch 20, 20 epochs.
For the ViT, `init=<MAE workdir>` starts from that run's latest checkpoint and `probe=True`
trains a linear probe on the frozen encoder.
"""
from wsss_jax import config_lib
from wsss_jax.data import folders


def get_config(arg=None, **overrides):
  arg = config_lib.parse_arg(arg, overrides, **config_lib.DATASET_ARGS, backbone="resnet38",
                             variant="S/16", width=0.125, image_size=64, batch=16, epochs=8, num_train=512, pda="paper",
                             init="", probe=False, paper=False, hide=False, hide_grid=4,
                             seam=False, attention="xla", gelu="exact")
  vit = arg.backbone == "vit"
  config = config_lib.common("classify")
  config.batch_size = 20 if arg.paper else arg.batch
  config.num_epochs = 20 if arg.paper else arg.epochs
  config.total_steps = 0        # 0: num_epochs * (num_train // batch_size)
  config.log_every = 10
  config.checkpoint_every = 200
  config.eval_every = 0         # steps between validations; 0: once per epoch

  dataset = folders.choose_dataset(arg)  # a release on disk: names, setting, statistics
  config.data = config_lib.data(224 if arg.paper else arg.image_size, dataset)
  config.data.num_train = 16384 if arg.paper else arg.num_train
  config.data.num_val = 128
  config.data.class_names = dataset.class_names or ("TE", "NEC", "LYM", "TAS")
  config.data.num_classes = len(config.data.class_names)
  config.data.crop_scale = (1.0, 1.0)  # (1, 1): no cropping, resize to image_size
  config.data.vflip = True
  config.data.normalize = vit          # False: inputs in [0, 1] (the ResNet38 recipe)
  config.data.randaugment_ops = 0      # 2 with magnitude 9: the MAE fine-tuning recipe
  config.data.randaugment_magnitude = 9.0

  config.model = config_lib.classifier_model(arg.backbone, arg.variant,
                                             1.0 if arg.paper else arg.width, arg.probe)
  config.model.init_from = arg.init    # workdir whose latest checkpoint initialises the network
  config.model.attention = arg.attention  # ViT: xla | jax | cudnn (GPU) | pallas (TPU)
  config.model.gelu = arg.gelu            # ViT: exact | tanh

  config.pda = config_lib.pda(arg.pda if not vit else "off")
  config.optim = config_lib.classify_optim(arg.backbone, arg.probe)
  config.mixup_alpha = 0.0             # 0.8 / 1.0 in the MAE fine-tuning recipe
  config.cutmix_alpha = 0.0
  config.label_smoothing = 0.0
  # Hide-and-Seek: each of grid x grid cells hidden with probability prob per image and step
  config.hide_and_seek = dict(prob=0.5 if arg.hide else 0.0, grid=arg.hide_grid)
  # SEAM's equivariant regularisation: L1 between A(CAM(I)) and CAM(A(I)), A = rescale + flip
  config.equivariance = dict(weight=1.0 if arg.seam else 0.0, scale=0.5)
  return config
