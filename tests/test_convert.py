"""PyTorch -> Flax conversion: each architecture built in PyTorch with random weights (and
random BatchNorm statistics), saved as a .pth file, converted, and compared on the same input."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm  # the test extra installs torch, torchvision and timm
import torch
import torchvision
from torch import nn as tnn

from benchmarks.torch_models import TorchMAE, TorchResNet38
from wsss_jax import convert
from wsss_jax.errors import UserError
from wsss_jax.models import classifier, mae as mae_lib, resnet, resnet38, vit
from wsss_jax.train import earlier_runs

torch.manual_seed(0)
RTOL = 1e-5


def _rel_err(ours, theirs) -> float:
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def _randomise_batch_norm(model: tnn.Module) -> None:
  """Non-trivial BN statistics and affine parameters, so their conversion is exercised."""
  for m in model.modules():
    if isinstance(m, tnn.BatchNorm2d):
      with torch.no_grad():
        m.running_mean.uniform_(-0.5, 0.5)
        m.running_var.uniform_(0.5, 2.0)
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.2, 0.2)


def _save(tmp_path, state_dict, wrap=None) -> str:
  path = str(tmp_path / "weights.pth")
  torch.save({wrap: state_dict} if wrap else state_dict, path)
  return path


def _images(batch=2, size=32, seed=1):
  x = np.random.default_rng(seed).normal(size=(batch, 3, size, size)).astype(np.float32)
  return x, jnp.asarray(x.transpose(0, 2, 3, 1))  # NCHW for torch, NHWC for Flax


# --- ViT (timm) --------------------------------------------------------------------------------------
@pytest.mark.parametrize("global_pool", ["token", "avg"])  # timm supervised / MAE fine-tuned
def test_timm_vit_classifier_logits(tmp_path, global_pool):
  tm = timm.models.vision_transformer.VisionTransformer(
      img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, mlp_ratio=4, num_classes=5,
      global_pool=global_pool, fc_norm=global_pool == "avg").eval()
  with torch.no_grad():
    tm.pos_embed.normal_(0, 0.5)  # a learned table, not the sin-cos one
  params, stats, info, skipped = convert.convert(
      convert.read_state_dict(_save(tmp_path, tm.state_dict(), "model")), "vit")
  assert info["variant"] == "mu/8" and info["pool"] == ("gap" if global_pool == "avg" else "cls")
  assert not stats and not skipped
  cfg = _vit_cfg(info)
  model = classifier.build_classifier(cfg, 32, 5)
  x, xj = _images()
  ours = model.apply({"params": params}, xj)
  with torch.no_grad():
    theirs = tm(torch.from_numpy(x)).numpy()
  assert _rel_err(ours, theirs) < RTOL


def _vit_cfg(info):
  from wsss_jax import config_lib
  cfg = config_lib.classifier_model("vit", info["variant"])
  cfg.pool, cfg.pos_embed, cfg.drop_path = info["pool"], info["pos_embed"], 0.0
  return cfg


# --- MAE ---------------------------------------------------------------------------------------------
def test_mae_encoder_and_decoder_predictions(tmp_path):
  tm = TorchMAE().eval()
  params, _, info, _ = convert.convert(
      convert.read_state_dict(_save(tmp_path, tm.state_dict(), "model")), "mae",
      decoder_heads=4)
  assert info["decoder"] and (info["decoder_width"], info["decoder_depth"]) == (32, 2)
  model = mae_lib.MaskedAutoencoder(vit.VisionTransformer.from_variant("mu/8", 32),
                                    decoder_width=32, decoder_depth=2, decoder_heads=4)
  x, xj = _images()
  masking = mae_lib.random_masking(jax.random.PRNGKey(3), 2, 16, 0.75)
  keep = masking.ids_keep.shape[1]
  ids_shuffle = np.argsort(np.asarray(masking.ids_restore), 1)  # visible first, as ours
  out = model.apply({"params": params}, xj, masking)
  with torch.no_grad():
    theirs = tm(torch.from_numpy(x), torch.from_numpy(ids_shuffle), keep).numpy()
  assert _rel_err(out.pred, theirs) < RTOL


def test_mae_encoder_only_release_and_bad_files(tmp_path, capsys):
  sd = {k: v for k, v in TorchMAE().state_dict().items()
        if not k.startswith(("decoder", "mask_token"))}
  path = _save(tmp_path, sd, "model")
  result = convert.run(path, str(tmp_path / "w"), "mae")
  assert not result["info"]["decoder"] and "starts a fresh decoder" in capsys.readouterr().out
  assert os.path.isdir(tmp_path / "w" / "checkpoints" / "0")
  with pytest.raises(UserError, match="already holds checkpoints"):
    convert.run(path, str(tmp_path / "w"), "mae")
  # A learned table is refused by the MAE architecture, an unknown key is named.
  sd_learned = dict(sd, pos_embed=torch.randn_like(sd["pos_embed"]))
  with pytest.raises(UserError, match="pos_embed .* is not the fixed sin-cos table"):
    convert.convert(convert.read_state_dict(_save(tmp_path, sd_learned)), "mae")
  sd_extra = dict(sd, **{"blocks.0.ls1.gamma": torch.ones(64)})
  with pytest.raises(UserError, match=r"1 key\(s\) .* no place in --arch=mae: blocks.0.ls1.gamma"):
    convert.convert(convert.read_state_dict(_save(tmp_path, sd_extra)), "mae")
  sd_missing = {k: v for k, v in sd.items() if k != "blocks.1.mlp.fc2.bias"}
  with pytest.raises(UserError, match="lacks 'blocks.1.mlp.fc2.bias'"):
    convert.convert(convert.read_state_dict(_save(tmp_path, sd_missing)), "mae")
  (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
  with pytest.raises(UserError, match="junk.pth is not a readable PyTorch checkpoint"):
    convert.read_state_dict(str(tmp_path / "junk.pth"))


def _init_from(tmp_path, workdir, arg, **fields):
  """The classify phase's state after `model.init_from=workdir`."""
  from conftest import load_config

  from wsss_jax.device import parallel
  from wsss_jax.phases import classify
  config = load_config("classify", "image_size=32,batch=8,epochs=1,num_train=16," + arg)
  config.model.update(fields)
  mesh = parallel.make_mesh(1)
  t = classify.build_training(config, mesh)
  return jax.device_get(earlier_runs.load_pretrained(jax.jit(t.init_state)(), workdir, t.model, mesh,
                                                config.model.backbone))


