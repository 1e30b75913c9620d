"""The images clinicians have: 16-bit and single-channel files, OME-TIFF, DICOM (written here with
pydicom: MONOCHROME1 and 2, 16-bit, rescale, windows, multi-frame, a compressed syntax without its
decoder), each checked against the mapping computed by hand in numpy; then a segmenter trained on
16-bit single-channel tiles and applied by predict to the same files, and a DICOM predicted into
a DICOM Segmentation that references it."""
import json
import os

import numpy as np
import pydicom
import pytest
import tifffile
from conftest import load_config
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import JPEG2000Lossless, ExplicitVRLittleEndian, generate_uid

from wsss_jax.data import dicom, folders, intensity, pipeline
from wsss_jax.errors import UserError
from wsss_jax.runner import run_phase


# --- Rules -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,want", [
    ("auto", intensity.IntensityRule("auto")),
    ("percentile:1,99", intensity.IntensityRule("percentile", 1, 99)),
    ("window:-100,400", intensity.IntensityRule("window", -100, 400)),
    ("full_range", intensity.IntensityRule("full_range"))])
def test_rules_parse_and_print_back(text, want):
  rule = intensity.parse_rule(text)
  assert rule == want and str(rule) == text


@pytest.mark.parametrize("text", ["percentile:99,1", "percentile:1,200", "window:5", "gamma",
                                  "auto:1,2", "window:a,b"])
def test_a_wrong_rule_is_one_line_naming_the_field(text):
  with pytest.raises(UserError, match=r"data.intensity=") as error:
    intensity.parse_rule(text)
  assert "\n" not in str(error.value)


def _scaled(values, low, high):
  """The rule's mapping by hand: low -> 0, high -> 255, rounded, clipped."""
  return np.clip(np.rint((values.astype(np.float64) - low) * 255 / (high - low)), 0, 255)


def test_16_bit_grey_by_each_rule_against_numpy():
  rng = np.random.default_rng(0)
  grey = rng.integers(200, 40000, (20, 30)).astype(np.uint16)
  raw = intensity.Raw(grey)
  lo, hi = np.percentile(grey, (0.5, 99.5))
  cases = {"auto": (lo, hi), "percentile:2,98": tuple(np.percentile(grey, (2, 98))),
           "window:1000,30000": (1000, 30000), "full_range": (0, 65535)}
  for text, (low, high) in cases.items():
    out = intensity.to_rgb8(raw, intensity.parse_rule(text))
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    assert np.abs(out[..., 0].astype(int) - _scaled(grey, low, high)).max() <= 1, text
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()  # grey


def test_8_bit_rgb_is_kept_and_alpha_dropped():
  rgba = np.random.default_rng(1).integers(0, 256, (8, 9, 4)).astype(np.uint8)
  out = intensity.to_rgb8(intensity.Raw(rgba), intensity.IntensityRule())
  np.testing.assert_array_equal(out, rgba[..., :3])


