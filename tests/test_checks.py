"""Bad config values: one line on stderr, status 2, no traceback, before any work.

Every case runs genflax.main's command line in the same trained workdir, whose
checkpoints must stay byte-identical. The cases run in children forked from
one interpreter that imported the libraries once (tests/helpers.py, cli), so
60 command lines cost seconds rather than minutes; one case is checked
against a fresh `python -m genflax.main`.
"""
import hashlib
import os
import sys

import pytest

from genflax import configfile
from genflax.errors import ConfigError
from tests import helpers

VAE, GAN, LM = "vae_digits.py:smoke", "gan_digits.py:smoke", "lm_shakespeare.py:smoke"
DIFF = "diffusion_digits.py:smoke"

BAD = [  # (config, overrides, what the error says)
    (VAE, ["train.log_every_steps=0"], "train.log_every_steps=0: must be an integer >= 1"),
    (VAE, ["train.ckpt_every_steps=0"], "train.ckpt_every_steps=0: must be an integer >= 1"),
    (VAE, ["train.eval_every_steps=0"], "train.eval_every_steps=0: must be an integer >= 1"),
    (VAE, ["train.keep_checkpoints=0"], "train.keep_checkpoints=0: must be an integer >= 1"),
    (VAE, ["train.num_steps=-1"], "train.num_steps=-1: must be an integer >= 0"),
    (VAE, ["train.microbatches=0"], "train.microbatches=0: must be an integer >= 1"),
    (VAE, ["train.grad_allreduce=ring"], "train.grad_allreduce='ring': expected one of"),
    (VAE, ["train.profile_steps=(5,2)"], "train.profile_steps=(5, 2): must be (start, stop)"),
    (VAE, ["model.latent_dim=0"], "model.latent_dim=0: must be an integer >= 1"),
    (VAE, ["model.hidden=(0,)"], "model.hidden=(0,): must be a tuple of integers >= 1"),
    (VAE, ["model.hidden=abc"], "model.hidden=('abc',): must be a tuple of integers >= 1"),
    (VAE, ["model.channels=(8,0)", "model.arch=conv"], "model.channels=(8, 0): must be a tuple"),
    (VAE, ["model.arch=resnet"], "model.arch='resnet': expected one of ('mlp', 'conv')"),
    (VAE, ["model.likelihood=poisson"], "model.likelihood='poisson': expected one of"),
    (VAE, ["model.obs_sigma=0"], "model.obs_sigma=0.0: must be a finite number > 0"),
    (VAE, ["model.beta=-1"], "model.beta=-1.0: must be a finite number >= 0"),
    (VAE, ["model.dense_grads=fast"], "model.dense_grads='fast': expected one of"),
    (VAE, ["model.conv=fft"], "model.conv='fft': expected one of"),
    (VAE, ["eval.batch_size=0"], "eval.batch_size=0: must be an integer >= 1"),
    (VAE, ["eval.num_samples=-1"], "eval.num_samples=-1: must be an integer >= 0"),
    (VAE, ["eval.num_samples=4"], "eval.num_samples=4: the interpolations pair 8 test images"),
    (VAE, ["eval.iwae_k=0"], "eval.iwae_k=0: must be an integer >= 1"),
    (VAE, ["eval.iwae_chunk=3"], "eval.iwae_chunk=3 must divide eval.iwae_k=4"),
    (VAE, ["eval.iwae_k=3", "eval.iwae_chunk=3"], "eval.iwae_chunk=3 must divide eval.final_iwae_k=8"),
    (VAE, ["data.batch_size=0"], "data.batch_size=0: must be an integer >= 1"),
    (VAE, ["data.on_device_mb=-1"], "data.on_device_mb=-1: must be a finite number >= 0"),
    (VAE, ["data.idx_dir=/tmp"], "data.idx_dir='/tmp' is read only by the IDX datasets"),
    (VAE, ["data.name=idx"], "data.name='idx' reads MNIST-format IDX files from the directory "
                             "data.idx_dir names, and it is ''"),
    (VAE, ["optim.lr=-1"], "optim.lr=-1.0: must be a finite number > 0"),
    (VAE, ["optim.lr=nan"], "optim.lr=nan: must be a finite number > 0"),
    (VAE, ["optim.name=lion"], "optim.name='lion': expected one of ('adam', 'adamw', 'sgd')"),
    (VAE, ["optim.schedule=step"], "optim.schedule='step': expected one of"),
    (VAE, ["optim.warmup_steps=-5"], "optim.warmup_steps=-5: must be an integer >= 0"),
    (VAE, ["optim.end_lr_frac=2"], "optim.end_lr_frac=2.0: must be a finite number >= 0 and <= 1"),
    (VAE, ["optim.b1=1"], "optim.b1=1.0: must be a finite number >= 0 and < 1"),
    (VAE, ["optim.weight_decay=-0.1"], "optim.weight_decay=-0.1: must be a finite number >= 0"),
    (VAE, ["optim.grad_clip=-1"], "optim.grad_clip=-1.0: must be a finite number >= 0"),
    (VAE, ["mesh.data=0"], "mesh.data=0: must be an integer >= 1, or -1"),
    (VAE, ["mesh.fsdp=0"], "mesh.fsdp=0: must be an integer >= 1"),
    (VAE, ["cpu_devices=-2"], "cpu_devices=-2: must be an integer >= -1"),
    (VAE, ["seed=-1"], "seed=-1: must be an integer >= 0"),
    ("vae_digits.py:smoke,nosuch", [], "unknown variant 'nosuch' in ':smoke,nosuch'"),
    (GAN, ["loss.kind=lsgan"], "loss.kind='lsgan': expected one of ('ns', 'hinge', 'wgan')"),
    (GAN, ["model.g_norm=group"], "model.g_norm='group': expected one of ('none', 'batch')"),
    (GAN, ["eval.final_fid_draws=0"], "eval.final_fid_draws=0: must be an integer >= 1"),
    (GAN, ["loss.n_critic=0"], "loss.n_critic=0: must be an integer >= 1"),
    (GAN, ["loss.ema_decay=1.5"], "loss.ema_decay=1.5: must be a finite number >= 0 and < 1"),
    (GAN, ["loss.r1_every=0"], "loss.r1_every=0: must be an integer >= 1"),
    (GAN, ["model.conditioning=film"], "model.conditioning='film': expected one of"),
    (GAN, ["model.g_hidden=(16,-1)"], "model.g_hidden=(16, -1): must be a tuple"),
    (GAN, ["optim_d.lr=0"], "optim_d.lr=0.0: must be a finite number > 0"),
    (GAN, ["eval.fid_samples=-1"], "eval.fid_samples=-1: must be an integer >= 0"),
    (GAN, ["eval.feature_steps=-5"], "eval.feature_steps=-5: must be an integer >= 0"),
    (DIFF, ["model.channels=(12,16)"], "model.channels=(12, 16): group norm takes 8 groups"),
    (DIFF, ["loss.kind=ddpm"], "loss.kind='ddpm': expected one of ('edm', 'flow')"),
    (DIFF, ["sample.steps=0"], "sample.steps=0: must be an integer >= 1"),
    (DIFF, ["sample.sigma_max=0.001"], "sample.sigma_max=0.001: must be a finite number > 0.002"),
    (DIFF, ["sample.guidance=2"], "sample.guidance=2.0: guidance needs a conditional model"),
    ("diffusion_digits.py:flow,smoke", ["sample.churn=5"], "sample.churn=5.0: stochastic churn is"),
    (DIFF, ["eval.nll_dequantization=variational"],
     "eval.nll_dequantization='variational': expected one of ('uniform', 'gaussian')"),
    (DIFF, ["eval.nll_sigma=0"], "eval.nll_sigma=0.0: must be a finite number > 0 and < 1"),
    (DIFF, ["eval.nll_probes=-1"], "eval.nll_probes=-1: must be an integer >= 0"),
    (DIFF, ["loss.sigma_sampling=normal"],
     "loss.sigma_sampling='normal': expected one of ('lognormal', 'log_uniform')"),
    (LM, ["model.variant=huge"], "model.variant='huge': expected one of"),
    (LM, ["model.dropout=1"], "model.dropout=1.0: must be a finite number >= 0 and < 1"),
    (LM, ["model.norm=batchnorm"], "model.norm='batchnorm': expected one of"),
    (LM, ["tokenizer.kind=bpe"], "tokenizer.kind='bpe': expected one of ('char', 'sentencepiece')"),
    (LM, ["eval.top_p=0"], "eval.top_p=0.0: must be in (0, 1]"),
    (LM, ["eval.temperature=-1"], "eval.temperature=-1.0: must be >= 0"),
    (LM, ["eval.num_windows=-1"], "eval.num_windows=-1: must be an integer >= 0"),
    (LM, ["eval.continuations.num_prompts=-1"],
     "eval.continuations.num_prompts=-1: must be an integer >= 0"),
    (LM, ["eval.continuations.new_tokens=0"],
     "eval.continuations.new_tokens=0: must be an integer >= 1"),
    (LM, ["eval.continuations.prompt_tokens=17"], "eval.continuations.prompt_tokens=17 is "
                                                 "longer than the model's context of 16 tokens"),
    (LM, ["eval.continuations.top_p=0"], "eval.continuations.top_p=0.0: must be in (0, 1]"),
]


