"""How the host's malloc treats the memory XLA frees (`config.host_malloc`).

XLA:CPU allocates a step's temporary buffers when it runs the step and frees
them after. glibc's malloc gives a large block back to the kernel when it is
freed (blocks from mmap; the heaps of per-thread arenas, which take large
blocks from mmap whatever the settings), so the next step faults the same
memory back in, a page fault per 4 KiB it first touches. In the memory-bound
parts of a step (building convolution patches) that costs more than the
copying itself.

`keep` tells glibc to serve every thread from its one main heap, to take no
block from mmap and never to shrink that heap: freed memory is reused as is,
and the process keeps its peak memory until it exits. In the first tens of
steps that peak grows to a few times a step's temporaries (small blocks split
the freed large ones, and the next step's large block is taken afresh), then
stays. The 28x28 DCGAN's and
conv VAE's steps ran 1.3-1.7x faster, the diffusion U-Net's 1.4x; the nano
LM on two CPU devices 11% slower, its devices' threads now sharing one heap
(benchmarks/README.md). So `auto` keeps on one CPU device and leaves
malloc as it is (`system`) where the host is split into several. The setting
has to be made before any thread allocates (glibc fixes a thread's arena
then): `genflax.main` makes it once the config is read, before jax starts.
Only glibc (Linux) has it; elsewhere nothing changes.
"""
import ctypes
import os
import re
import sys

CHOICES = ("auto", "keep", "system")
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # mallopt(3)'s parameters
# The same as environment variables, for a process started afresh.
KEEP_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0",
            "MALLOC_TRIM_THRESHOLD_": str(2**62)}


def resolve(kind: str, cpu_devices: int) -> str:
  """"keep" or "system" for config.host_malloc; auto: keep unless the host is
  split into several devices (config.cpu_devices, or XLA_FLAGS's count)."""
  if kind != "auto":
    return kind
  forced = forced_cpu_devices()
  split = forced > 1 if forced else cpu_devices != 0
  return "system" if split else "keep"


def forced_cpu_devices() -> int:
  """The host device count XLA_FLAGS asks for; 0 if it names none."""
  forced = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
  return int(forced.group(1)) if forced else 0


def keep_freed_memory() -> bool:
  """Applies `keep` to this process's glibc malloc; True where it took effect."""
  if not sys.platform.startswith("linux"):
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):  # no glibc (musl)
    return False
  return all([mallopt(_M_ARENA_MAX, 1), mallopt(_M_MMAP_MAX, 0), mallopt(_M_TRIM_THRESHOLD, -1)])


def setup(kind: str, cpu_devices: int) -> str:
  """Sets malloc up as config.host_malloc says; returns what that resolved to."""
  choice = resolve(kind, cpu_devices)
  if choice == "keep":
    keep_freed_memory()
  return choice