def test_files_16_bit_png_and_ome_tiff_channels_first_with_pixel_size(tmp_path):
  grey = (np.arange(40 * 50).reshape(40, 50) * 13).astype(np.uint16)
  Image.fromarray(grey).save(tmp_path / "g.png")
  raw = intensity.read_raw(str(tmp_path / "g.png"))
  assert raw.pixels.dtype == np.uint16
  np.testing.assert_array_equal(raw.pixels, grey)
  planes = np.stack([grey, grey // 2, grey // 3])  # (C, H, W) as microscopes write OME-TIFF
  tifffile.imwrite(tmp_path / "c.ome.tif", planes, metadata={
      "axes": "CYX", "PhysicalSizeX": 0.325, "PhysicalSizeY": 0.5})
  raw = intensity.read_raw(str(tmp_path / "c.ome.tif"))
  assert raw.pixels.shape == (40, 50, 3)
  np.testing.assert_array_equal(raw.pixels[..., 1], grey // 2)
  assert raw.pixel_size_um == pytest.approx((0.5, 0.325))
  assert intensity.image_shape(str(tmp_path / "c.ome.tif")) == (40, 50)
  tifffile.imwrite(tmp_path / "z.tif", np.zeros((7, 40, 50), np.uint16))  # a z-stack
  with pytest.raises(UserError, match=r"z.tif has shape \(7, 40, 50\)"):
    intensity.read_raw(str(tmp_path / "z.tif"))


# --- DICOM -------------------------------------------------------------------------------------------
def write_dicom(path, pixels, photometric="MONOCHROME2", slope=1.0, intercept=0.0, window=None,
                spacing_mm=None, syntax=ExplicitVRLittleEndian):
  """A small single- or multi-frame grey DICOM image, written with pydicom."""
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # secondary capture
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = syntax
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
  ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "P1", "Test^P", "", "O"
  ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
  ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20261207", "000000", "1", "1"
  ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.Manufacturer = "OT", 1, 1, "test"
  ds.ReferringPhysicianName = ""
  ds.Rows, ds.Columns = pixels.shape[-2:]
  if pixels.ndim == 3:
    ds.NumberOfFrames = pixels.shape[0]
  ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
  ds.BitsAllocated = ds.BitsStored = 16
  ds.HighBit, ds.PixelRepresentation = 15, 0
  ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
  if window:
    ds.WindowCenter, ds.WindowWidth = window
  if spacing_mm:
    ds.PixelSpacing = list(spacing_mm)
  if syntax == ExplicitVRLittleEndian:
    ds.PixelData = pixels.astype(np.uint16).tobytes()
  else:  # a compressed syntax: what the file carries needs a decoder
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\x4f\xff\x51" + bytes(64)])
  ds.save_as(path, enforce_file_format=True)
  return ds


def test_a_monochrome1_16_bit_dicom_round_trips_with_its_window_and_spacing(tmp_path):
  stored = np.random.default_rng(2).integers(0, 4096, (24, 32)).astype(np.uint16)
  path = str(tmp_path / "cr.dcm")
  write_dicom(path, stored, "MONOCHROME1", slope=2.0, intercept=-100.0, window=(3000, 2001),
              spacing_mm=(0.15, 0.2))
  raw = dicom.read(path)
  np.testing.assert_allclose(raw.pixels, stored * 2.0 - 100.0)  # the modality LUT
  # PS3.3 C.11.2.1.2: c - 0.5 -/+ (w - 1) / 2
  assert raw.window == pytest.approx((3000 - 0.5 - 1000, 3000 - 0.5 + 1000))
  assert raw.invert and raw.pixel_size_um == pytest.approx((150.0, 200.0))
  out = intensity.to_rgb8(raw, intensity.IntensityRule())
  want = 255 - _scaled(stored * 2.0 - 100.0, *raw.window)  # windowed, then inverted
  assert np.abs(out[..., 0].astype(int) - want).max() <= 1
  # a fixed window in the rescaled units wins over the file's
  out = intensity.to_rgb8(raw, intensity.parse_rule("window:0,8000"))
  assert np.abs(out[..., 0].astype(int) - (255 - _scaled(stored * 2.0 - 100.0, 0, 8000))).max() <= 1


def test_a_multi_frame_dicom_reads_the_frame_asked_for(tmp_path):
  cine = np.stack([np.full((16, 16), 100 * (i + 1), np.uint16) for i in range(3)])
  path = str(tmp_path / "cine.dcm")
  write_dicom(path, cine)
  assert dicom.read(path).pixels.max() == 100
  assert dicom.read(path, frame=2).pixels.max() == 300
  with pytest.raises(UserError, match="has 3 frames; frame 5"):
    dicom.read(path, frame=5)


def test_a_compressed_dicom_without_its_decoder_names_the_file_and_the_package(tmp_path):
  path = str(tmp_path / "j2k.dcm")
  write_dicom(path, np.zeros((16, 16), np.uint16), syntax=JPEG2000Lossless)
  try:
    dicom.read(path)
  except UserError as e:
    line = str(e)
    assert "\n" not in line and "j2k.dcm" in line and "pip install pylibjpeg" in line, line
  else:
    pytest.skip("a JPEG 2000 decoder is installed here")
  with pytest.raises(UserError, match="not_dicom.dcm cannot be read"):
    (tmp_path / "not_dicom.dcm").write_text("hello")
    dicom.read(str(tmp_path / "not_dicom.dcm"))


# --- Train on 16-bit tiles, predict the same files ----------------------------------------------------
def _spots(rng, size=48):
  """A 16-bit single-channel tile with 0-2 bright spots, and its mask (0 = spot, 1 = background)."""
  image = rng.normal(3000, 300, (size, size))
  mask = np.ones((size, size), np.uint8)
  y, x = np.mgrid[0:size, 0:size]
  for _ in range(int(rng.integers(0, 3))):
    cy, cx, r = rng.uniform(10, size - 10, 2).tolist() + [rng.uniform(4, 9)]
    inside = (y - cy) ** 2 + (x - cx) ** 2 < r * r
    image[inside] += rng.uniform(15000, 30000)
    mask[inside] = 0
  return np.clip(image, 0, 65535).astype(np.uint16), mask


def _spot_folder(root, counts=(("train", 16), ("val", 4), ("test", 4))):
  rng = np.random.default_rng(3)
  for split, n in counts:
    for sub in ("img", "mask"):
      os.makedirs(root / split / sub, exist_ok=True)
    for i in range(n):
      image, mask = _spots(rng)
      label = int((mask == 0).any())
      name = f"s{split}{i:02d}-[{label}]" if split == "train" else f"s{split}{i:02d}"
      Image.fromarray(image).save(root / split / "img" / f"{name}.png")  # 16-bit grey PNG
      Image.fromarray(mask, mode="L").save(root / split / "mask" / f"{name}.png")


def test_16_bit_tiles_train_and_predict_with_the_recorded_rule(spot_run, tmp_path):
  """The segmenter of `spot_run` learnt from 16-bit grey PNGs by percentile:1,99.5; predict
  reads the rule from its config.json and maps the same files as it did."""
  root, run = spot_run, spot_run / "seg"
  data = f"dataset=folder,root={root},classes=spot,setting=finding"
  source = pipeline.build_source(load_config("classify", data + ",image_size=32").data, "train")
  assert source[0]["image"].dtype == np.uint8 and source[0]["image"].shape == (48, 48, 3)
  assert json.load(open(run / "config.json"))["data"]["intensity"] == "percentile:1,99.5"
  shown = np.load(run / "overlays" / "test.npz")
  predict = load_config("predict", f"model={run},input={root / 'test' / 'img'},batch=4,gate=off")
  predict.progress_every_s = 0.0
  run_phase(predict, str(tmp_path / "out"))
  names = sorted(os.listdir(root / "test" / "img"))
  rule = intensity.parse_rule("percentile:1,99.5")
  for i, want in enumerate(shown["prediction"]):
    got = np.asarray(Image.open(tmp_path / "out" / "masks" / names[i]))
    # same rule on the same 16-bit file: the segment phase's resize (grain) and predict's (PIL)
    # differ on a few border pixels only
    assert (got == want).mean() > 0.98, (i, (got == want).mean())
    np.testing.assert_array_equal(shown["image"][i],
                                  folders.read_image(str(root / "test" / "img" / names[i]), rule))
  # the same 16-bit pixels as a microscope's TIFF fields: a folder of them is tiles in mode=auto
  fields = tmp_path / "fields"
  fields.mkdir()
  for name in names:
    tifffile.imwrite(fields / name.replace(".png", ".tif"),
                     np.asarray(Image.open(root / "test" / "img" / name)))
  predict = load_config("predict", f"model={run},input={fields},batch=4,gate=off")
  predict.progress_every_s = 0.0
  assert run_phase(predict, str(tmp_path / "tiff_out"))["mode"] == "tiles"
  for name in names:
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "tiff_out" / "masks" / name)),
                                  np.asarray(Image.open(tmp_path / "out" / "masks" / name)))


