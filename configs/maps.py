"""Relevance maps of a trained classifier for a dataset split, with their quality measured.

  python -m wsss_jax.main --config=configs/maps.py:classifier=runs/cls --workdir=runs/maps
  python -m wsss_jax.main --config=configs/maps.py:classifier=runs/cls,methods=gradcam+lrp ...

`methods` lists method names joined by '+'; `lrp:<composite or rule>` picks an LRP variant
(e.g. lrp:EpsilonGammaBox, lrp:epsilon). Writes maps/<method>/<tile>.npz (float16, per layer),
overlays/<method>.png, summary.json (pseudo-mask IoU per layer, deletion/insertion AUC, average
drop / increase in confidence, maps/s) and table.md.
"""
from wsss_jax import config_lib

DEFAULT_METHODS = ("cam+gradcam+gradcampp+xgradcam+layercam+hirescam+eigencam+scorecam+"
                   "lrp:EpsilonPlusFlat+lrp:EpsilonGammaBox+patternattribution")


def get_config(arg=None, **overrides):
  arg = config_lib.parse_arg(arg, overrides, classifier="runs/cls", methods=DEFAULT_METHODS,
                             split="val", batch=16)
  config = config_lib.common("maps")
  config.classifier_workdir = arg.classifier  # a classify run; its latest checkpoint is explained
  config.batch_size = arg.batch
  config.split = arg.split
  config.methods = tuple(arg.methods.split("+"))
  config.layers = ()          # () : b4_5, b5_2, bn7 (ResNet38), layer3, layer4 (ResNet-50),
                              # the last block's norm1 (ViT); LRP and patterns read `input`
  config.target = "logit"     # or sigmoid / softmax
  config.normalize = "joint"  # min-max over the present classes jointly, as the MLPS code
  config.relu = "method"      # the method's default (on for CAMs); "off"; "on"
  config.only_present = True  # classes absent from the tile's labels are zeroed
  config.write_maps = True

  # The data section is the classifier run's (config.json); these fields are the maps phase's.
  config.data = config_lib.data(0)  # image_size 0: the classifier's
  config.data.num_val = 128

  config_lib.relevance_options(config)  # lrp.composite/epsilon/gamma, scorecam.score_batch
  config.patterns = dict(estimator="relu", num_images=256)  # fitted on the training split
  config.quality = dict(num_images=32, steps=16)  # deletion / insertion on the first images
  config.overlays = 4         # images in each overlay PNG
  return config
