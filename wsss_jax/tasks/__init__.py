"""Tasks: what a trained phase is made of (model, optimiser, jitted train step, evaluation,
checkpoint description) for pretraining, classification and segmentation.

The phases (`wsss_jax/phases/`) run them through `wsss_jax.train.loop`; the benchmark phase times their
steps. A task imports no phase, and no phase imports another phase: what a phase reads from an
earlier run goes through `wsss_jax.train.earlier_runs`.
"""
