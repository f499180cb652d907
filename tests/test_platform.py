"""`auto` config values on every backend, and checkpoints that move between
meshes and optimizer layouts (genflax/platform.py, trainer.restore)."""
import json
import os
import shutil
import types

import flax.linen as nn
import jax
import numpy as np
import pytest

from genflax import optim, platform, sharding, tokenizers, trainer
from genflax.errors import ConfigError
from genflax.tasks import lm
from tests import helpers

NANO = 800_000      # about the nano LM's parameters
BABY = 10_800_000   # the baby LM's


@pytest.mark.parametrize("backend, mesh, params, want", [
    # CPU devices: XLA's collectives cost per buffer, so whole replicas send one.
    ("cpu", dict(data=1), NANO, "per_param"),              # nothing to average
    ("cpu", dict(data=2), NANO, "reduce_scatter"),         # small: split the optimizer too
    ("cpu", dict(data=8), NANO, "reduce_scatter"),
    ("cpu", dict(data=2), BABY, "flat"),                   # large: gathering back costs more
    ("cpu", dict(data=3), NANO, "flat"),                   # 3 does not divide the flat padding
    ("cpu", dict(data=1, fsdp=8), NANO, "per_param"),      # parameters split: XLA's
    ("cpu", dict(data=2, tensor=4), NANO, "per_param"),
    # Accelerators: XLA's own all-reduces, whatever the mesh.
    ("gpu", dict(data=8), NANO, "per_param"),
    ("gpu", dict(data=1), BABY, "per_param"),
    ("tpu", dict(data=64, fsdp=4), BABY, "per_param"),
])
def test_grad_allreduce_auto_by_backend_and_mesh(backend, mesh, params, want):
  assert platform.grad_allreduce(backend, mesh, params) == want


def test_auto_values_of_the_lm_config_on_each_backend():
  """The same config file: einsum attention and row-major weight gradients
  on CPU, jax.nn.dot_product_attention (cuDNN) and XLA's gradients on GPUs and
  TPUs; explicit values are kept; a family that supports only per_param gets it."""
  config = helpers.config("lm_shakespeare", "")
  cpu = platform.choices(config, "cpu", dict(data=2), NANO)
  assert cpu == {"train.grad_allreduce": "reduce_scatter", "model.dense_grads": "row_major",
                 "model.attention": "einsum", "model.decode_dtype": "float32"}
  for backend in ("gpu", "tpu"):
    assert platform.choices(config, backend, dict(data=8), NANO) == {
        "train.grad_allreduce": "per_param", "model.dense_grads": "xla",
        "model.attention": "dot_product_attention", "model.decode_dtype": "float32"}
  explicit = helpers.config("lm_shakespeare", "", **{"model.attention": "einsum"})
  assert "model.attention" not in platform.choices(explicit, "gpu", dict(data=8), NANO)
  gan = helpers.config("gan_digits", "", **{"train.grad_allreduce": "auto"})
  assert platform.choices(gan, "cpu", dict(data=2), NANO, ("per_param",)) == {
      "train.grad_allreduce": "per_param", "model.conv": "matmul"}
  assert platform.choices(gan, "gpu", dict(data=2), NANO, ("per_param",))["model.conv"] == "xla"
  for image_hw, impl in (((8, 8), "matmul"), ((28, 28), "forward"), ((28, 8), "matmul")):
    assert platform.choices(gan, "cpu", dict(data=1), NANO, ("per_param",),
                            image_hw)["model.conv"] == impl, image_hw
  # bfloat16 on a CPU whose bfloat16 units oneDNN drives: the dense layers go there;
  # float32, or a machine without them, or a GPU, as before.
  bf16 = helpers.config("lm_shakespeare", "", **{"model.dtype": "bfloat16"})
  assert platform.choices(bf16, "cpu", dict(data=2), NANO, bf16_units="amx")[
      "model.dense_grads"] == "onednn"
  assert platform.choices(bf16, "cpu", dict(data=2), NANO)["model.dense_grads"] == "row_major"
  assert platform.choices(config, "cpu", dict(data=2), NANO, bf16_units="amx")[
      "model.dense_grads"] == "row_major"
  assert platform.choices(bf16, "gpu", dict(data=2), NANO, bf16_units="amx")[
      "model.dense_grads"] == "xla"
  # A bfloat16 model decodes in float32 on CPU (no bfloat16 one-row matmul there),
  # in bfloat16 on accelerators.
  assert platform.choices(bf16, "cpu", dict(data=2), NANO)["model.decode_dtype"] == "float32"
  assert platform.choices(bf16, "gpu", dict(data=2), NANO)["model.decode_dtype"] == "bfloat16"
  resolved = platform.resolve(config, cpu)
  assert (resolved.train.grad_allreduce, resolved.model.attention) == ("reduce_scatter", "einsum")
  assert config.train.grad_allreduce == "auto"  # the config itself is left alone


