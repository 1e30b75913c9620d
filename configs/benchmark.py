"""Train-step throughput and MFU of every trained model:

  --config=configs/benchmark.py:model=mae,variant=B/16,batch=32
  --config=configs/benchmark.py:model=resnet38,batch=8      (ResNet38 + PDA, 224 px)
  --config=configs/benchmark.py:model=resnet50,batch=32
  --config=configs/benchmark.py:model=vit,variant=B/16,batch=32   (supervised ViT fine-tuning)
  --config=configs/benchmark.py:model=deeplabv3plus,batch=8       (ResNet-101, output stride 16)
  --config=configs/benchmark.py:model=mrn,image_size=512,batch=4  (target + context windows)
  --config=configs/benchmark.py:model=mae,variant=L/16,fsdp=8,remat=block,scan=True
  --config=configs/benchmark.py:model=resnet50,batch=8,relevance=gradcam   (maps/s, 4 classes)
  --config=configs/benchmark.py:model=resnet50,batch=8,relevance=lrp:EpsilonPlusFlat

`profile=True` also traces three steps into <workdir>/profile (TensorBoard/xprof) and prints
and writes (profile_summary.json) the device time per step by op, kernel and category.

Times steady-state steps on a device-resident batch and divides the step's matmul and
convolution FLOPs (counted from its jaxpr) by a matmul peak measured in the same run
(`matmul=8192` on large GPUs) and, with bf16=True on a known accelerator, by its datasheet peak. `total_steps` is the number of timed steps.
"""
from wsss_jax import config_lib


def get_config(arg=None, **overrides):
  arg = config_lib.parse_arg(arg, overrides, model="mae", variant="B/16", image_size=224, batch=32,
                             steps=10, warmup=2, bf16=False, gather="take", paper=True,
                             width=1.0, relevance="", matmul=2048,
                             attention="xla", gelu="exact", profile=False, fsdp=1,
                             devices=-1, remat="none", scan=False, backbone="resnet101",
                             real_input=False, workers=0, threads=2)
  config = config_lib.common("benchmark")
  config.batch_size = arg.batch
  config.total_steps = arg.steps
  config.warmup_steps = arg.warmup
  config.mixed_precision = arg.bf16
  config.num_devices = arg.devices  # the first n devices (weak-scaling runs)
  config.parallel.fsdp = arg.fsdp   # devices each parameter is split over (ZeRO-3)
  config.profile = arg.profile  # trace 3 steps to <workdir>/profile, print device time by op
  config.matmul_size = arg.matmul  # side of the peak-FLOP/s matmul (8192 on big GPUs)
  config.data = config_lib.data(arg.image_size)
  # also time the step fed by the grain pipeline (the embedded tiles by default): images/s with
  # input and data_wait_fraction; workers = grain processes, threads = reader threads
  config.real_input = arg.real_input
  config.data.num_workers, config.data.num_threads = arg.workers, arg.threads
  if arg.model == "mae":
    config.model = config_lib.mae_model(arg.variant, 0.75, arg.paper, arg.gather)
    config.optim = config_lib.mae_optim(arg.steps)
    config.model.remat, config.model.scan_blocks = arg.remat, arg.scan
  elif arg.model in ("deeplabv3plus", "mrn"):  # the segment phase's step, 3 pseudo-mask layers
    config.data.num_classes = 4
    config.data.normalize = False
    config.data.mask_layers = ("b4_5", "b5_2", "bn7")
    config.data.pair_size = arg.image_size  # MRN: target and context windows of this size
    config.data.context_scale = 2
    config.loss_weights = (0.2, 0.2, 0.6)
    config.loss = "setting"  # ce for the tissue-map tiles
    config.model = config_lib.segment_model(arg.model, arg.backbone, arg.width, arg.paper)
    config.optim = config_lib.classify_optim("resnet38")
    config.num_epochs, config.data.num_train = 1, arg.batch * arg.steps
  else:  # a classifier: the classify phase's sections
    config.data.num_classes = 4
    config.data.normalize = arg.model == "vit"
    config.model = config_lib.classifier_model(arg.model, arg.variant, arg.width)
    config.pda = config_lib.pda("paper" if arg.model != "vit" else "off")
    config.pda.warmup_epochs = 0  # time the step with PDA on
    config.optim = config_lib.classify_optim(arg.model)
    config.mixup_alpha = config.cutmix_alpha = config.label_smoothing = 0.0
  config.model.name = arg.model
  if arg.model in ("mae", "vit"):
    config.model.attention = arg.attention  # "cudnn" on GPUs, "pallas" on TPUs
    config.model.gelu = arg.gelu            # "tanh": the tanh approximation
  if arg.model == "vit":
    config.model.remat = arg.remat
  config.relevance = arg.relevance  # a maps-phase method spec: time maps/s instead of training
  config_lib.relevance_options(config)
  return config
