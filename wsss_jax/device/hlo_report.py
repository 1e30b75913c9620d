"""What a compiled train step does, read from its jaxpr and its optimised HLO: the model FLOPs
that MFU counts (matmuls and convolutions over global shapes, walked through scans and conds),
XLA's own cost analysis beside it, and the fusion report of the memory-bound transformer passes
(LayerNorm, GELU, the MAE gathers: ops inside and outside fusions, bytes written by dtype)."""
from __future__ import annotations

import math
import re

import numpy as np

from jax.extend import core as jax_core


def xla_cost_flops(compiled) -> float:
  """FLOPs of the compiled per-device program by XLA's cost analysis (NaN when unavailable).

  GPU backends leave most cuBLAS/cuDNN custom calls out of it (an H100 ViT-B/16 train step read
  10 GFLOPs per image instead of 105), so MFU uses `jaxpr_flops` instead; this is reported beside.
  """
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax returns one dict per module
    cost = cost[0]
  return float(cost.get("flops", float("nan"))) if cost else float("nan")


def _dot_general_flops(eqn) -> int:
  (contract_lhs, _), _ = eqn.params["dimension_numbers"]
  lhs = eqn.invars[0].aval.shape
  return 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract_lhs)


def _conv_flops(eqn) -> int:
  """2 x output size x (kernel input features x kernel window) / input dilation; also right for
  the gradient convolutions (the weight gradient's "kernel" is the output cotangent; the input
  gradient of a strided conv dilates its input, whose inserted zeros cost nothing)."""
  rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, spatial...)
  rhs = eqn.invars[1].aval.shape
  window = math.prod(rhs[d] for d in rhs_spec[1:])
  dilation = math.prod(eqn.params["lhs_dilation"] or (1,))
  return 2 * math.prod(eqn.outvars[0].aval.shape) * window // dilation


def jaxpr_flops(jaxpr) -> int:
  """Matmul and convolution FLOPs of a (closed) jaxpr over global shapes: the model-FLOPs count
  of MFU, independent of the backend. Sub-jaxprs are walked (scan bodies times their length,
  the largest branch of a cond, while bodies once)."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_general_flops(eqn)
    elif name == "conv_general_dilated":
      total += _conv_flops(eqn)
    subs = [v for p in eqn.params.values() for v in (p if isinstance(p, (tuple, list)) else (p,))
            if isinstance(v, (jax_core.Jaxpr, jax_core.ClosedJaxpr))]
    if not subs:
      continue
    counts = [jaxpr_flops(sub) for sub in subs]
    if name == "cond":
      total += max(counts)
    elif name == "scan":
      total += sum(counts) * eqn.params["length"]
    else:
      total += sum(counts)
  return total


# The memory-bound passes of the transformer steps, found in the compiled HLO by the source
# path XLA keeps in each instruction's metadata (flax module names).
PASSES = {"layernorm": r"/(?:norm\d*|fc_norm|decoder_norm)/",
          "gelu": r"mlp\.activation",
          # the visible tokens' gather and the decoder's unshuffle (model.gather=take)
          "mae_gather": r"MaskedAutoencoder\.(?:encode_visible|decode)/jit\(take_along_axis\)"}
_HLO_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_HLO_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s([a-z][a-z0-9\-]*)\(")
_NOT_WORK = {"parameter", "constant", "bitcast", "tuple", "get-tuple-element", "fusion",
             "copy", "transpose", "custom-call", "dot", "convolution", "while", "call",
             "conditional", "after-all", "partition-id", "replica-id"}
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4,
          "f64": 8, "s64": 8}


def _hlo_computations(text: str) -> dict:
  """{computation name: [(opcode, result type, line)]} of an optimised HLO module's text."""
  computations, current = {}, None
  for line in text.splitlines():
    header = _HLO_HEADER.match(line)
    if header:
      current = header.group(1)
      computations[current] = []
    elif line.startswith("}"):
      current = None
    elif current is not None:
      m = _HLO_INSTRUCTION.match(line)
      if m:
        computations[current].append((m.group(2), m.group(1), line))
  return computations


def _result_bytes(result_type: str) -> dict:
  """{element type: bytes} of an HLO result type (arrays and tuples of them)."""
  out = {}
  for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", result_type):
    if dtype in _BYTES:
      n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
      out[dtype] = out.get(dtype, 0) + n * _BYTES[dtype]
  return out


def fusion_report(hlo_text: str) -> dict:
  """Per memory-bound pass (PASSES): its instructions inside fusions and outside them (work
  XLA left as a kernel of its own, re-reading memory), the fusions it is in, and the bytes
  those fusions write by element type (bf16 activations show as bf16)."""
  computations = _hlo_computations(hlo_text)
  fused, reducers = {}, set()
  for instructions in computations.values():
    for opcode, result, line in instructions:
      if opcode == "fusion":
        for callee in re.findall(r"calls=%?([\w.\-]+)", line):
          fused[callee] = result
      reducers.update(re.findall(r"to_apply=%?([\w.\-]+)", line))
  report = {}
  for name, pattern in PASSES.items():
    source = re.compile(r'op_name="[^"]*' + pattern)
    entry = {"fused_ops": 0, "unfused_ops": 0, "fusions": 0, "fusion_output_bytes": {},
             "unfused_by_op": {}, "unfused": []}
    for computation, instructions in computations.items():
      if computation in reducers:
        continue
      hits = [(op, line) for op, result, line in instructions if source.search(line)
              and not re.fullmatch(r"[a-z]+\d*\[\]", result)]  # scalars: loop counters
      if computation in fused:
        entry["fused_ops"] += len(hits)
        if hits:
          entry["fusions"] += 1
          for dtype, n in _result_bytes(fused[computation]).items():
            entry["fusion_output_bytes"][dtype] = entry["fusion_output_bytes"].get(dtype, 0) + n
      else:
        work = [(op, line) for op, line in hits if op not in _NOT_WORK]
        entry["unfused_ops"] += len(work)
        for op, _ in work:
          entry["unfused_by_op"][op] = entry["unfused_by_op"].get(op, 0) + 1
        entry["unfused"] += [line.strip()[:200] for _, line in work[:3]]
    entry["unfused"] = entry["unfused"][:5]
    report[name] = entry
  return report