def _info(context=64):
  tok = tokenizers.CharTokenizer.train("abcdefghij \n")
  return lm.TextInfo("shakespeare", tok, context, 0, 0, 0, 0, "char", 1.0)


@pytest.mark.parametrize("arg, mesh, want", [
    ("", {"mesh.data": 8}, "reduce_scatter"),
    ("", {"mesh.data": 1, "mesh.fsdp": 8}, "per_param"),
    ("", {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}, "per_param"),
    ("baby", {"mesh.data": 2}, "flat"),
])
def test_trainer_counts_the_model_to_choose_the_allreduce(arg, mesh, want):
  """trainer.resolve sizes the model from a provisional state's shapes: the
  nano LM (with a 12-symbol vocabulary) splits its optimizer, baby does not."""
  config = helpers.config("lm_shakespeare", arg, **mesh)
  resolved, values = trainer.resolve(config, lm, _info(), sharding.make_mesh(config.mesh))
  assert values["train.grad_allreduce"] == want == resolved.train.grad_allreduce
  optim.check_grad_allreduce(resolved.train, sharding.make_mesh(config.mesh))  # it fits


def test_model_dtype_auto_is_bfloat16_only_where_a_row_measured_it_faster(monkeypatch):
  """model.dtype=auto follows BF16_FROM_PARAMS: bfloat16 for a family from its
  measured size up on the machine measured (and then oneDNN's dense layers and
  a float32 decode on CPU), float32 anywhere else; an explicit dtype is kept."""
  monkeypatch.setattr(platform, "BF16_FROM_PARAMS", {("cpu_amx", "lm"): 4_000_000})
  auto = helpers.config("lm_shakespeare", "", **{"model.dtype": "auto"})
  baby = platform.choices(auto, "cpu", dict(data=2), BABY, bf16_units="amx")
  assert {k: baby[k] for k in ("model.dtype", "model.dense_grads", "model.decode_dtype")} == {
      "model.dtype": "bfloat16", "model.dense_grads": "onednn", "model.decode_dtype": "float32"}
  nano = platform.choices(auto, "cpu", dict(data=2), NANO, bf16_units="amx")
  assert (nano["model.dtype"], nano["model.dense_grads"]) == ("float32", "row_major")
  for backend, units in (("cpu", "avx512_bf16"), ("cpu", ""), ("gpu", ""), ("tpu", "")):
    assert platform.choices(auto, backend, dict(data=2), BABY,
                            bf16_units=units)["model.dtype"] == "float32", (backend, units)
  vae = helpers.config("vae_digits", "", **{"model.dtype": "auto"})
  assert platform.choices(vae, "cpu", dict(data=1), BABY, bf16_units="amx")[
      "model.dtype"] == "float32"  # no row for this family
  assert "model.dtype" not in platform.choices(helpers.config("lm_shakespeare", ""), "cpu",
                                               dict(data=2), BABY, bf16_units="amx")
  for (machine, family), least in platform.BF16_FROM_PARAMS.items():
    assert machine in ("cpu_amx", "cpu_avx512_bf16", "gpu", "tpu") and least >= 0
    assert family in ("gan", "vae", "lm", "diffusion")


def test_bfloat16_convolutions_go_to_onednn_for_the_families_measured_faster_there():
  """model.conv=auto in a bfloat16 run on a CPU whose bfloat16 units oneDNN drives:
  the GAN's, the VAE's and the U-Net's convolutions as oneDNN matmuls; float32
  runs, other CPUs and GPUs as before."""
  def conv_of(name, dtype, backend="cpu", units="amx"):
    config = helpers.config(name, "", **{"model.dtype": dtype})
    return platform.choices(config, backend, dict(data=1), NANO, ("per_param",), (28, 28),
                            bf16_units=units)["model.conv"]
  assert {conv_of(name, "bfloat16") for name in ("gan_digits", "vae_digits",
                                                 "diffusion_digits")} == {"onednn"}
  assert conv_of("vae_digits", "float32") == "forward"
  assert conv_of("gan_digits", "float32") == conv_of("gan_digits", "bfloat16", units="") == "forward"
  assert conv_of("gan_digits", "bfloat16", "gpu") == "xla"


