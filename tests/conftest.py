"""Test setup: 8 fake CPU devices, a private tfds data dir, strict numpy rules.

Both must be set before jax or tensorflow_datasets is imported, so they are
set here, at import, and the subprocesses that tests start inherit them.

XLA compiles the tests' programs at LLVM's -O1, not its default -O3: the suite
compiles hundreds of small programs and runs most of them a few steps, so
compiling is most of its time (the whole suite 16 min 21 s at -O3, 15 min 28 s
at -O1 on a 2-core Intel Xeon; README.md). Subprocesses that set XLA_FLAGS
themselves (one device, or two) compile at the default.
"""
import os
import shutil
import tempfile

import pytest

from genflax import main  # imports no jax or tfds: the settings below still apply

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=1").strip()


_MADE = []  # the session's folders this process made: removed when the session ends


def _session_dir(variable: str, prefix: str) -> None:
  """os.environ[variable] = a new temporary folder, unless this is an xdist worker
  that inherited the controller's."""
  if not (os.environ.get("PYTEST_XDIST_WORKER") and
          os.path.basename(os.environ.get(variable, "")).startswith(prefix)):
    os.environ[variable] = tempfile.mkdtemp(prefix=prefix)
    _MADE.append(os.environ[variable])


def pytest_unconfigure(config):
  """The session's data dir and compilation cache (a gigabyte or more) go with it."""
  del config
  for folder in _MADE:
    shutil.rmtree(folder, ignore_errors=True)


# Tests never read or write the user's ~/tensorflow_datasets. One data dir for the
# session: pytest-xdist's workers inherit the one made here by the controller, so
# Fashion-MNIST is prepared and each feature network trained once (preparing
# takes turns through a lock; a network is saved by a rename).
_session_dir("TFDS_DATA_DIR", "genflax_tfds_")
# JAX's persistent compilation cache, one for the session in the same way: a
# program that one test or subprocess compiled (a config's train step, its
# evaluation) is read back by every later one. The size limit turns on the
# cache's file lock, so that no process reads an entry half-written; programs
# that compile in under 0.1 s (op by op) stay out of it, as each write lists
# the whole folder to check its size.
_session_dir("JAX_COMPILATION_CACHE_DIR", "genflax_jax_cache_")
os.environ.update(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.1",
                  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
                  JAX_COMPILATION_CACHE_MAX_SIZE=str(8 << 30))
# An 8-device program read from the cache needs XLA:CPU's thread pool larger than
# one thread per core (genflax.main.size_cpu_pool): 128 threads here, which the
# subprocesses inherit.
main.size_cpu_pool()
os.environ["PYTHONUNBUFFERED"] = "1"

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the marks
def pytest_collection_modifyitems(items):
  """With pytest-xdist (the suite runs on every core, `--dist loadgroup`), the tests of
  a file that use its fixtures of module or session scope (a trained run, a sweep) run
  in one worker, which makes each fixture once; every other test goes to whichever
  worker is free."""
  heavy = set()
  for item in items:
    shared = {defs[-1].baseid for defs in item._fixtureinfo.name2fixturedefs.values()
              if defs and defs[-1].scope != "function" and defs[-1].baseid.startswith("tests")}
    if shared:
      item.add_marker(pytest.mark.xdist_group(min(shared)))
    if any(name in item.name for name in HEAVY) or shared & HEAVY_GROUPS:
      heavy.add(item)
  # Workers take tests in this order: the longest first, so that no worker is left
  # with a long test while the other has finished. (Stable: each group stays whole.)
  items.sort(key=lambda item: item not in heavy)


# Tests of 40-90 s each (two processes, ten restarts, a config's run in every form),
# and the files whose shared fixtures train for minutes.
HEAVY = ("two_processes", "sigkills", "every_config_smoke_variant", "matmul_or_forward_convs")
HEAVY_GROUPS = {"tests/test_diffusion.py", "tests/test_sweep.py", "tests/test_platform.py"}

