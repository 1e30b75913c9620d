"""wsss_jax: weakly supervised semantic segmentation of medical images in JAX/Flax."""

__version__ = "0.1.0"
