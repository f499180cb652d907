"""What several test files share: loading configs and running the CLI."""
import os
import subprocess
import sys

from genflax import configfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(name: str, arg: str = "smoke", **overrides):
  """configs/<name>.py:<arg> with dotted-key overrides, e.g. {"train.num_steps": 4}."""
  c = configfile.load_config(os.path.join(ROOT, "configs", f"{name}.py") + (f":{arg}" if arg else ""))
  for key, value in overrides.items():
    *path, last = key.split(".")
    node = c
    for part in path:
      node = node[part]
    node[last] = value
  c.lock()
  return c


def cli(*args: str, module: str = "genflax.main", timeout: float = 300,
        **kwargs) -> subprocess.CompletedProcess:
  """Runs `python -m MODULE ARGS` from the repo root."""
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout, **kwargs)


def popen(*args: str) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", "genflax.main", *args], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
