"""Shared config pieces. Config files are loaded by path, so what they share lives here.

Config files follow big_vision: `get_config(arg)` where `arg` is the text after ':' in
`--config=configs/mae.py:variant=B/16,batch=256`.
"""
from __future__ import annotations

import importlib.util
import json
import os

import ml_collections

from wsss_jax.errors import UserError

# LUAD-HistoSeg statistics (TPRO's figures, given in BGR order there), here in RGB order.
HISTOLOGY_MEAN = (0.7343, 0.5050, 0.6916)
HISTOLOGY_STD = (0.1885, 0.2277, 0.1552)


def _convert(text: str, default):
  if isinstance(default, bool):
    if text.lower() in ("1", "true", "yes"):
      return True
    if text.lower() in ("0", "false", "no"):
      return False
    raise ValueError(text)
  return type(default)(text) if default is not None else text


# The config arguments every phase file accepts to point it at a dataset (folders.choose_dataset).
DATASET_ARGS = dict(dataset="synthetic", root="", classes="", setting="dataset", intensity="auto")


def parse_arg(arg: str | None, overrides: dict | None = None, **defaults) -> ml_collections.ConfigDict:
  """'a=1,b=x' and keyword `overrides` -> ConfigDict with the defaults' keys and types; unknown
  keys are refused. `given_args` lists the keys set, so that a dataset preset never overwrites
  them."""
  out, given = dict(defaults), []
  items = [item.partition("=") for item in filter(None, (arg or "").split(","))]
  for key, sep, value in items + [(k, "=", v) for k, v in (overrides or {}).items()]:
    if not sep:
      raise UserError(f"config argument {key!r} is not KEY=VALUE")
    if key not in defaults:
      raise UserError(f"config argument {key!r} is unknown; known: {sorted(defaults)}")
    out[key] = _typed(key, value, defaults[key])
    given.append(key)
  return ml_collections.ConfigDict(out | {"given_args": tuple(given)})


def _typed(key: str, value, default):
  """A config argument's value in its default's type: text converted, other values checked."""
  try:
    if isinstance(value, str):
      return _convert(value, default)
    if isinstance(default, float) and type(value) is int:
      return float(value)
    if default is None or type(value) is type(default):
      return value
  except ValueError:
    pass
  raise UserError(f"config argument {key}={value!r} is not a valid {type(default).__name__}")


def sibling_config(config_file: str, name: str, arg: str | None = None, **overrides):
  """`get_config(arg, **overrides)` of the config file `<name>.py` next to `config_file` (config
  files are loaded by path, not imported as a package)."""
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"wsss_jax_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg, **overrides)


def run_model(workdir: str) -> dict:
  """The `model` section of the config.json a run wrote to `workdir` ({} when there is none or
  it cannot be read: the caller's own check names the missing run)."""
  try:
    with open(os.path.join(os.path.expanduser(workdir), "config.json"), encoding="utf-8") as f:
      return json.load(f).get("model") or {}
  except (OSError, ValueError, AttributeError):
    return {}


def common(phase: str, seed: int = 0) -> ml_collections.ConfigDict:
  """Fields every phase honours."""
  c = ml_collections.ConfigDict()
  c.phase = phase
  c.seed = seed
  c.batch_size = 64           # global, over all devices and processes
  c.total_steps = 1000
  c.log_every = 10
  c.checkpoint_every = 500
  c.keep_checkpoints = 3
  c.kernels = "rewrite"       # CPU convolutions: rewrite (faster there) or xla (kernels.py)
  c.async_checkpointing = True
  # a step whose loss or gradient norm is not finite: "stop" the run there, or "skip_step" (its
  # update is dropped) until nan_max_in_a_row such steps come in a row
  c.nan_policy = "stop"
  c.nan_max_in_a_row = 10
  c.num_devices = -1          # -1: every device; n > 0: the first n of a single process
  c.mixed_precision = False   # bf16 compute, fp32 parameters and optimiser state
  c.parallel = parallel()
  return c


def parallel() -> ml_collections.ConfigDict:
  """The device mesh (data x fsdp) and how the train state is split over it (parallel.py)."""
  p = ml_collections.ConfigDict()
  p.data = -1                 # replicas; -1: the devices fsdp leaves
  p.fsdp = 1                  # devices each parameter is split over (ZeRO-3); 1: plain data parallel
  p.fsdp_min_size = 2**18     # leaves with fewer elements stay replicated (1 MiB in fp32)
  p.rules = ()                # ((regex on the state path, "fsdp" | "replicate"), ...) first match wins
  return p


