"""The whole weakly supervised pipeline in one command:
classify -> pseudo masks -> segment -> test evaluation (optionally MAE pretraining first).

  python -m wsss_jax.main --config=configs/pipeline.py --workdir=runs/wsss
  python -m wsss_jax.main --config=configs/pipeline.py:upper_bound=True --workdir=runs/wsss
  python -m wsss_jax.main --config=configs/pipeline.py:paper=True --workdir=runs/wsss_paper
  python -m wsss_jax.main --config=configs/pipeline.py:supervision=full --workdir=runs/full
  python -m wsss_jax.main --config=configs/pipeline.py:pretrain=True --workdir=runs/wsss_vit
  python -m wsss_jax.main --config=configs/pipeline.py:erasing=3 --workdir=runs/wsss_ae
  python -m wsss_jax.main --config=configs/pipeline.py:pretrain=runs/mae_block --workdir=runs/wsss_b
  python -m wsss_jax.main --config=configs/pipeline.py:dataset=synthetic_lesions,rounds=auto --workdir=runs/les_st
  python -m wsss_jax.main --config=configs/pipeline.py:dataset=synthetic_lesions,affinity=True --workdir=runs/les_aff
  python -m wsss_jax.main --config=configs/pipeline.py:dataset=synthetic_cells,image_size=128 --workdir=runs/cells

Each phase works in its own sub-directory of the workdir (pretrain/, classify/, pseudo_masks/,
segment/, segment_full/) and resumes from what is already there when re-run. The phases' own
configs are sections of this one (`--config.classify.num_epochs=4`, `--config.segment.batch_size=8`).
`supervision=full` trains the segmenter on the ground truth (the upper bound);
`upper_bound=True` runs both and puts them side by side in table.md.
`pretrain=<workdir>` starts the classifier from a finished pretrain run of configs/mae.py instead
of running one: a ViT from any MAE variant or pretext task, the ResNet38 from a pretext task on it
(`encoder=resnet38,width=<its width>`, as that run was configured; the phase checks they match
before it starts); `pretrain=scratch` trains the same ViT from random weights (the floor a
ViT pretraining should clear; the CNN's is the default run).
`paper=True` is the authors' method alone: no SEAM loss, no CRF, the segmenter on the 0.2/0.2/0.6
mix of the three layers' masks (the default adds SEAM and the CRF and learns from b4_5's masks,
or, where the pseudo-mask phase swept alpha on validation masks, from the layer that scored best
there: `--config.segment_layer=auto`, or a layer name).
`dataset=<name>,root=<path>` (and `classes=a+b` for a folder) points every phase at a dataset;
`setting=tissue|finding` picks the recipe: tissue maps (every pixel one of the classes; the
dataset's white-glass rule or none) or findings against a background (one or a few finding
classes, normal images with no label; `data.name=synthetic_lesions` is the embedded example):
the finding recipe keeps ReLU on the maps, takes the background from the maps with the
threshold rule and alpha swept on the validation masks (`background.alpha=auto`, without masks
the negatives rule), refines the maps by the image (PAR) on the layers where the validation
masks say it helps, trains the segmenter's background as a class and scores it as one.
`erasing=N` adds adversarial erasing (erasing/): the classifier is its round 0, up to N-1 more
rounds train on erased tiles, and the pseudo masks are the union of the rounds' maps.
`image_size=N` is the classifier's and the segmenter's input side (default 64, a ViT's 112);
`image_size=auto` (the finding recipe's default with a CNN) trains a classifier at 64 and at 128
(classify/, size128/classify/), keeps the side whose pseudo masks score best on the val masks,
and trains the segmenter at it: small findings (cells, nuclei) need 128, large ones do better at
64.
`affinity=True` puts AffinityNet and its random walk (affinity/) between the pseudo masks (given an
ignore band) and the segmenter; `rounds=auto` (the default; `rounds=N`, `rounds=0` for none) adds
self-training rounds (segment_round<r>/), each segmenter learning from the previous one's
confident labels, while the val mIoU improves; the best round on val is kept (none run without
val masks). `band=auto` (the default; `band=0.1` one width, `band=0` none) gives the pseudo masks
an ignore band whose width is chosen the same way: a segmenter learns from the masks of widths 0,
0.1, 0.2 in turn (pseudo_masks_band<w>/, segment_band<w>/) while its val mIoU improves. Each
choice on val changes only for a gain above val_min_gain (0.005 mIoU). With val masks each
pseudo-mask layer also fuses the subset of its map scales (1, 1.5, 2) that scores best there
(pseudo_masks.scales_validate; not with erasing). The run's segmenter is the one these choices
kept (summary.json: segment.workdir); predict takes the pipeline's workdir as its model.
"""
import ml_collections