@pytest.fixture(scope="module")
def spot_run(tmp_path_factory):
  """A tiny segmenter trained on 16-bit grey spot tiles, with data.intensity=percentile:1,99.5."""
  root = tmp_path_factory.mktemp("spots")
  _spot_folder(root)
  config = load_config("segment", f"supervision=full,init=False,dataset=folder,root={root},"
                                  "classes=spot,setting=finding,width=0.0625,image_size=32,"
                                  "batch=8,epochs=1,num_train=16")
  config.data.intensity = "percentile:1,99.5"
  config.data.num_threads, config.eval_batch_size, config.overlays = 1, 4, 4
  config.data.tile_size = 48  # the folder's tiles: predict's slide windows take this scale
  config.log_every, config.checkpoint_every, config.async_checkpointing = 2, 100, False
  config.gate.classifier_workdir = ""
  run_phase(config, str(root / "seg"))
  return root


def _segmentation_frame(path):
  seg = pydicom.dcmread(path)
  assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
  return seg, np.asarray(seg.pixel_array).reshape(-1, seg.Rows, seg.Columns)


def test_a_dicom_segmentation_references_its_image_and_holds_the_mask(tmp_path):
  pytest.importorskip("highdicom")
  stored = np.zeros((20, 24), np.uint16)
  source = write_dicom(str(tmp_path / "us.dcm"), stored)
  mask = np.ones((20, 24), np.uint8)
  mask[3:9, 5:15] = 0
  assert dicom.write_segmentation(str(tmp_path / "us.dcm"), mask, ["lesion", "background"], 1,
                                  str(tmp_path / "seg.dcm")) == 1
  seg, frames = _segmentation_frame(str(tmp_path / "seg.dcm"))
  np.testing.assert_array_equal(frames[0], mask == 0)
  assert seg.SegmentSequence[0].SegmentLabel == "lesion"
  referenced = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
  assert referenced.ReferencedSOPInstanceUID == source.SOPInstanceUID
  assert seg.StudyInstanceUID == source.StudyInstanceUID  # shown with the image's study


