"""Dataset statistics and checks, ArrayRecord packing, and the input-speed benchmark:

  python -m wsss_jax.main --config=configs/dataset.py:action=stats,dataset=luad_histoseg,root=PATH --workdir=runs/stats
  python -m wsss_jax.main --config=configs/dataset.py:action=build,dataset=bcss_wsss,root=PATH --workdir=runs/rec
  python -m wsss_jax.main --config=configs/dataset.py:action=input --workdir=runs/input

`stats` and `build` read the release at `root` (any layout the folder readers accept);
`build` writes the shards to data.records_dir (default <workdir>/records): train on them with
--config.data.records_dir=<that folder>. `input` times decoding + augmentation from PNG files and
from ArrayRecord (with no root: on a release-shaped folder of embedded 224 px tiles).
"""
from wsss_jax import config_lib
from wsss_jax.data import folders


def get_config(arg=None, **overrides):
  arg = config_lib.parse_arg(arg, overrides, action="stats", **config_lib.DATASET_ARGS,
                             image_size=224, threads=2, batch=32)
  config = config_lib.common("dataset")
  config.action = arg.action
  config.batch_size = arg.batch        # input: batch of the timed grain pipeline
  config.batches = 20                  # input: timed batches
  config.per_core_images = 200         # input: images timed on one thread
  config.embedded_train = 512          # build/input without a root: embedded tiles written
  config.embedded_val = 64
  dataset = folders.choose_dataset(arg)
  config.data = config_lib.data(arg.image_size, dataset)
  config.data.class_names = dataset.class_names
  config.data.num_classes = len(dataset.class_names) or 4
  config.data.crop_scale = (1.0, 1.0)  # the classifier recipe: resize, flips
  config.data.vflip = True
  config.data.num_threads = arg.threads
  return config