from wsss_jax import config_lib
from wsss_jax.errors import UserError


def _pretrain_mode(text: str) -> str:
  """'' (no ViT), 'true' (pretrain here), 'scratch' (random ViT) or a pretrain workdir."""
  word = text.lower()
  if word in ("", "0", "no", "false"):
    return ""
  if word in ("1", "yes", "true"):
    return "true"
  return "scratch" if word == "scratch" else text


def get_config(arg=None, **overrides):
  arg = config_lib.parse_arg(arg, overrides, **config_lib.DATASET_ARGS, supervision="pseudo",
                             upper_bound=False, pretrain="", encoder="vit", width=0.125,
                             erasing=0, paper=False, rounds="auto", affinity=False, image_size="",
                             band="auto")
  # the dataset arguments the user gave reach every section, which applies its dataset preset
  dataset = {k: arg[k] for k in config_lib.DATASET_ARGS if k in arg.given_args}
  pretrain = _pretrain_mode(arg.pretrain)
  # a ViT classifier when one is pretrained (here, from scratch, or a ViT run's workdir); a
  # pretext run of a CNN trunk starts the CNN classifier of its width (encoder=resnet38,width=)
  vit = bool(pretrain) and arg.encoder == "vit"
  # the classifier's and the segmenter's input side: small findings (cells of a few % of the
  # image side) vanish at the laptop default of 64 px (BENCHMARKS.md, "synthetic_cells")
  fixed = _fixed_size(arg.image_size)
  size = {"image_size": fixed} if fixed else {}
  config = ml_collections.ConfigDict()
  config.phase = "pipeline"
  config.seed = 0
  config.num_devices = -1
  config.supervision = arg.supervision   # pseudo (weakly supervised) or full (ground truth)
  config.upper_bound = arg.upper_bound   # also train on the ground truth, for comparison
  config.run_pretrain = pretrain == "true"  # MAE first, then a ViT classifier from it
  # a finished pretrain run whose encoder starts the classifier (nothing is pretrained here)
  config.pretrain_workdir = "" if pretrain in ("", "true", "scratch") else pretrain
  # the pipeline's own classifier is the pretraining's evaluation
  config.pretrain = config_lib.sibling_config(__file__, "mae", eval="none", **dataset)
  # PDA off and 12 epochs (the from-scratch ResNet38 with PDA can collapse: BENCHMARKS.md);
  # SEAM's equivariance loss and the dense CRF on unless paper=True (the authors' method alone)
  config.classify = config_lib.sibling_config(
      __file__, "classify", backbone="vit" if vit else "resnet38", pda="off", epochs=12,
      seam=not (arg.paper or vit), width=arg.width,
      **(size or ({"image_size": 112} if vit else {})), **dataset)
  config.run_erasing = arg.erasing > 0   # adversarial erasing, round 0 being the classifier
  # its rounds train the classify section's classifier, so it has no classify section
  config.erasing = config_lib.sibling_config(__file__, "erasing", rounds=arg.erasing or 3,
                                             classify=False)
  config.pseudo_masks = config_lib.sibling_config(__file__, "pseudo_masks", crf=not arg.paper,
                                                  **dataset)
  config.pseudo_masks.scales = (1.0, 1.5, 2.0)  # multi-scale maps (BENCHMARKS.md)
  # with val masks each layer fuses the subset of those scales (with 1) that scores best there
  # (lesions: b5_2 at 1 alone; tissue tiles and cells: all three; BENCHMARKS.md); erasing fuses
  # its rounds' maps instead, and the authors' method has none
  config.pseudo_masks.scales_validate = not (arg.paper or arg.erasing)
  # AffinityNet + random walk between the pseudo masks and the segmenter; it learns from the
  # confident pixels, so the pseudo masks get an ignore band
  config.run_affinity = arg.affinity
  config.affinity = config_lib.sibling_config(__file__, "affinity", width=arg.width, **dataset)
  _val_choices(config, arg)
  # its backbone starts from the classifier's
  config.segment = config_lib.sibling_config(__file__, "segment", supervision=arg.supervision,
                                             width=arg.width, **size, **dataset)
  _finding_recipe(config)
  _mask_layers(config, arg.paper, vit)
  config.image_sizes = _size_choice(config, arg, vit)
  return config