def test_dicoms_are_predicted_into_masks_areas_and_segmentations(spot_run, tmp_path):
  pytest.importorskip("highdicom")
  rng = np.random.default_rng(5)
  folder = tmp_path / "dicoms"
  folder.mkdir()
  for i in range(3):
    image, _ = _spots(rng)
    write_dicom(str(folder / f"case{i}.dcm"), image, spacing_mm=(0.1, 0.1))
  (folder / "notes.txt").write_text("not an image")
  predict = load_config("predict", f"model={spot_run / 'seg'},input={folder},batch=4,gate=off")
  predict.progress_every_s = 0.0
  summary = run_phase(predict, str(tmp_path / "out"))
  assert summary["num_tiles"] == 3 and summary["predicted_now"] == 3
  rows = {r["tile"]: r for r in map(json.loads, open(tmp_path / "out" / "tiles.jsonl"))}
  for i in range(3):
    row = rows[f"case{i}.dcm"]
    mask = np.asarray(Image.open(tmp_path / "out" / row["mask"]))
    assert mask.shape == (48, 48)
    assert row["area_mm2"]["spot"] == pytest.approx((mask == 0).sum() * 0.01, abs=1e-6)
    if (mask == 0).any():
      _, frames = _segmentation_frame(str(tmp_path / "out" / row["segmentation"]))
      np.testing.assert_array_equal(frames[0], mask == 0)
    else:  # a normal image: nothing to store
      assert "segmentation" not in row


def test_the_intensity_argument_reaches_every_section_of_the_pipeline():
  pipe = load_config("pipeline", "dataset=folder,classes=spot,setting=finding,"
                                 "intensity=percentile:1/99.8")
  for section in ("classify", "pseudo_masks", "segment", "affinity"):
    assert pipe[section].data.intensity == "percentile:1,99.8", section
  with pytest.raises(UserError, match="intensity='gamma'"):
    load_config("segment", "intensity=gamma")


def test_a_dicom_training_folder_labelled_by_a_csv(tmp_path):
  root = tmp_path / "xray"
  (root / "train").mkdir(parents=True)
  rng = np.random.default_rng(6)
  for i in range(4):
    write_dicom(str(root / "train" / f"case{i}.dcm"), rng.integers(0, 4096, (40, 40)),
                "MONOCHROME1", window=(2048, 4096))
  (root / "train" / "labels.csv").write_text(
      "file,labels\ncase0.dcm,nodule\ncase1.dcm,\ncase2.dcm,nodule+effusion\ncase3.dcm,0 1\n")
  config = load_config("classify", f"dataset=folder,root={root},classes=nodule+effusion,"
                                   "setting=finding,image_size=32")
  train = pipeline.build_source(config.data, "train")
  labels = {train.name(i): train[i]["labels"].tolist() for i in range(len(train))}
  assert labels == {"case0": [1, 0], "case1": [0, 0], "case2": [1, 1], "case3": [0, 1]}
  image = train[0]["image"]
  assert image.dtype == np.uint8 and image.shape == (40, 40, 3)
  want = 255 - _scaled(dicom.read(str(root / "train" / "case0.dcm")).pixels,
                       2048 - 0.5 - 2047.5, 2048 - 0.5 + 2047.5)
  assert np.abs(image[..., 0].astype(int) - want).max() <= 1
  (root / "train" / "labels.csv").write_text("file,labels\ncase0.dcm,mass\n")
  with pytest.raises(UserError, match=r"labels.csv line 2: 'mass' is not one of the classes"):
    pipeline.build_source(config.data, "train")
  # a scan the csv forgot is named as missing from it, not only as a name without labels
  (root / "train" / "labels.csv").write_text("file,labels\ncase0.dcm,nodule\ncase1.dcm,\n"
                                             "case3.dcm,0 1\n")
  with pytest.raises(UserError) as missing:
    pipeline.build_source(config.data, "train")
  assert f"{root / 'train' / 'case2.dcm'}: not listed in the folder's labels.csv, and the file " \
         "name carries no label vector" in str(missing.value)
  assert "case0.dcm" not in str(missing.value)