def _digest(directory) -> str:
  h = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(directory)):
    dirs.sort()
    for name in sorted(files):
      path = os.path.join(root, name)
      h.update(path.encode())
      h.update(open(path, "rb").read())
  return h.hexdigest()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  w = tmp_path_factory.mktemp("trained")
  result = helpers.cli(f"--config=configs/{VAE}", f"--workdir={w}")
  assert result.returncode == 0, result.stderr
  return w, _digest(w / "checkpoints")


def test_there_are_at_least_40_cases():
  assert len(BAD) >= 40


@pytest.fixture(scope="module")
def bad_runs(workdir, tmp_path_factory):
  """Every BAD command line run against the trained workdir."""
  w, _ = workdir
  return [helpers.cli(f"--config=configs/{config}", f"--workdir={w}",
                      *(f"--config.{o}" for o in overrides))
          for config, overrides, _ in BAD]


@pytest.mark.slow
def test_the_forking_cli_runs_main_as_the_command_line_does(workdir, tmp_path):
  w, _ = workdir
  args = [f"--config=configs/{VAE}", f"--workdir={w}", "--config.model.latent_dim=0"]
  forked = helpers.cli(*args)
  alone = helpers.cli(*args, fork=False)
  assert (forked.returncode, forked.stdout, forked.stderr) == (
      alone.returncode, alone.stdout, alone.stderr)


