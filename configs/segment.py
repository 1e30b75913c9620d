"""Segmentation from pseudo masks: DeepLabV3+ with multi-layer pseudo-supervision, or MRN.

  python -m wsss_jax.main --config=configs/segment.py:pseudo=runs/pm,classifier=runs/cls --workdir=runs/seg
  python -m wsss_jax.main --config=configs/segment.py:supervision=full,classifier=runs/cls ...
  python -m wsss_jax.main --config=configs/segment.py:model=mrn,pseudo=runs/pm ...
  python -m wsss_jax.main --config=configs/segment.py:paper=True,backbone=resnet101,init=False ...

`pseudo` is a pseudo_masks workdir (its masks/<layer>/ are read); `classifier` a classify workdir:
its checkpoint initialises the backbone (`init=True`, the backbone and width must match it) and
gates the test predictions. `supervision=full` trains on the ground-truth masks instead: the
upper bound of the weakly supervised result. The defaults match configs/classify.py's
laptop-sized ResNet38 (1/8 width, 64 px inputs of 224 px tiles); `:paper=True` is the published
recipe (ResNet-101, output stride 16, 224 px, batch 20, 30 epochs).
"""
from wsss_jax import config_lib
from wsss_jax.data import folders


def get_config(arg=None, **overrides):
  arg = config_lib.parse_arg(arg, overrides, **config_lib.DATASET_ARGS, pseudo="runs/pm",
                             classifier="runs/cls", supervision="pseudo", model="deeplabv3plus", backbone="resnet38", width=0.125,
                             image_size=64, batch=16, epochs=6, num_train=512, init=True,
                             paper=False)
  dataset = folders.choose_dataset(arg)  # a release on disk: names, setting, statistics
  config = config_lib.common("segment")
  config.supervision = arg.supervision  # pseudo (masks of a pseudo_masks run) or full (ground truth)
  config.batch_size = 20 if arg.paper else arg.batch
  config.num_epochs = 30 if arg.paper else arg.epochs
  config.total_steps = 0                # 0: num_epochs * (num_train // batch_size)
  config.log_every = 10
  config.checkpoint_every = 200
  config.eval_every = 0                 # steps between validations; 0: once per epoch
  config.eval_batch_size = 32
  config.test_split = "test"
  config.loss_weights = (0.2, 0.2, 0.6)  # per data.mask_layers
  config.loss = "setting"               # ce | ce+dice | setting (tissue: ce, finding: ce+dice)
  config.palette = dataset.palette      # luad, bcss, finding, or the dataset's
  # finding setting: image-level terms from the segmenter's own output (0 = off). image_loss:
  # BCE of each finding's pooled probability (lse: log-sum-exp with sharpness r; topk: the mean
  # of the top_k share of pixels) against the image label, so a normal image can show no
  # finding; size_prior: the finding's pixel share kept within [lower, upper] where present
  config.image_loss = dict(weight=0.0, pooling="lse", r=5.0, top_k=0.05)
  config.size_prior = dict(weight=0.0, lower=0.0, upper=1.0)
  # self-training: after testing, write the best checkpoint's confident labels of the training
  # tiles (top probability >= confidence, else ignored; par=True refines the probabilities by
  # the image first, which shrinks small findings: BENCHMARKS.md) to self_labels/masks/self/
  config.self_labels = dict(write=False, confidence=0.7, par=False)
  config.overlays = 6

  config.data = config_lib.data(224 if arg.paper else arg.image_size, dataset)
  config.data.num_train = 16384 if arg.paper else arg.num_train
  config.data.num_val = 64
  config.data.num_test = 128
  config.data.class_names = dataset.class_names or ("TE", "NEC", "LYM", "TAS")
  config.data.num_classes = len(config.data.class_names)
  config.data.normalize = False         # inputs in [0, 1], as the ResNet38 classifier
  config.data.crop_scale = (1.0, 1.0)   # resize the tile to image_size
  config.data.vflip = True
  config.data.blur_p = 0.5              # Gaussian blur, radius U(0, blur_radius)
  config.data.blur_radius = 1.0
  config.data.masks_dir = arg.pseudo + "/masks" if arg.pseudo else ""
  config.data.mask_layers = ("b4_5", "b5_2", "bn7")
  config.data.pair_size = 0             # MRN: target patch size (context: the same size)
  config.data.context_scale = 2         # MRN: context resolution factor

  m = config.model = config_lib.segment_model(arg.model, arg.backbone, arg.width, arg.paper)
  m.init_from = arg.classifier if arg.init and not arg.paper and arg.model != "mrn" else ""
  if arg.model == "mrn":
    config.data.pair_size = 64 if not arg.paper else 512
    config.data.image_size = config.data.pair_size

  config.optim = config_lib.classify_optim("resnet38")  # SGD 0.9, lr 0.01 poly 0.9, wd 5e-4, head x10
  config.gate = dict(classifier_workdir=arg.classifier, epsilon=0.1,
                     modes=("off", "exclude", "multiply"))
  return config