def test_a_cine_dicom_is_predicted_frame_by_frame_with_frames_all(spot_run, tmp_path):
  rng = np.random.default_rng(7)
  frames = np.stack([_spots(rng)[0] for _ in range(3)])
  folder = tmp_path / "cine"
  folder.mkdir()
  write_dicom(str(folder / "loop.dcm"), frames)
  for frames_arg, want in (("first", ["loop.png"]),
                           ("all", [f"loop_frame{k:04d}.png" for k in range(3)])):
    predict = load_config("predict", f"model={spot_run / 'seg'},input={folder},batch=4,"
                                     f"gate=off,frames={frames_arg}")
    predict.progress_every_s = 0.0
    run_phase(predict, str(tmp_path / frames_arg))
    assert sorted(os.listdir(tmp_path / frames_arg / "masks")) == want
  # frame k's mask is the segmenter applied to frame k alone
  single = tmp_path / "single"
  single.mkdir()
  write_dicom(str(single / "f2.dcm"), frames[2])
  predict = load_config("predict", f"model={spot_run / 'seg'},input={single},batch=4,gate=off")
  run_phase(predict, str(tmp_path / "one"))
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "all" / "masks" / "loop_frame0002.png")),
                                np.asarray(Image.open(tmp_path / "one" / "masks" / "f2.png")))


def test_dataset_stats_give_the_set_wide_window_of_16_bit_images(tmp_path):
  root = tmp_path / "spots"
  _spot_folder(root, (("train", 6), ("val", 2)))
  config = load_config("dataset", f"action=stats,dataset=folder,root={root},classes=spot,"
                                  "setting=finding")
  run_phase(config, str(tmp_path / "stats"))
  found = json.load(open(tmp_path / "stats" / "stats.json"))["splits"]["train"]["raw_window"]
  values = np.concatenate([np.asarray(Image.open(root / "train" / "img" / f)).ravel()
                           for f in sorted(os.listdir(root / "train" / "img"))])
  assert found["dtype"] == "uint16"
  np.testing.assert_allclose(found["window"], np.percentile(values, (0.5, 99.5)), rtol=1e-6)
  rule = intensity.parse_rule(found["intensity"])
  assert rule.kind == "window" and rule.low == pytest.approx(found["window"][0], rel=1e-5)
  assert "--config.data.intensity=window:" in open(tmp_path / "stats" / "stats.md").read()


def test_a_16_bit_grey_tiff_slide_is_predicted_with_one_window(spot_run, tmp_path):
  """The microscope's output (a tiled 16-bit single-channel TIFF with its pixel size) given to
  predict as a slide: it is read, one window from its smallest level maps every region, and
  the areas use its pixel size."""
  rng = np.random.default_rng(8)
  rows = [np.concatenate([_spots(rng)[0] for _ in range(3)], 1) for _ in range(3)]
  image = np.concatenate(rows, 0)  # 144 x 144 uint16
  path = tmp_path / "fluo.tif"
  tifffile.imwrite(path, image, tile=(64, 64), resolution=(1e4 / 0.5, 1e4 / 0.5),
                   resolutionunit="CENTIMETER")
  slide = intensity.read_raw(str(path))
  assert slide.pixels.dtype == np.uint16 and slide.pixel_size_um == pytest.approx((0.5, 0.5))
  from wsss_jax.data import slides
  opened = slides.Slide(str(path))
  region = opened.read_level(0, 0, 0, 144, 144)
  lo, hi = np.percentile(image, (0.5, 99.5))  # the only level is the smallest
  assert np.abs(region[..., 0].astype(int) - _scaled(image, lo, hi)).max() <= 1
  opened.close()
  predict = load_config("predict", f"model={spot_run / 'seg'},input={path},batch=4,min_tissue=0")
  predict.progress_every_s = 0.0
  summary = run_phase(predict, str(tmp_path / "out"))
  (only,) = summary["slides"]
  assert sum(a["pixels"] for a in only["areas"]) == 144 * 144
  assert tifffile.imread(tmp_path / "out" / "fluo" / "mask.tif").shape == (144, 144)
  spot = next(a for a in only["areas"] if a["class"] == "spot")
  assert spot["mm2"] == pytest.approx(spot["pixels"] * 0.25e-6, rel=1e-6)  # 0.5 um pixels


def test_of_several_windows_the_first_is_taken(tmp_path):
  path = str(tmp_path / "two.dcm")
  ds = write_dicom(path, np.zeros((8, 8), np.uint16))
  ds.WindowCenter, ds.WindowWidth = [40, 300], [400, 1500]  # e.g. soft tissue, then bone
  ds.save_as(path, enforce_file_format=True)
  assert dicom.read(path).window == pytest.approx((40 - 0.5 - 199.5, 40 - 0.5 + 199.5))
