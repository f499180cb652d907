"""genflax/hostmem.py: with `keep`, a step's freed temporaries are reused, not faulted in again."""
import os
import statistics
import subprocess
import sys

import pytest

from genflax import hostmem
from tests import helpers

# A jitted step with a 64 MiB temporary (16 slices side by side), run 48
# times after its first call, malloc set up first as genflax.main does;
# prints the minor page faults of each call.
_FAULTS_PER_CALL = r"""
import resource, sys
from genflax import hostmem
hostmem.setup(sys.argv[1], 0)
import jax, jax.numpy as jnp
step = jax.jit(lambda x: jax.lax.optimization_barrier(
    jnp.concatenate([x[:, i:i + 1024] for i in range(16)], 1)).sum())
x = jnp.ones((1024, 1040))
step(x).block_until_ready()
for _ in range(48):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  step(x).block_until_ready()
  print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES = (64 << 20) // 4096


def faults_per_call(choice: str) -> float:
  """The median page faults of a call, over the last 24 of 48: with `keep`
  the heap grows in its first tens of calls (small blocks split freed large
  ones; 128 MiB at a time, up to six times here) and then stays."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as a run's default
  out = subprocess.run([sys.executable, "-c", _FAULTS_PER_CALL, choice], cwd=helpers.ROOT, env=env,
                       capture_output=True, text=True, check=True, timeout=120).stdout
  return statistics.median([int(line) for line in out.split()][-24:])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="measures glibc's malloc settings: runs on Linux")
def test_keep_reuses_the_temporaries_that_system_faults_in_on_every_call():
  assert faults_per_call("system") > 0.75 * PAGES  # glibc's default: the 64 MiB again each call
  assert faults_per_call("keep") < 0.05 * PAGES    # measured: 0-2 pages in most calls


def test_auto_keeps_on_one_cpu_device_only(monkeypatch):
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  assert [hostmem.resolve("auto", n) for n in (0, 2, -1)] == ["keep", "system", "system"]
  assert hostmem.resolve("system", 0) == "system" and hostmem.resolve("keep", 2) == "keep"
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # wins, as in main
  assert hostmem.resolve("auto", 0) == "system"


@pytest.mark.slow
def test_a_bad_choice_is_one_line_before_anything_runs(tmp_path):
  result = helpers.cli("--config=configs/vae_digits.py:smoke", f"--workdir={tmp_path / 'w'}",
                       "--config.host_malloc=tcmalloc")
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert "host_malloc='tcmalloc'" in result.stderr and "'auto', 'keep', 'system'" in result.stderr
  assert not (tmp_path / "w").exists()
