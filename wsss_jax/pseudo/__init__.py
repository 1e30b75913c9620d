"""From relevance maps to pseudo masks, each step a pure function with its formula in the
docstring: `mask_rules` (multi-layer pseudo-supervision, the image and map background rules),
`crf` (the dense CRF by mean-field inference, on device), `par` (pixel-adaptive refinement of
the maps by the image), `adversarial_erasing` (regions mined by successive rounds, fused by a
per-pixel maximum). The pseudo-mask phase composes them; the ignore band is part of the rules.
"""