def test_the_trainer_resolves_model_dtype_auto_by_the_models_size():
  """trainer.resolve counts the model before choosing its dtype: the same
  config file is float32 at nano's size and bfloat16 at baby's where the rule
  says so for this machine."""
  units = platform.bf16_units_here(helpers.config("lm_shakespeare", "",
                                                  **{"model.dtype": "auto"}))
  for arg, size in (("", NANO), ("baby", BABY)):
    config = helpers.config("lm_shakespeare", arg, **{"model.dtype": "auto", "mesh.data": 1})
    resolved, values = trainer.resolve(config, lm, _info(), sharding.make_mesh(config.mesh))
    want = platform.compute_dtype(jax.default_backend(), "lm", size, units)
    assert values["model.dtype"] == resolved.model.dtype == want, arg
    assert (resolved.model.dense_grads == "onednn") == (want == "bfloat16" and bool(units))


def test_batch_that_does_not_divide_the_devices_names_the_nearest_sizes():
  """The default LM's batch of 12 on 8 devices."""
  config = helpers.config("lm_shakespeare", "", **{"mesh.data": 8})
  mesh = sharding.make_mesh(config.mesh)
  with pytest.raises(ConfigError, match=r"data.batch_size=12 does not split over the mesh's 8 "
                     r"batch shards .*8 devices\): use a multiple of 8, e.g. 8 or 16"):
    trainer.check_step(config, mesh)
  with pytest.raises(ConfigError, match=r"e.g. 8, or a smaller"):
    sharding.check_batch_size(mesh, "eval.batch_size", 5)


# ---- Checkpoints across meshes and optimizer layouts

def _losses(workdir):
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def _run(workdir, steps, **mesh):
  config = helpers.config("lm_shakespeare", "smoke", **{
      "train.num_steps": steps, "train.log_every_steps": 1, "train.ckpt_every_steps": 6,
      "train.eval_every_steps": 100, "eval.num_windows": 32, "eval.sample_tokens": 4, **mesh})
  return trainer.train(config, str(workdir))


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  """Step-6 checkpoints of the smoke LM on 8 devices: data-parallel (auto:
  reduce_scatter, the optimizer state as split flat vectors) and FSDP (per
  parameter, sharded), each also trained on to step 10 where it was written."""
  out = {}
  for name, mesh in (("data8", {"mesh.data": 8}), ("fsdp8", {"mesh.data": 1, "mesh.fsdp": 8})):
    base = tmp_path_factory.mktemp(name)
    _run(base / "at6", 6, **mesh)
    shutil.copytree(base / "at6", base / "through")
    _run(base / "through", 10, **mesh)
    out[name] = base
  return out


@pytest.mark.slow
@pytest.mark.parametrize("written_on, resumed_on, layouts", [
    ("data8", {"mesh.data": 1}, ("flat", "tree")),                    # onto one device
    ("data8", {"mesh.data": 2, "mesh.fsdp": 4}, ("flat", "tree")),    # onto a 2x4 mesh
    ("fsdp8", {"mesh.data": 1}, ("tree", "tree")),
    ("fsdp8", {"mesh.data": 8}, ("tree", "flat")),                    # into the split layout
])
def test_checkpoint_resumes_on_another_mesh_and_layout(written, tmp_path, capsys, written_on,
                                                       resumed_on, layouts):
  """A checkpoint written on 8 devices resumes on another mesh, with the
  optimizer state converted where `auto` picks another layout there, and
  trains on with the losses of the run that stayed (float reassociation
  apart); the layouts are what was asked."""
  base = written[written_on]
  work = tmp_path / "moved"
  shutil.copytree(base / "at6", work)
  meta = json.load(open(work / "checkpoints" / "6" / "meta" / "metadata"))
  assert meta["opt_layout"] == layouts[0]
  capsys.readouterr()
  _run(work, 10, **resumed_on)
  log = capsys.readouterr().out
  assert "resumed from step 6" in log
  assert ("optimizer state converted from the flat layout" in log) == (layouts == ("flat", "tree"))
  assert ("converted from the tree layout" in log) == (layouts == ("tree", "flat"))
  want, got = _losses(base / "through"), _losses(work)
  assert sorted(got) == list(range(1, 11))
  for step in range(7, 11):
    assert got[step] == pytest.approx(want[step], rel=2e-4), step
  assert json.load(open(work / "checkpoints" / "10" / "meta" / "metadata"))["opt_layout"] == \
      layouts[1]


