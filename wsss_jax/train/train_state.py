"""The train state: everything that changes during training, so it is checkpointed and sharded."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
  step: jax.Array     # int32 scalar
  params: Any
  opt_state: Any
  rng: jax.Array      # uint32[2] base key; the key of step t is fold_in(rng, t)

  @classmethod
  def create(cls, params, tx, rng) -> "TrainState":
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng)

  def step_rng(self) -> jax.Array:
    """A key that depends only on the base key and the step: resumed runs draw the same masks."""
    return jax.random.fold_in(self.rng, self.step)


@flax.struct.dataclass
class BatchNormState(TrainState):
  """TrainState plus BatchNorm statistics (a ResNet encoder's pretext pretraining)."""
  batch_stats: Any = None


@flax.struct.dataclass
class ClassifierState(BatchNormState):
  """BatchNormState plus PDA's mu (so it is checkpointed with the rest)."""
  mu: jax.Array = None  # float32 scalar: PDA's drop threshold factor
