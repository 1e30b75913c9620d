"""User-facing errors: one clear line naming the field, path or file at fault."""


class UserError(Exception):
  """A mistake in the user's input (config, paths, checkpoints, data files).

  `wsss_jax.main` prints it as a single `error: ...` line and exits with status 2,
  instead of a traceback from deep inside JAX.
  """