def data(image_size: int = 224, dataset=None) -> ml_collections.ConfigDict:
  """The data section; `dataset` (a folders.DatasetChoice) names the dataset and its setting
  and statistics (None: the embedded tiles)."""
  d = ml_collections.ConfigDict()
  d.name = dataset.name if dataset else "synthetic"
  d.root = dataset.root if dataset else ""  # folder of a release (luad_histoseg, bcss_wsss, ...)
  d.records_dir = ""          # read ArrayRecord shards built from data.root here instead
  d.bad_files = "strict"      # strict: stop listing every bad file; skip: drop and list them
  d.decode_check = True       # decode every tile when a folder split is opened (cached)
  # raw pixels -> 8-bit RGB input (data/intensity.py): auto | percentile:a,b | window:lo,hi |
  # full_range; recorded with the run, so predict maps new images the same way
  d.intensity = dataset.intensity if dataset else "auto"
  d.report_dir = ""           # where skipped_files_<split>.txt goes ("": the workdir)
  d.slide_tile = 224          # slides: tile side in pixels at slide_downsample
  d.slide_downsample = 1.0    # slides: 1 = full resolution, 2 = half (e.g. 0.25 -> 0.5 mpp)
  d.slide_stride = 0          # slides: tile grid step in tile pixels (0: the tile side)
  d.min_tissue = 0.5          # slides: tissue share a tile needs to be kept
  d.slide_context_scale = 0   # slides: > 1 adds the MRN context at slide_downsample * this
  # tissue: every pixel is a labelled class; finding: findings on an unlabelled background
  # (index K), negatives with all-zero labels; dataset: the dataset's (phases reading a
  # classifier: the classifier's), settled once by the phase (folders.settle)
  d.setting = dataset.setting if dataset else "dataset"
  d.seed = 0                  # the embedded dataset's generator seed
  d.num_train = 4096
  d.num_val = 64
  d.num_test = 64
  d.tile_size = 224           # size of the embedded dataset's tiles
  d.image_size = image_size   # network input size after cropping
  d.crop_scale = (0.2, 1.0)   # random-resized-crop area range (0.5-1.0 for X-ray-like data)
  d.hflip = True
  d.mean = (dataset and dataset.mean) or HISTOLOGY_MEAN
  d.std = (dataset and dataset.std) or HISTOLOGY_STD
  d.num_threads = 2           # grain reader threads per process
  d.num_workers = 0           # grain worker processes (0: in-process threads only)
  d.prefetch = 4              # batches buffered ahead of the step
  d.log_seen = False          # append the names each process fed to seen_process_<i>.jsonl
  return d


def mae_model(variant: str, mask_ratio: float = 0.75, paper: bool = True,
              gather: str = "take") -> ml_collections.ConfigDict:
  """MAE model section; `paper=False` gives the light 4-block, 256-wide decoder of the quick run."""
  m = ml_collections.ConfigDict()
  m.variant = variant
  m.mask_ratio = mask_ratio         # 0.75 natural images; 0.9 the chest X-ray recipe
  m.mask_sampling = "random"        # random | block (BEiT) | grid | centre (central subjects)
  m.centre_width = 0.5              # centre: masking probability exp(-d^2 / 2 w^2), d in half-sides
  m.norm_pix_loss = True            # per-patch normalised pixel targets
  m.decoder_width = 512 if paper else 256
  m.decoder_depth = 8 if paper else 4
  m.decoder_heads = 16 if paper else 8
  m.gather = gather                 # "take" (take_along_axis) or "onehot" (einsum)
  m.attention = "xla"               # "cudnn": flash attention (GPU, bf16), "pallas": TPU kernel
  m.gelu = "exact"                  # the MLP's GELU: "exact" (erf, the checkpoints') or "tanh"
  m.remat = "none"                  # "block" | "dots": recompute blocks in the backward pass
  m.scan_blocks = False             # one nn.scan over encoder and decoder blocks (fast compiles)
  m.init_from = ""                  # a pretrain workdir to start from (chained pretraining)
  return m


