"""AffinityNet + random walk between the pseudo masks and the segmenter (Ahn & Kwak, CVPR 2018).

  python -m wsss_jax.main --config=configs/affinity.py:classifier=runs/cls,pseudo=runs/pm,layer=b5_2 --workdir=runs/aff
  python -m wsss_jax.main --config=configs/segment.py:pseudo=runs/aff,classifier=runs/cls --config.data.mask_layers='("rw",)' --config.loss_weights='(1.0,)' ...

Learns inter-pixel affinities from the confident pixels of one pseudo-mask layer (give the
pseudo-mask run an ignore band, `ignore_band=0.1`, so that uncertain pixels give no pair), then
propagates the classifier's maps of that layer by a random walk and writes masks/rw/ for the
segmenter. Laptop defaults: the classifier's 1/8-width ResNet38 trunk at 128 px, 4 epochs.
"""
from wsss_jax import config_lib
from wsss_jax.data import folders


def get_config(arg=None, **overrides):
  arg = config_lib.parse_arg(arg, overrides, **config_lib.DATASET_ARGS, classifier="runs/cls",
                             pseudo="runs/pm", layer="b5_2", width=0.125, image_size=128,
                             batch=16, epochs=4, num_train=512, init=True)
  dataset = folders.choose_dataset(arg)
  config = config_lib.common("affinity")
  config.classifier_workdir = arg.classifier  # its trunk starts AffinityNet; its maps are walked
  config.pseudo_workdir = arg.pseudo          # the pseudo-mask run: masks, rule and alpha
  config.method = "gradcam"                   # the maps walked (the pseudo-mask run's method)
  config.init = arg.init
  config.batch_size = arg.batch
  config.num_epochs = arg.epochs
  config.total_steps = 0                      # 0: num_epochs * (num_train // batch_size)
  config.log_every = 10
  config.checkpoint_every = 200
  config.radius = 5                           # pairs within 5 cells of the stride-8 grid
  config.beta = 8.0                           # A = a^beta sharpens the affinities
  # t = 2^k random-walk steps. The walk spreads a map over about sqrt(t) grid cells: the paper's
  # 256 steps on a 56 x 56 grid (448 px crops) reach about 29% of it; 16 steps on this 16 x 16
  # grid (128 px) about 25%. 256 here spread every map over the whole image (BENCHMARKS.md).
  config.log2_steps = 4
  config.palette = dataset.palette
  config.model = dict(width=arg.width, dim=448)
  config.data = config_lib.data(arg.image_size, dataset)
  config.data.class_names = dataset.class_names or ("TE", "NEC", "LYM", "TAS")
  config.data.num_classes = len(config.data.class_names)
  config.data.num_train = arg.num_train
  config.data.normalize = False               # inputs in [0, 1], as the ResNet38 classifier
  config.data.crop_scale = (1.0, 1.0)
  config.data.vflip = True
  config.data.masks_dir = arg.pseudo + "/masks"
  config.data.mask_layers = (arg.layer,)
  config.optim = config_lib.classify_optim("resnet38")  # SGD poly, projections' lr x10
  return config