def test_converted_workdirs_initialise_classifiers(tmp_path):
  """A converted timm ViT and a converted torchvision ResNet-50 are model.init_from workdirs."""
  tm = timm.models.vision_transformer.VisionTransformer(
      img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=5)
  convert.run(_save(tmp_path, tm.state_dict()), str(tmp_path / "vit"), "vit")
  state = _init_from(tmp_path, str(tmp_path / "vit"), "backbone=vit,variant=mu/8",
                     pos_embed="learned")
  np.testing.assert_array_equal(state.params["encoder"]["pos_embed"],
                                tm.pos_embed.detach().numpy())
  np.testing.assert_array_equal(state.params["encoder"]["blocks_1"]["mlp"]["fc2"]["kernel"],
                                tm.blocks[1].mlp.fc2.weight.detach().numpy().T)
  with pytest.raises(UserError, match="has encoder/pos_embed .* which this model lacks"):
    _init_from(tmp_path, str(tmp_path / "vit"), "backbone=vit,variant=mu/8")
  r50 = torchvision.models.resnet50(weights=None)
  _randomise_batch_norm(r50)
  convert.run(_save(tmp_path, r50.state_dict()), str(tmp_path / "r50"), "resnet50")
  state = _init_from(tmp_path, str(tmp_path / "r50"), "backbone=resnet50,width=1.0")
  np.testing.assert_array_equal(state.params["backbone"]["layer3_4"]["conv2"]["kernel"],
                                r50.layer3[4].conv2.weight.detach().numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(state.batch_stats["backbone"]["layer2_0"]["downsample_bn"]["var"],
                                r50.layer2[0].downsample[1].running_var.numpy())


# --- torchvision ResNets -----------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [50, 101])
def test_torchvision_resnet_features(tmp_path, depth):
  tm = getattr(torchvision.models, f"resnet{depth}")(weights=None).eval()
  _randomise_batch_norm(tm)
  params, stats, info, skipped = convert.convert(
      convert.read_state_dict(_save(tmp_path, tm.state_dict())), f"resnet{depth}")
  assert skipped == ["fc.bias", "fc.weight"] and info["width"] == 1.0
  model = resnet.ResNet(depth)
  x, xj = _images(size=64)
  ours = model.apply({"params": params["backbone"], "batch_stats": stats["backbone"]}, xj)
  with torch.no_grad():
    t = tm.maxpool(tm.relu(tm.bn1(tm.conv1(torch.from_numpy(x)))))
    theirs = tm.layer4(tm.layer3(tm.layer2(tm.layer1(t)))).numpy().transpose(0, 2, 3, 1)
  assert _rel_err(ours, theirs) < RTOL
  with pytest.raises(UserError, match=r"has \(3, 4, 6, 3\) blocks per stage; ResNet-101"):
    convert.convert(convert.read_state_dict(_save(tmp_path, torchvision.models.resnet50(
        weights=None).state_dict())), "resnet101")


# --- ResNet38 (the authors' layout) -------------------------------------------------------------------
def test_resnet38_features_and_logits(tmp_path):
  tm = TorchResNet38().eval()
  _randomise_batch_norm(tm)
  params, stats, info, _ = convert.convert(
      convert.read_state_dict(_save(tmp_path, tm.state_dict(), "state_dict")), "resnet38")
  assert info == {"width": 0.0625, "num_classes": 4}
  from wsss_jax import config_lib
  cfg = config_lib.classifier_model("resnet38", width=0.0625)
  model = classifier.build_classifier(cfg, 32, 4)
  x, xj = _images()
  variables = {"params": params, "batch_stats": stats}
  logits = model.apply(variables, xj)
  features = resnet38.ResNet38(0.0625).apply({"params": params["backbone"],
                                               "batch_stats": stats["backbone"]}, xj)
  with torch.no_grad():
    t_features, t_logits = tm(torch.from_numpy(x))
  assert _rel_err(features, t_features.numpy().transpose(0, 2, 3, 1)) < RTOL
  assert _rel_err(logits, t_logits.numpy()) < RTOL


def test_convert_command_line_errors(tmp_path):
  import subprocess
  import sys
  out = subprocess.run([sys.executable, "-m", "wsss_jax.convert", f"--from={tmp_path}/none.pth",
                        f"--to={tmp_path}/w", "--arch=vit"], capture_output=True, text=True)
  assert out.returncode == 2 and "none.pth is not a file" in out.stdout
  assert "Traceback" not in out.stderr
