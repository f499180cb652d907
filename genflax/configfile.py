"""Experiment config files: `configs/NAME.py`, whose get_config(arg) returns a ConfigDict.

Loaded here for `genflax.main`, the sweeps and the tests alike (no flags:
importing this defines none). A config builds on another through `sibling`,
which loads the other file the same way (never through sys.path).
"""
import contextlib
import difflib
import importlib.util
import os
import traceback

from genflax.errors import ConfigError


def load_config(spec: str):
  """`path.py[:arg]` -> the ConfigDict its get_config returns."""
  path, _, arg = spec.partition(":")
  module = load_module(path, f"--config {spec}")
  if not hasattr(module, "get_config"):
    raise ConfigError(f"--config {spec}: {path} has no get_config(arg) function")
  with reported(path):
    return module.get_config(arg) if arg else module.get_config()


def load_module(path: str, where: str):
  """The Python file at `path` (a config file), imported as a module of its own
  (`genflax_config.<file name>`; sys.path and sys.modules are left alone)."""
  if not os.path.isfile(path):
    raise ConfigError(f"{where}: there is no file {path!r}")
  name = os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(f"genflax_config.{name}", path)
  module = importlib.util.module_from_spec(module_spec)
  with reported(path):
    module_spec.loader.exec_module(module)
  return module


def sibling(path: str, name: str):
  """The config file <name>.py in the directory of the config file `path`,
  imported: how one config builds on another,

      gan_digits = configfile.sibling(__file__, "gan_digits")

  An error in it is reported with its own file and line, as any config's is."""
  return load_module(os.path.join(os.path.dirname(path), f"{name}.py"), path)


@contextlib.contextmanager
def reported(path: str):
  """A config file's own error (a syntax error, a bad line) as one ConfigError
  naming the file and line where it happened."""
  try:
    yield
  except ConfigError:
    raise
  except SyntaxError as e:
    raise ConfigError(f"{e.filename}:{e.lineno}: {e.msg} (in the config file)") from None
  except Exception as e:  # pylint: disable=broad-except  # any error in the user's file
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if os.path.dirname(os.path.abspath(f.filename)) == os.path.dirname(
                  os.path.abspath(path))]
    where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else path
    raise ConfigError(f"{where}: {type(e).__name__}: {e} (in the config file)") from None


def flat_keys(config, prefix: str = "") -> list[str]:
  keys = []
  for k, v in config.items():
    keys.append(prefix + k)
    if hasattr(v, "items"):
      keys += flat_keys(v, prefix + k + ".")
  return keys


def check_key(key: str, keys: list[str], what: str = "config key") -> None:
  """A ConfigError naming `key` (and the keys it is close to) if it is not in `keys`."""
  if key not in keys:
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise ConfigError(f"unknown {what} {key!r}{hint}")
