"""Every test process sees 8 host CPU devices, so sharded and 1-device runs can be compared."""
import os

# The tests' programs are tiny and their time is mostly XLA compilation, so they are compiled
# cheaply: LLVM at -O0 and XLA:CPU's elemental fusion emitter instead of its MLIR fusion emitters
# (measured in BENCHMARKS.md, "Test-suite time"). Both change code speed, not what is computed.
# A flag set in XLA_FLAGS yourself wins.
TEST_COMPILE_FLAGS = {"xla_backend_optimization_level": "0",
                      "xla_cpu_use_fusion_emitters": "false"}


def compile_flags(existing: str = "") -> str:
  """TEST_COMPILE_FLAGS as XLA_FLAGS text, less those `existing` sets already."""
  return " ".join(f"--{k}={v}" for k, v in TEST_COMPILE_FLAGS.items() if k not in existing)


_user_flags = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join([_user_flags, "--xla_force_host_platform_device_count=8",
                                    compile_flags(_user_flags)]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session's workers and the subprocesses they start:
# the resume, sharding and phase tests compile the same tiny programs many times (with it the
# suite took 10.6 instead of 16.5 minutes on 2 cores). A hit is an identical program.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", ".pytest_cache", "jax_compilation_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402  (must come after XLA_FLAGS)
import pytest  # noqa: E402


# Phase runs in tests use the first 2 of the 8 devices unless a test asks for more: still sharded
# (batches split, parameters replicated, results gathered), and a tiny classify run takes 28
# instead of 36 s. The tests of sharding itself build their meshes of 1, 2 and 8 devices.
PHASE_DEVICES = 2


def load_config(name: str, arg: str = ""):
  """`configs/<name>.py:<arg>` as main loads it (config files are loaded by path), with every
  `num_devices=-1` (all devices) in it set to PHASE_DEVICES."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      f"{name}_config", os.path.join(os.path.dirname(__file__), "..", "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  _use_phase_devices(config)
  return config


def _use_phase_devices(config):
  import ml_collections
  if config.get("num_devices") == -1:
    config.num_devices = PHASE_DEVICES
  for value in config.values():
    if isinstance(value, ml_collections.ConfigDict):
      _use_phase_devices(value)


def tiny_pipeline_config(arg=""):
  """configs/pipeline.py:<arg> at CPU-test size: 1-epoch 1/16-width ResNet38s at 32 px."""
  config = load_config("pipeline", arg)
  if "rounds=" not in arg:  # self-training rounds only where a test asks for them
    config.self_training.rounds = "0"
  if config.ignore_band.width == "auto" and "band=" not in arg:  # likewise the band's widths
    config.ignore_band.width = "0"
  if "image_size=" not in arg:  # and the input sides (the tests' own is set below)
    config.image_sizes = ()
  cls = config.classify
  cls.model.width, cls.data.image_size, cls.batch_size, cls.num_epochs = 0.0625, 32, 8, 1
  cls.data.num_train, cls.data.tile_size, cls.data.num_val = 32, 48, 8
  cls.data.num_threads, cls.log_every, cls.async_checkpointing = 1, 4, False
  config.pseudo_masks.batch_size = 8
  config.pseudo_masks.scales = (1.0, 1.5)
  seg = config.segment
  seg.model.width, seg.data.image_size, seg.batch_size, seg.num_epochs = 0.0625, 32, 8, 1
  seg.data.tile_size, seg.data.num_val, seg.data.num_test, seg.data.num_threads = 48, 4, 8, 1
  seg.log_every, seg.async_checkpointing, seg.eval_batch_size = 2, False, 8
  return config


@pytest.fixture
def tiny_pretrain_config():
  """A pretrain config small enough for a CPU test: 32 px images, a 2-block 64-wide ViT."""
  config = load_config("mae", "variant=mu/8,image_size=32,batch=8,steps=6,eval=none")
  config.log_every = 2
  config.checkpoint_every = 3
  config.num_figure_images = 2
  config.async_checkpointing = False
  config.data.num_train = 64
  config.data.num_val = 4
  config.data.tile_size = 48
  config.data.num_threads = 1
  config.model.decoder_width = 32
  config.model.decoder_depth = 1
  config.model.decoder_heads = 2
  config.optim.warmup_steps = 2
  config.optim.base_lr = 1e-2
  return config


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory):
  """A classify workdir (ResNet38 at 1/16 width, 32 px inputs of 48 px tiles, 2 epochs of 32)
  shared by the maps, pseudo-mask, segmentation and pipeline tests."""
  from wsss_jax.phases import classify
  workdir = tmp_path_factory.mktemp("cls")
  config = load_config("classify", "width=0.0625,image_size=32,batch=8,epochs=2,num_train=32")
  config.data.tile_size, config.data.num_val, config.data.num_threads = 48, 8, 1
  config.log_every, config.checkpoint_every, config.async_checkpointing = 4, 100, False
  classify.run(config, str(workdir))
  with open(workdir / "config.json", "w") as f:  # as main writes it
    f.write(config.to_json_best_effort())
  return str(workdir)


# The longest tests (by --durations on a 2-core CPU) start first: under pytest-xdist
# none of them is then left running alone at the end of the suite. The rest keep their order.
SLOWEST_FIRST = (
    "test_pipeline.py::test_pipeline_end_to_end_with_erasing_affinity_upper_bound_and_resume",
    "test_pipeline.py::test_input_side_band_width_and_rounds_are_chosen_on_val",
    "test_preemption.py::test_sigterm_from_outside_stops_every_process_at_one_step",
    "test_pretext.py::test_resnet_pretext_run_initialises_a_resnet_classifier",
    "test_classify.py::test_classifier_learns_the_embedded_dataset",
    "test_classify.py::test_mu_is_checkpointed_and_resumes_exactly",
    "test_main.py::test_two_processes_on_localhost_then_resume_on_one",
)


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
  ids = {item.nodeid.rsplit("/", 1)[-1] for item in items}
  whole_files = not any("::" in arg for arg in config.args)  # not `pytest file.py::test`
  selected = config.getoption("keyword") or config.getoption("markexpr") or config.getoption("lf")
  if os.environ.get("CI") and whole_files and not selected:  # the full run of .ci/run
    files = {i.split("::")[0] for i in ids}
    lost = [name for name in SLOWEST_FIRST if name.split("::")[0] in files and name not in ids]
    if lost:  # a renamed test would silently lose its early start
      raise pytest.UsageError(f"conftest.SLOWEST_FIRST names tests that do not exist: {lost}")
  items.sort(key=lambda item: rank.get(item.nodeid.rsplit("/", 1)[-1], len(rank)))


def pytest_report_header(config):
  return f"jax {jax.__version__}, {jax.device_count()} devices ({jax.devices()[0].platform})"
