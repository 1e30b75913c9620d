"""Adversarial erasing (Wei et al. 2017): rounds of the classify phase, each on the training tiles
with the regions mined by the earlier rounds erased (mean colour), until over-erasing.

  python -m wsss_jax.main --config=configs/erasing.py --workdir=runs/erasing
  python -m wsss_jax.main --config=configs/erasing.py:round0=runs/cls --workdir=runs/erasing
  python -m wsss_jax.main --config=configs/pseudo_masks.py:erasing=runs/erasing --workdir=runs/pm_ae

Each round is configs/classify.py (`--config.classify.*`); see wsss_jax/phases/erasing.py for
the workdir layout and the stop rule. The pseudo-mask phase given `erasing_workdir` fuses the
rounds' maps by a per-pixel maximum (the union of the mined regions).
"""
from wsss_jax import config_lib


def get_config(arg=None, **overrides):
  arg = config_lib.parse_arg(arg, overrides, rounds=3, threshold=0.5, round0="", classify=True)
  config = config_lib.common("erasing")
  # The rounds' classifier: the pipeline's (ResNet38 at 1/8 width, 64 px, PDA off, 12 epochs)
  if arg.classify:  # False inside the pipeline, whose classify section trains every round
    config.classify = config_lib.sibling_config(__file__, "classify", pda="off", epochs=12)
  config.erasing = dict(
      rounds=arg.rounds,          # at most this many classifiers (the paper stops after 3)
      method="gradcam",           # the class-activation method whose maps mine the regions
      layer="",                   # "": the backbone's last map layer (bn7; layer4; ViT tokens)
      threshold=arg.threshold,    # mined: max-normalised map of a present class > threshold
      stop_ratio=0.8,             # a round below 0.8 x round 0's mAP on its own tiles: stop
      max_erased=0.6,             # no new round once the union covers > 60% of the tiles
      round0_workdir=arg.round0)  # a finished classify run to use as round 0 ("": train one)
  return config