@pytest.mark.slow
@pytest.mark.parametrize("case", range(len(BAD)),
                         ids=[f"{c.split('.')[0]}:{' '.join(o) or c}" for c, o, _ in BAD])
def test_a_bad_value_is_one_line_before_any_work(workdir, bad_runs, case):
  w, digest = workdir
  expected = BAD[case][2]
  result = bad_runs[case]
  assert result.returncode == 2, result.stdout + result.stderr
  assert "Traceback" not in result.stderr + result.stdout
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
  assert expected in lines[0]
  assert _digest(w / "checkpoints") == digest


def test_a_config_file_that_fails_to_import_names_its_line(tmp_path):
  bad = tmp_path / "broken.py"
  bad.write_text('"""A config with a typo."""\ndef get_config(arg=""):\n  return {\n')
  result = helpers.cli(f"--config={bad}", f"--workdir={tmp_path / 'w'}")
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert result.stderr.strip() == f"error: {bad}:3: '{{' was never closed (in the config file)"
  raising = tmp_path / "raising.py"
  raising.write_text("def get_config(arg=''):\n  x = {}\n  return x['model']\n")
  result = helpers.cli(f"--config={raising}", f"--workdir={tmp_path / 'w'}")
  assert result.stderr.strip() == f"error: {raising}:3: KeyError: 'model' (in the config file)"
  assert not (tmp_path / "w").exists()


# ---- Configs that build on others

def test_every_config_loads_and_leaves_sys_path_alone():
  """A config builds on a sibling through configfile.sibling: dcgan_fashion on
  dcgan_mnist on dcgan_digits on gan_digits. Nothing is added to sys.path, and
  no config lands in sys.modules, where a second one of the same name would find it."""
  path = list(sys.path)
  for name in helpers.CONFIGS:
    for arg in ("", "smoke"):
      helpers.config(name, arg)
  assert sys.path == path
  assert not [m for m in sys.modules if m.split(".")[0] in (*helpers.CONFIGS, "genflax_config")]
  c = helpers.config("dcgan_fashion", "")
  assert (c.task, c.model.arch, c.data.name, c.model.latent_dim) == ("gan", "dcgan",
                                                                      "fashion_mnist", 100)
  # `wide` widens G, gives D the minibatch std and trains longer; the default stays
  # the benchmarks' DCGAN.
  wide = helpers.config("dcgan_fashion", "wide")
  assert (tuple(c.model.g_channels), tuple(wide.model.g_channels)) == ((128, 64), (256, 128))
  assert (c.train.num_steps, wide.train.num_steps) == (5000, 10000)
  assert wide.model.d_channels == c.model.d_channels and not wide.model.conditional
  assert (c.model.d_minibatch_std, wide.model.d_minibatch_std) == (False, True)


def test_an_error_in_a_base_config_names_the_base_file_and_line(tmp_path):
  """A syntax error, an error at import and one in get_config, each in the base
  a config builds on: the one-line ConfigError names the base's file and line."""
  child = tmp_path / "child.py"
  child.write_text('from genflax import configfile\n\n'
                   'base = configfile.sibling(__file__, "base")\n\n'
                   'def get_config(arg=""):\n  return base.get_config(arg)\n')
  base = tmp_path / "base.py"
  for text, error in [
      ("x = 1\ndef get_config(arg=''):\n  return {\n", f"{base}:3: '{{' was never closed"),
      ("import math\nx = math.nope\n", f"{base}:2: AttributeError: module 'math' has no "
                                       "attribute 'nope'"),
      ("def get_config(arg=''):\n  x = {}\n  return x['model']\n", f"{base}:3: KeyError: 'model'"),
  ]:
    base.write_text(text)
    with pytest.raises(ConfigError) as e:
      configfile.load_config(f"{child}:smoke")
    assert str(e.value) == f"{error} (in the config file)"
  base.unlink()
  with pytest.raises(ConfigError) as e:
    configfile.load_config(str(child))
  assert str(e.value) == f"{child}: there is no file '{base}'"