def _val_choices(config, arg) -> None:
  """What the val masks choose after the pseudo masks: the band's width and the round."""
  config.ignore_band = dict(width=_band_width(arg), widths=(0.0, 0.1, 0.2))
  # self-training: rounds of segmenters, each on the previous one's confident labels of the
  # training tiles; "auto": up to max_rounds, stopping when the val mIoU stops improving (none
  # without val masks; tissue tiles 0.843 -> 0.853, lesions and cells: round 0 kept;
  # BENCHMARKS.md).
  # paper=True is the authors' method alone: none unless asked
  rounds = "0" if arg.paper and "rounds" not in arg.given_args else arg.rounds
  config.self_training = dict(rounds=rounds, max_rounds=3)
  # what the val masks choose (input side, band width, self-training round) changes only for a
  # gain above this val mIoU: half a point, below which one val split and one training run do
  # not tell choices apart; the cheaper choice stays
  config.val_min_gain = 0.005


def _band_width(arg) -> str:
  """The pseudo masks' ignore band (pseudo_masks.ignore_band): a width, or "auto": a segmenter
  learns from the masks of each of ignore_band.widths in turn, and the first that is no better
  on the val masks (by val_min_gain) stops the search (tissue tiles keep 0, lesions 0.1:
  BENCHMARKS.md); without val masks the section's own (0, no band). AffinityNet needs one
  band; paper=True none."""
  if "band" in arg.given_args:
    return arg.band
  return "0.1" if arg.affinity else "0" if arg.paper else "auto"


def _fixed_size(text: str) -> int:
  """image_size=N: N; "" or "auto": 0 (the recipe's own or a choice on val)."""
  word = text.strip().lower()
  if word in ("", "auto"):
    return 0
  if not word.isdigit() or int(word) < 16:
    raise UserError(f"config argument image_size={text!r} is not a side in pixels "
                    f"(16 or more) or 'auto'")
  return int(word)


def _size_choice(config, arg, vit: bool) -> tuple:
  """The input sides the pipeline chooses between on the val masks (pseudo-mask val mIoU; one
  classifier and pseudo-mask run each), or () for the configured one. The finding recipe's
  default: findings range from a few pixels (cells, nuclei) to a third of the image (lesions),
  and which side serves the maps best differs by dataset (BENCHMARKS.md, "synthetic_cells")."""
  word = arg.image_size.strip().lower()
  finding = config.classify.data.setting == "finding"
  if word == "auto" and vit:
    raise UserError("image_size=auto: a ViT classifier takes its pretraining's input "
                    "side; give image_size=N")
  if word == "auto" or (not word and finding and not vit and not arg.paper):
    side = config.classify.data.image_size
    return (side, 2 * side)
  return ()


def _finding_recipe(config) -> None:
  """Findings against a background: alpha chosen on the validation masks (else the negatives),
  the CRF kept per layer only where those masks show it helps (speckle and shadows can pull it
  off a finding), and PAR likewise (it raised every layer's val mIoU on both embedded finding
  sets: BENCHMARKS.md, "Masks that follow the image")."""
  if config.classify.data.setting == "finding":
    config.pseudo_masks.background.alpha = "auto"
    config.pseudo_masks.crf.validate = True
    config.pseudo_masks.par.enabled = config.pseudo_masks.par.validate = True


def _mask_layers(config, paper: bool, vit: bool) -> None:
  """The layer(s) the segmenter learns from. "auto": where the pseudo-mask phase swept alpha on
  validation masks, the layer that scored best there, else segment.data.mask_layers as set
  here; "section": always the section's layers (the paper's 0.2/0.2/0.6 mix of three)."""
  config.segment_layer = "section" if paper else "auto"
  if not paper:  # one layer, b4_5 (BENCHMARKS.md, "Pseudo-mask layers")
    config.segment.data.mask_layers = ("b4_5",)
    config.segment.loss_weights = (1.0,)
  if vit:  # a ViT's maps come from one token layer at its own input size (fixed
    # position embeddings: no multi-scale maps); the segmenter starts from scratch
    config.pseudo_masks.scales = (1.0,)
    config.segment.data.mask_layers = ("norm1",)
    config.segment.loss_weights = (1.0,)
    config.segment.model.init_from = ""