@pytest.mark.slow
def test_relayout_round_trips_the_optimizer_state():
  """Flat vectors -> per-parameter arrays -> Flat vectors is the identity, and
  the per-parameter form has the structure `init` gives that layout."""
  config = helpers.config("lm_shakespeare", "smoke", **{"mesh.data": 8})
  rs = platform.resolve(config, {"train.grad_allreduce": "reduce_scatter"})
  setup = lm.build(rs, _info(16))
  state = jax.device_get(nn.unbox(helpers.init(lm, setup, jax.random.PRNGKey(0))))
  # Moments that differ per entry, padding zero as in training.
  rng = np.random.default_rng(0)
  flat = optim._FlatLayout(state["params"], lm.decay_mask)  # pylint: disable=protected-access
  noise = lambda tree: flat.ravel(jax.tree.map(lambda x: rng.normal(size=x.shape), tree))
  opt = jax.tree.map(lambda x: noise(state["params"]) if isinstance(x, optim.Flat) else x,
                     state["opt_state"], is_leaf=lambda x: isinstance(x, optim.Flat))
  tree = optim.relayout(opt, state["params"], lm.decay_mask)
  per_param = platform.resolve(config, {"train.grad_allreduce": "per_param"})
  per_param_setup = lm.build(per_param, _info(16))
  want = nn.unbox(helpers.init(lm, per_param_setup, jax.random.PRNGKey(0)))["opt_state"]
  assert jax.tree.structure(tree) == jax.tree.structure(want)
  back = optim.relayout(tree, state["params"], lm.decay_mask)
  jax.tree.map(np.testing.assert_array_equal, back, opt)


# ---- Meshes from the topology

def _devices(processes, per_process, platform_name="gpu"):
  return [types.SimpleNamespace(id=i, process_index=i // per_process, platform=platform_name,
                                device_kind="fake", slice_index=i // per_process)
          for i in range(processes * per_process)]


@pytest.mark.parametrize("sizes, dcn, axis", [
    (dict(data=8, fsdp=1, tensor=1), dict(data=2, fsdp=1, tensor=1), 0),
    (dict(data=2, fsdp=4, tensor=1), dict(data=1, fsdp=2, tensor=1), 1),
])
def test_hybrid_mesh_crosses_hosts_only_along_the_dcn_axis(sizes, dcn, axis):
  """Two hosts of 4 GPUs: with mesh.dcn_<axis>=2 the axis's outer factor
  runs across the hosts and every other neighbour pair is within one."""
  grid = sharding.device_grid(sizes, dcn, _devices(2, 4))
  hosts = np.vectorize(lambda d: d.process_index)(grid)
  assert grid.shape == tuple(sizes[a] for a in sharding.AXES)
  half = grid.shape[axis] // 2
  first, second = np.split(hosts, [half], axis=axis)
  assert (first == 0).all() and (second == 1).all()
  assert sorted(d.id for d in grid.flat) == list(range(8))


def test_dcn_sizes_must_divide_their_axis_and_match_the_hosts():
  with pytest.raises(ConfigError, match=r"mesh.dcn_data=3: must be an integer >= 1 that divides "
                     r"mesh.data=8"):
    sharding.make_mesh(helpers.config("vae_digits", **{"mesh.data": 8, "mesh.dcn_data": 3}).mesh)
  with pytest.raises(ConfigError, match=r"make 2 groups, but the devices are in 1 processes"):
    sharding.make_mesh(helpers.config("vae_digits", **{"mesh.data": 8, "mesh.dcn_data": 2}).mesh)
  mesh = sharding.make_mesh(helpers.config("vae_digits", **{"mesh.data": 8}).mesh)
  assert [d.id for d in mesh.devices.flat] == [d.id for d in jax.devices()]  # CPU: in order
