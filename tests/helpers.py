"""What several test files share: loading configs and running the CLI."""
import functools
import glob
import gzip
import importlib.util
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

from genflax import configfile, tasks, trainer
from genflax.data import idx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py")))


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


def load_script(path: str):
  """A script of the repository (e.g. experiments/bits_per_dim.py) as a module."""
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def assert_smoke_ran(results: dict) -> None:
  """A smoke variant's results: its 12 steps on one compile, every value finite."""
  assert results["step"] == results["train_step_traces"] * 12
  values = [v for v in results.values() if isinstance(v, float)]
  assert values and all(np.isfinite(values))


def one_device_env(drop=()) -> dict:
  """os.environ for a command on one CPU device, as a run's default, not the tests' 8:
  XLA_FLAGS without the device count (the rest, -O1, stays; tests/conftest.py), and
  without the variables in `drop`."""
  env = {k: v for k, v in os.environ.items() if k not in drop}
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = " ".join(flags.split())
  return env


def write_idx(path, array, gz=False, type_code=0x08):
  """Writes `array` as an IDX file: magic, big-endian uint32 dims, then the elements."""
  dtype = {0x08: np.uint8, 0x0C: ">i4"}[type_code]
  raw = (bytes([0, 0, type_code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
         + np.asarray(array, dtype).tobytes())
  with (gzip.open if gz else open)(path, "wb") as f:
    f.write(raw)


def idx_subset(source: str, out, train: int, test: int) -> str:
  """The first `train` and `test` images (and labels) of the MNIST-format files in
  `source`, written as MNIST-format files in the folder `out`: a real 28x28 dataset
  that prepares in a fraction of the time."""
  os.makedirs(out, exist_ok=True)
  found = idx.find(source, "idx", "")
  for split, n in (("train", train), ("test", test)):
    for stem in idx.FILES[split]:
      write_idx(os.path.join(out, stem), idx.read(found[stem])[:n])
  return str(out)


def init(task, setup, rng):
  """task.init(setup, rng) compiled as the trainer compiles a run's start (op by op,
  a U-Net's init took 18 s)."""
  return tasks.run_once(functools.partial(task.init, setup), rng)


def cli(*args: str, module: str = "genflax.main", timeout: float = 300, env=None,
        fork: bool = True) -> subprocess.CompletedProcess:
  """Runs `python -m MODULE ARGS` from the repo root (forked from the server below
  where `env` allows it; fork=False: always a fresh interpreter)."""
  if fork and _forkable(env):
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
      child = _server().start(module, args, env, out.fileno(), err.fileno())
      code = child.wait(timeout)
      out.seek(0), err.seek(0)
      return subprocess.CompletedProcess([module, *args], code, out.read(), err.read())
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def popen(*args: str, stdout=subprocess.PIPE, env=None):
  """Starts `python -m genflax.main ARGS` from the repo root, stderr into stdout:
  a subprocess.Popen, or its like for a child of the server below."""
  if not _forkable(env):
    return subprocess.Popen([sys.executable, "-m", "genflax.main", *args], cwd=ROOT, env=env,
                            stdout=stdout, stderr=subprocess.STDOUT, text=True)
  if stdout == subprocess.PIPE:
    read, write = os.pipe()
    child = _server().start("genflax.main", args, env, write, write)
    os.close(write)
    child.stdout = open(read)  # pylint: disable=consider-using-with
    return child
  return _server().start("genflax.main", args, env, stdout.fileno(), stdout.fileno())


# ---- A fork server for the commands tests run
#
# A fresh `python -m genflax...` spends ~2.5 s of CPU importing jax, flax,
# optax, orbax, tfds and genflax before it reads its command line. The server
# imports them once (no JAX backend started, so forking is safe), then forks a child
# per command that runs the module as `python -m` would (runpy), with the
# command's environment, stdout and stderr: a process of its own that tests
# signal, kill and wait for. What the interpreter and the server's libraries
# read from the environment as they start (JAX's config, tfds's data dir,
# malloc's settings) must be the server's; a command whose environment differs
# there gets a fresh interpreter. (XLA_FLAGS is read later, when JAX starts
# its backend in the child.)
_BASE_ENV = dict(os.environ)  # as tests/conftest.py set it
_READ_AT_START = ("JAX_", "TFDS_", "TF_", "PYTHON", "MALLOC_", "LD_")

_SERVER = r"""
import json, os, runpy, select, signal, socket, sys, traceback
import jax, flax.linen, optax, orbax.checkpoint, tensorflow_datasets  # noqa: the costly imports
import genflax.trainer, genflax.sweep.worker  # noqa: and genflax's, but for the modules run as commands
sock = socket.socket(fileno=int(sys.argv[1]))
wake_r, wake_w = os.pipe()
os.set_blocking(wake_w, False)
signal.set_wakeup_fd(wake_w)
signal.signal(signal.SIGCHLD, lambda *_: None)


def run(request, out, err):
  signal.set_wakeup_fd(-1)
  signal.signal(signal.SIGCHLD, signal.SIG_DFL)
  os.dup2(out, 1), os.dup2(err, 2)
  os.closerange(3, os.sysconf("SC_OPEN_MAX"))  # as subprocess closes them (the fds sent too)
  os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
  os.chdir(request["cwd"])
  os.environ.clear()
  os.environ.update(request["env"])
  sys.argv = [request["module"], *request["args"]]
  try:
    runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    code = 0
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (e.code is not None)
    if isinstance(e.code, str):
      print(e.code, file=sys.stderr)
  except BaseException:  # as the interpreter would: the traceback, status 1
    traceback.print_exc()
    code = 1
  sys.stdout.flush(), sys.stderr.flush()
  os._exit(code)


while True:
  ready, _, _ = select.select([sock, wake_r], [], [])
  if wake_r in ready:
    os.read(wake_r, 4096)
    while True:
      try:
        pid, status = os.waitpid(-1, os.WNOHANG)
      except ChildProcessError:
        break
      if not pid:
        break
      sock.send(json.dumps({"pid": pid, "code": os.waitstatus_to_exitcode(status)}).encode())
  if sock in ready:
    message, fds, _, _ = socket.recv_fds(sock, 1 << 20, 2)
    if not message:  # the test process is gone
      break
    sys.stdout.flush(), sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
      run(json.loads(message), *fds)
    for fd in fds:
      os.close(fd)
    sock.send(json.dumps({"started": pid}).encode())
"""


def _forkable(env) -> bool:
  env = os.environ if env is None else env
  return all(env.get(k) == _BASE_ENV.get(k) for k in env.keys() | _BASE_ENV.keys()
             if k.startswith(_READ_AT_START))


class _Child:
  """A forked command, as much of subprocess.Popen as the tests use."""

  def __init__(self, server, pid):
    self.server, self.pid, self.returncode, self.stdout = server, pid, None, None

  def poll(self):
    self.server.collect(0)
    return self.returncode

  def wait(self, timeout=None):
    deadline = None if timeout is None else time.monotonic() + timeout
    while self.returncode is None:
      left = None if deadline is None else deadline - time.monotonic()
      if left is not None and left <= 0:
        self.kill()
        raise subprocess.TimeoutExpired(self.pid, timeout)
      self.server.collect(left)
    return self.returncode

  def communicate(self, timeout=None):
    out = self.stdout.read() if self.stdout else None
    self.wait(timeout)
    return out, None

  def send_signal(self, sig):
    if self.poll() is None:
      os.kill(self.pid, sig)

  def kill(self):
    self.send_signal(signal.SIGKILL)


class _Server:
  """The server process of this test process, and its children by pid."""

  def __init__(self):
    self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    self.process = subprocess.Popen([sys.executable, "-c", _SERVER, str(theirs.fileno())],
                                    cwd=ROOT, env=_BASE_ENV, pass_fds=[theirs.fileno()],
                                    stdout=subprocess.DEVNULL)
    theirs.close()
    self.children = {}

  def start(self, module, args, env, out, err) -> _Child:
    request = {"module": module, "args": list(args), "cwd": ROOT,
               "env": dict(os.environ if env is None else env)}
    socket.send_fds(self.sock, [json.dumps(request).encode()], [out, err])
    while True:  # the reply to this request; other children may end meanwhile
      message = self._receive()
      if "started" in message:
        child = self.children[message["started"]] = _Child(self, message["started"])
        return child

  def collect(self, timeout):
    """Reads the exit statuses the server sends within `timeout` seconds (None: one at least)."""
    while select.select([self.sock], [], [], timeout)[0]:
      self._receive()
      timeout = 0

  def _receive(self):
    data = self.sock.recv(1 << 16)
    if not data:
      raise RuntimeError("the tests' fork server has ended (its traceback went to the stderr "
                         "of the test that started it)")
    message = json.loads(data)
    if "code" in message and message["pid"] in self.children:
      self.children.pop(message["pid"]).returncode = message["code"]
    return message


@functools.cache
def _server() -> _Server:
  return _Server()


def sample_arrays(workdir: str, out, num: int, *flags: str) -> dict:
  """`genflax.sample --out OUT.npz` of a trained image run: its arrays, checked against
  the run's dataset (uint8 levels in its image shape, labels where conditional)."""
  result = cli("--workdir", workdir, "--num", str(num), "--out", str(out), *flags,
               module="genflax.sample")
  assert result.returncode == 0, result.stderr
  assert f"wrote {num} samples to {out}" in result.stdout
  _, setup, _, _ = trainer.load_run(workdir)
  arrays = dict(np.load(out))
  images = arrays["images"]
  assert images.dtype == np.uint8 and images.shape == (num, *setup.info.image_shape)
  assert images.max() < setup.info.num_levels and images.std() > 0
  assert ("labels" in arrays) == setup.config.model.conditional
  return arrays
