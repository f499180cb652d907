"""Errors that mean "the user asked for something wrong", not "genflax broke".

`genflax.main` and the other commands (the benchmarks: `one_line`) print
their message as one line and exit with status 2, without a traceback, so
the message itself must say what was wrong and how to fix it.
"""
import functools
import sys


class UserError(Exception):
  """Bad input: a config value, a missing dataset, a foreign workdir."""


class DatasetNotPreparedError(UserError):
  """A dataset that is neither in the data dir nor on this machine; genflax never downloads."""


class ConfigError(UserError):
  """A config key or value that cannot be used."""


class CheckpointError(UserError):
  """A checkpoint could not be written (a full disk, a read-only directory). The
  failed save's Orbax threads may never finish, so genflax.main exits at once
  after saying so."""


def one_line(main):
  """A command's main(), whose UserError is one line on stderr and exit status 2."""
  @functools.wraps(main)
  def wrapped(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except UserError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
  return wrapped
