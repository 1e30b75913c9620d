"""Pseudo masks for the segmentation phase from a trained classifier's relevance maps.

  python -m wsss_jax.main --config=configs/pseudo_masks.py:classifier=runs/cls --workdir=runs/pm
  python -m wsss_jax.main --config=configs/pseudo_masks.py:classifier=runs/cls,background=none ...

Default: Grad-CAM (logits, no ReLU) at b4_5, b5_2 and bn7 of ResNet38, jointly min-max normalised
over the tile's present classes, absent classes excluded, the LUAD-HistoSeg background rule.
Writes masks/<layer>/<tile>.png (palette PNGs, index 4 = background), overlays/pseudo_masks.png,
summary.json and, when the split has ground truth, table.md with the stage-1 mIoU per layer.
"""
from wsss_jax import config_lib
from wsss_jax.data import folders
from wsss_jax.pseudo import crf, par


def get_config(arg=None, **overrides):
  arg = config_lib.parse_arg(arg, overrides, **config_lib.DATASET_ARGS, classifier="runs/cls",
                             method="gradcam", split="train", background="dataset",
                             palette="dataset", batch=32, crf=False, par=False, band=0.0,
                             erasing="")
  dataset = folders.choose_dataset(arg)  # a release on disk: its setting, palette, rule
  config = config_lib.common("pseudo_masks")
  config.classifier_workdir = arg.classifier
  # adversarial erasing: the rounds of this erasing run (configs/erasing.py) replace the
  # classifier; each round's maps on its erased input, fused by a per-pixel maximum
  config.erasing_workdir = arg.erasing
  config.batch_size = arg.batch
  config.split = arg.split
  config.method = arg.method     # any relevance method; lrp:<composite> as in the maps phase
  config.layers = ()             # (): b4_5, b5_2, bn7 (ResNet38); layer3, layer4 (ResNet-50)
  config.target = "logit"
  config.normalize = "joint"     # min-max over the present classes jointly (the authors' rule)
  config.relu = "setting"        # by setting (tissue: Grad-CAM without ReLU, as the authors;
                                 # finding: with); "method": the method's default; "off"; "on"
  config.scales = (1.0,)         # input scales whose maps are averaged (multi-scale inference)
  # True (with val masks): each layer fuses the subset of the scales (with the first) whose maps
  # score best on the val masks
  config.scales_validate = False
  # rule "dataset": the dataset's (white for LUAD-HistoSeg and the embedded tiles, none for
  # BCSS-WSSS and tissue folders, threshold for findings); white / none / threshold / power /
  # otsu / negatives or white+<map rule> (wsss_jax/pseudo/mask_rules.py). alpha: "default" (the
  # rule's), a number, or "auto": swept on the val split's ground truth (alpha_sweep.md / .png),
  # without it the negatives rule. threshold / min_size: the white-glass rule's grey level and
  # smallest region.
  config.background = dict(rule=dataset.background, alpha="default", threshold=200,
                           min_size=50, negatives_images=512)
  # dense-CRF refinement of every mask (wsss_jax/pseudo/crf.py; pydensecrf's label refinement)
  # validate=True (with alpha=auto's val masks): refine only the layers whose val mIoU it raises
  config.crf = dict(enabled=arg.crf, validate=False, **crf.DEFAULTS)
  # pixel-adaptive refinement of the maps by the image (wsss_jax/pseudo/par.py, AFA's settings);
  # validate=True (with val masks): kept only for the layers whose val mIoU it raises
  config.par = dict(enabled=arg.par, validate=False, **par.DEFAULTS)
  # ignore band (0 = off): pixels whose map score lies within this of the background score
  # (findings) or of the runner-up class (tissue) are label 255, skipped by the segmenter's loss
  config.ignore_band = arg.band
  # multi-dilation maps (ResNet38): b7 also run at these rates on the same weights, fused as
  # H_trained + mean_r H_r (the dilated-convolution paper's weighting); () = off
  config.dilations = ()
  config.palette = dataset.palette  # luad, bcss or finding colours, or the dataset's
  config.writer_threads = 4      # PNG encoding and writing overlap the next batch
  config.overlays = 6

  # Input fields come from the classifier's config.json; num_train 0 = the classifier's.
  config.data = config_lib.data(0, dataset)
  config.data.num_train = 0
  config_lib.relevance_options(config)
  return config
