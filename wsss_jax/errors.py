"""User-facing errors: one clear line naming the field, path or file at fault."""


class UserError(Exception):
  """A mistake in the user's input (config, paths, checkpoints, data files).

  `wsss_jax.main` prints it as a single `error: ...` line and exits with status 2,
  instead of a traceback from deep inside JAX.
  """


class Preempted(Exception):
  """A run stopped by a preemption notice (SIGTERM or SIGINT) after writing where it stopped.

  `wsss_jax.main` prints its one line and exits with `train.preemption.EXIT_STATUS`; running the
  same command again resumes from there.
  """
  EXIT_STATUS = 75  # sysexits' EX_TEMPFAIL: a temporary failure, run the same command again