def mae_optim(total_steps: int) -> ml_collections.ConfigDict:
  """The MAE pretraining recipe: AdamW (0.9, 0.95), wd 0.05, lr 1.5e-4 x batch/256, cosine."""
  o = ml_collections.ConfigDict()
  o.base_lr = 1.5e-4                # scaled by batch_size / 256
  o.b1, o.b2 = 0.9, 0.95
  o.weight_decay = 0.05
  o.warmup_steps = max(1, total_steps // 20)  # 40 of 800 epochs in the paper
  o.end_lr = 0.0
  o.grad_clip_norm = 0.0            # 0: no clipping (the MAE recipe)
  return o


def classifier_model(backbone: str, variant: str = "S/16", width: float = 1.0,
                     probe: bool = False) -> ml_collections.ConfigDict:
  """Classifier section: the backbone and its options (CNN ones and ViT ones side by side)."""
  m = ml_collections.ConfigDict()
  m.backbone = backbone                # resnet38, resnet50 or vit
  m.width = width                      # CNN channel multiplier (1.0: the published network)
  m.output_stride = 32                 # ResNet-50: 32, 16 or 8 (dilated last stages)
  m.head_dropout = 0.5
  m.freeze_stem = False                # the authors freeze conv1a + b2* (with ImageNet weights)
  m.freeze_bn = False                  # ... and every BatchNorm (statistics and affine)
  m.variant = variant                  # ViT
  m.pool = "cls" if probe else "gap"
  m.linear_probe = probe
  m.drop_path = 0.2
  m.pos_embed = "sincos"               # ViT; "learned" for timm's supervised checkpoints
  m.attention = "xla"                  # ViT; "cudnn": flash attention (GPU, bf16), "pallas": TPU
  m.gelu = "exact"                     # ViT; the MLP's GELU: "exact" (erf) or "tanh"
  m.remat = "none"                     # ViT; "block" | "dots": recompute blocks in the backward
  m.init_from = ""
  return m


def segment_model(name: str = "deeplabv3plus", backbone: str = "resnet38", width: float = 0.125,
                  paper: bool = False) -> ml_collections.ConfigDict:
  """Segmenter section: DeepLabV3+ (paper: ResNet-101, output stride 16) or the MRN U-Net."""
  m = ml_collections.ConfigDict()
  m.name = name                         # deeplabv3plus or mrn
  m.backbone = "resnet101" if paper else backbone  # resnet50, resnet101, resnet38
  m.width = 1.0 if paper else width
  m.output_stride = 16                  # ResNet-50/101 (ResNet38 is 8)
  m.multi_grid = (1, 2, 4)
  m.aspp_rates = (6, 12, 18)            # at output stride 16; doubled at 8
  m.mrn_depth = 4
  m.context_scale = 2
  m.mrn_upsample = "transposed"         # or bilinear
  m.init_from = ""                      # a classify workdir whose backbone initialises ours
  if name == "mrn":
    m.width = 1.0 if paper else 0.25
    m.mrn_depth = 4 if paper else 3
  return m


PDA_PRESETS = ("paper", "released", "off")


def pda(preset: str = "paper") -> ml_collections.ConfigDict:
  """Progressive Dropout Attention schedule (Han et al. 2022).

  paper: mu = 1 for `warmup_epochs`, then mu <- sigma mu at the end of each epoch, clipped at
    `lower_bound` (sigma 0.985, bound 0.65).
  released: the authors' code: mu *= 0.98 at the end of every epoch (warm-up included) while
    mu > 0.65, so mu ends at 0.641 ('check' bound).
  Both apply the attention from epoch `warmup_epochs` on, as the released code does.
  `attend_in_warmup=True` applies it (with mu = 1) from the first step: with a freshly initialised
  head every class map can be <= 0, the attention is then 0 everywhere, the features vanish and
  learning stops (measured on the embedded data: the loss stays at ln 2).
  """
  if preset not in PDA_PRESETS:
    raise UserError(f"config argument pda={preset!r} is not one of {PDA_PRESETS}")
  p = ml_collections.ConfigDict()
  p.enabled = preset != "off"
  p.warmup_epochs = 3
  p.sigma = 0.98 if preset == "released" else 0.985
  p.lower_bound = 0.65
  p.bound = "check" if preset == "released" else "clip"  # check: multiply only while mu > bound
  p.attend_in_warmup = False  # True: apply PDA (with mu = 1) during the warm-up epochs too
  p.decay_in_warmup = preset == "released"   # decay mu at the end of warm-up epochs too
  return p


def classify_optim(backbone: str, probe: bool = False) -> ml_collections.ConfigDict:
  """SGD poly for the CNNs (multi-layer pseudo-supervision recipe); AdamW + layer-wise decay for
  ViT fine-tuning and LARS for linear probing (MAE recipes)."""
  o = ml_collections.ConfigDict()
  o.name = "sgd"
  o.base_lr = 0.01
  o.lr_batch_scaling = False    # True: lr = base_lr * batch / 256
  o.schedule = "poly"           # poly (power below) or cosine
  o.poly_power = 0.9
  o.warmup_steps = 0
  o.end_lr = 0.0                # cosine only
  # The released code passes weight decay into SGD's momentum slot (momentum ~5e-4); 0.9 is the
  # paper's and torch's intended setting.
  o.momentum = 0.9
  o.nesterov = False
  o.weight_decay = 5e-4
  o.head_lr_mult = 10.0         # the from-scratch head learns 10x faster (CNNs)
  o.layer_decay = 0.75          # ViT layer-wise lr decay (0.65 for B in MAE; 0.55 one X-ray recipe)
  o.b1, o.b2 = 0.9, 0.999
  o.grad_clip_norm = 0.0
  if backbone == "vit":
    o.name = "lars" if probe else "adamw"
    o.base_lr = 0.1 if probe else 5e-4
    o.lr_batch_scaling = True
    o.schedule = "cosine"
    o.weight_decay = 0.0 if probe else 0.05
  return o


def relevance_options(config: ml_collections.ConfigDict) -> None:
  """Per-method option sections of the maps phase (and of the maps benchmark)."""
  config.lrp = dict(composite="EpsilonPlusFlat", epsilon=1e-6, gamma=0.25)
  config.scorecam = dict(score_batch=64)  # masked forward passes per device call
