"""Whole-slide tiling on real pyramidal TIFF and PNG files written here."""
import numpy as np
import pytest
import tifffile
from PIL import Image

from wsss_jax import config_lib
from wsss_jax.data import folders, pipeline, slides, synthetic
from wsss_jax.data.transforms import downsample
from wsss_jax.errors import UserError

TISSUE = (slice(96, 416), slice(192, 640))  # rows, columns of the tissue block


def _slide_pixels(h=512, w=768) -> np.ndarray:
  """Glass everywhere but a block of embedded-dataset tissue."""
  image = np.full((h, w, 3), 250, np.uint8)
  tiles = [t[0] for t in (synthetic.generate_tile(0, "train", i, 112) for i in range(60))
           if not (t[1] == synthetic.BACKGROUND).any()][:12]  # tiles without glass
  tissue = np.concatenate([np.concatenate(tiles[4 * r:4 * r + 4], 1) for r in range(3)], 0)
  block = image[TISSUE]
  block[:] = tissue[:block.shape[0], :block.shape[1]]
  return image


def write_pyramid(path, image, levels=3, tile=(64, 64)):
  """A tiled pyramidal TIFF: level k is the 2^k box average of the full image (SubIFDs)."""
  with tifffile.TiffWriter(path) as tw:
    tw.write(image, tile=tile, subifds=levels - 1, compression="zlib", photometric="rgb")
    for k in range(1, levels):
      tw.write(downsample(image, 2 ** k), tile=tile, subfiletype=1, compression="zlib",
               photometric="rgb")


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory):
  image = _slide_pixels()
  path = str(tmp_path_factory.mktemp("slides") / "case1.tif")
  write_pyramid(path, image)
  return path, image


def test_levels_and_region_reads(pyramid):
  path, image = pyramid
  slide = slides.Slide(path)
  assert slide.levels == [(512, 768), (256, 384), (128, 192)]
  assert slide.downsamples == [1.0, 2.0, 4.0]
  # Level 0 across TIFF tile borders, and a region leaving the image (white there).
  np.testing.assert_array_equal(slide.read_level(0, 50, 60, 100, 130), image[50:150, 60:190])
  edge = slide.read_level(0, 480, 700, 64, 100)
  np.testing.assert_array_equal(edge[:32, :68], image[480:, 700:])
  assert (edge[32:] == 255).all() and (edge[:, 68:] == 255).all()
  # Down-sampled regions come from the matching level: exact for 2 and 4, box on top for 8.
  for d in (2, 4):
    assert slide.best_level(d) == {2: 1, 4: 2}[d]
    np.testing.assert_array_equal(slide.read_region(128, 256, 48, d),
                                  downsample(image[128:128 + 48 * d, 256:256 + 48 * d], d))
  assert slide.best_level(3) == 1 and slide.best_level(8) == 2
  coarse = slide.read_region(0, 0, 64, 8).astype(int)
  assert np.abs(coarse - downsample(image, 8)[:64, :64]).max() <= 1  # box of box, rounded
  slide.close()


def test_untiled_tiff_and_png_read_the_same(tmp_path, pyramid):
  _, image = pyramid
  tifffile.imwrite(tmp_path / "strips.tif", image, photometric="rgb")
  Image.fromarray(image).save(tmp_path / "big.png")
  for name in ("strips.tif", "big.png"):
    slide = slides.Slide(str(tmp_path / name))
    assert slide.levels == [(512, 768)]
    np.testing.assert_array_equal(slide.read_region(100, 200, 32, 2),
                                  downsample(image[100:164, 200:264], 2))


def test_otsu_matches_the_definition():
  rng = np.random.default_rng(0)
  values = np.concatenate([rng.normal(40, 10, 500), rng.normal(170, 20, 300)]).clip(0, 255)
  values = values.astype(np.uint8)

  def between(t):  # the between-class variance of {v <= t} and {v > t}, directly
    low, high = values[values <= t].astype(float), values[values > t].astype(float)
    if not len(low) or not len(high):
      return -1
    w0, w1 = len(low) / len(values), len(high) / len(values)
    return w0 * w1 * (low.mean() - high.mean()) ** 2

  best = max(range(256), key=between)
  assert between(slides.otsu_threshold(values)) == pytest.approx(between(best))
  assert 60 < slides.otsu_threshold(values) < 150


def test_tissue_tiles_and_mrn_pairs(pyramid):
  path, image = pyramid
  source = slides.SlideTiles([path], tile=64, downsample=1.0, min_tissue=0.5, context_scale=2)
  inside = np.zeros(image.shape[:2], bool)
  inside[TISSUE] = True
  for i in range(len(source)):
    top, left = source.index[i][1:]
    share = inside[top:top + 64, left:left + 64].mean()
    assert share >= 0.4  # kept tiles are mostly tissue (the thumbnail rounds the border)
  kept = {source.index[i][1:] for i in range(len(source))}
  fully_inside = {(t, l) for t in range(0, 449, 64) for l in range(0, 705, 64)
                  if inside[t:t + 64, l:l + 64].all()}
  assert fully_inside <= kept and (0, 0) not in kept
  example = source[3]
  top, left = source.index[3][1:]
  np.testing.assert_array_equal(example["image"], image[top:top + 64, left:left + 64])
  assert example["name"] == f"case1_y{top}_x{left}"
  # The context: the same centre, twice the side, half the resolution.
  big = np.full((image.shape[0] + 128, image.shape[1] + 128, 3), 255, np.uint8)
  big[64:-64, 64:-64] = image
  expected = downsample(big[64 + top - 32:64 + top + 96, 64 + left - 32:64 + left + 96], 2)
  np.testing.assert_array_equal(example["context"], expected)


def test_slides_feed_the_training_pipeline(pyramid, tmp_path):
  path, _ = pyramid
  d = config_lib.data(32, folders.DatasetChoice("slides"))
  d.root, d.slide_tile, d.slide_downsample, d.num_threads = path, 64, 2.0, 1
  it = iter(pipeline.train_dataset(d, seed=0, local_batch=4))
  batch = next(it)
  assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.uint8


def test_bad_slides_are_named(tmp_path, pyramid):
  path, _ = pyramid
  broken = tmp_path / "broken.tif"
  broken.write_bytes(open(path, "rb").read()[:100])
  with pytest.raises(UserError, match="broken.tif cannot be read"):
    slides.Slide(str(broken))
  with pytest.raises(UserError, match="holds no slides"):
    slides.slide_paths(str(tmp_path / "empty" if (tmp_path / "empty").mkdir() is None else ""),
                       "train")
  blank = tmp_path / "blank.png"
  Image.fromarray(np.full((256, 256, 3), 250, np.uint8)).save(blank)
  with pytest.raises(UserError, match="no tile of 1 slide.* lower data.min_tissue"):
    slides.SlideTiles([str(blank)], tile=64)
