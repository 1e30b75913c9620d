"""A trained segmenter applied to new images: a folder of tiles, one slide, or a folder of slides.

  python -m wsss_jax.main --config=configs/predict.py:model=runs/wsss/segment,input=/data/new_tiles --workdir=runs/pred
  python -m wsss_jax.main --config=configs/predict.py:model=runs/wsss/segment,input=/data/slide.svs --workdir=runs/pred_slide
  python -m wsss_jax.main --config=configs/predict.py:model=runs/seg,input=/data/slides,overlap=0.5,probs=True ...

`model` is a segment run's workdir (DeepLabV3+), or a finished pipeline run's (its kept
segmenter): the best checkpoint and config.json give the classes, palette, input size and
normalisation. A folder's PNG/JPEG/BMP/DICOM files and its untiled TIFFs are tiles, its
SVS/NDPI/... files and tiled or pyramidal TIFFs slides (`mode=tiles|slides` to choose). Outputs and their formats:
wsss_jax/phases/predict.py and docs/predict.md. A re-run continues a killed one.
"""
from wsss_jax import config_lib


def get_config(arg=None, **overrides):
  arg = config_lib.parse_arg(arg, overrides, model="runs/seg", input="", mode="auto", probs=False,
                             gate="exclude", overlap=0.25, batch=16, downsample=1.0,
                             min_tissue=-1.0, tolerance=2.0, frames="first")
  config = config_lib.common("predict")
  config.model_workdir = arg.model    # a segment run, or a pipeline run (its kept segmenter)
  config.input = arg.input            # a folder of tiles, one slide, or a folder of slides
  config.mode = arg.mode              # auto, tiles or slides
  config.batch_size = arg.batch       # windows (tiles) per device call, over all devices
  config.save_probabilities = arg.probs  # tiles: probabilities/<tile>.npz, float16
  config.frames = arg.frames          # multi-frame DICOM (cine): its first frame, or all as tiles
  config.gate = arg.gate              # tiles: exclude classes the run's gate classifier rejects
  config.overlap = arg.overlap        # slides: share of a window its neighbour covers again
  config.downsample = arg.downsample  # slides: x the training scale (tile_size / image_size)
  config.min_tissue = arg.min_tissue  # slides: windows with less tissue are background;
                                      # -1: 0.1 for tissue maps (H&E), 0 (every window) for findings
  config.geojson_tolerance = arg.tolerance  # slides: polygon simplification, level-0 px
  config.tiff_tile = 256              # slides: mask.tif tile side
  config.overlays = 6                 # tiles shown in overlays/predict.png
  config.progress_every_s = 10.0
  return config
