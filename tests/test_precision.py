"""Mixed precision (model.dtype=bfloat16) in every family: the layers compute
in bfloat16, the parameters and optimizer state stay float32, and a short run
trains to within a stated tolerance of the float32 run."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genflax import tasks, tokenizers, trainer
from genflax.tasks import lm
from tests import helpers

pytestmark = pytest.mark.slow

STEPS = 30

# (config, variant, overrides, loss metric, the fraction of its first value the
# loss falls below in 30 steps; None for a GAN, whose losses need not fall).
# bfloat16 ends within 1% of float32 (measured: 2e-6 VAE, 5e-5 DCGAN, 6e-5 LM).
FAMILIES = [
    ("vae_digits", "smoke,conv", {"optim.lr": 3e-3}, "loss", 0.97),
    ("dcgan_digits", "smoke", {}, "d_loss", None),
    ("lm_shakespeare", "smoke", {"optim.lr": 3e-3}, "loss", 0.85),
]
TOLERANCE = 0.01


def _train(name, arg, overrides, dtype, tmp_path):
  config = helpers.config(name, arg, **{"mesh.data": 1, "model.dtype": dtype,
                                        "train.num_steps": STEPS, **overrides})
  run = trainer.build(config, str(tmp_path / dtype))
  state = tasks.run_once(run.init, *tasks.run_keys(0), out_shardings=run.state_sh)
  hlo = run.train_step.lower(state, run.feed.inputs(0)).as_text()
  history = []
  for step in range(STEPS):
    state, m = run.train_step(state, run.feed.inputs(step))
    history.append(jax.device_get(m))
  return state, history, hlo


@pytest.mark.parametrize("name, arg, overrides, metric, falls_to", FAMILIES)
def test_bfloat16_compute_trains_like_float32_with_float32_parameters(
    tmp_path, name, arg, overrides, metric, falls_to):
  runs = {dtype: _train(name, arg, overrides, dtype, tmp_path)
          for dtype in ("float32", "bfloat16")}
  (state32, hist32, hlo32), (state16, hist16, hlo16) = runs["float32"], runs["bfloat16"]
  # The matmuls and convolutions run in bfloat16, and only in the bfloat16 run.
  assert "bf16" in hlo16 and "bf16" not in hlo32
  for tree in (state16["task"]["params"], state16["task"]["opt_state"]):
    assert {x.dtype for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)} == {
        jnp.dtype("float32")}
  # The losses are float32 numbers and follow the float32 run's.
  final = lambda hist: float(np.mean([m[metric] for m in hist[-5:]]))
  assert all(np.dtype(m[metric].dtype) == np.float32 for m in hist16)
  assert final(hist16) == pytest.approx(final(hist32), rel=TOLERANCE)
  if falls_to is not None:
    assert final(hist16) < falls_to * float(hist16[0][metric])
  # ...and not trivially: the two runs' parameters differ.
  diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), state16["task"]["params"],
                      state32["task"]["params"])
  assert max(jax.tree.leaves(diff)) > 0


def test_bfloat16_kv_cache_sampling_matches_recomputation():
  """Decoding in bfloat16 (model.decode_dtype=bfloat16) the KV cache is bfloat16
  and cached greedy decoding gives the tokens of recomputing the whole
  sequence at each step (in bfloat16 too)."""
  config = helpers.config("lm_shakespeare", "smoke", **{"mesh.data": 1, "model.dtype": "bfloat16",
                                                        "model.decode_dtype": "bfloat16"})
  tok = tokenizers.CharTokenizer.train("abcdefghijklmnopqrstuvwxyz \n")
  info = lm.TextInfo("shakespeare", tok, 16, 0, 0, 0, 0, "char", 1.0)
  setup = lm.build(config, info)
  params = nn.unbox(helpers.init(lm, setup, jax.random.PRNGKey(0)))["params"]
  prompts = jnp.asarray(lm.encode_prompts(setup, ["abc"])[0])
  got = lm.generate_tokens(setup, params, prompts, 8, jax.random.PRNGKey(0), 0.0, 0, 1.0)
  cache = lm.transformer.init_cache(setup.model.variant, 1, setup.model.dtype)
  assert cache[0]["k"].dtype == jnp.bfloat16
  # The whole sequence at each step, in one compiled program: the prompt and the tokens
  # so far, then padding, which a causal model's logits at earlier positions ignore.
  apply = jax.jit(lambda tokens: setup.model.apply({"params": params}, tokens)[0])
  start = prompts.shape[1]
  tokens = jnp.zeros((1, start + 8), prompts.dtype).at[:, :start].set(prompts)
  for i in range(start, start + 8):
    logits = apply(tokens)
    assert logits.dtype == jnp.float32
    tokens = tokens.at[:, i].set(jnp.argmax(logits[:, i - 1], -1).astype(tokens.dtype))
  np.testing.assert_array_equal(got, tokens)


def test_a_bfloat16_model_decodes_in_float32_on_cpu_by_default():
  """model.decode_dtype=auto on CPU: a model trained in bfloat16 decodes as the
  same network in float32 does, token for token, and its program holds no
  bfloat16 matmul (XLA:CPU's bfloat16 one-row matmuls were several times slower)."""
  build = lambda **o: lm.build(helpers.config("lm_shakespeare", "smoke", **{"mesh.data": 1, **o}),
                               info)
  tok = tokenizers.CharTokenizer.train("abcdefghijklmnopqrstuvwxyz \n")
  info = lm.TextInfo("shakespeare", tok, 16, 0, 0, 0, 0, "char", 1.0)
  bf16, f32 = build(**{"model.dtype": "bfloat16"}), build(**{"model.dtype": "float32"})
  assert bf16.model.dtype == jnp.bfloat16 and bf16.decoder.dtype == jnp.float32
  assert build(**{"model.dtype": "bfloat16", "model.decode_dtype": "bfloat16"}
               ).decoder.dtype == jnp.bfloat16
  params = nn.unbox(helpers.init(lm, bf16, jax.random.PRNGKey(0)))["params"]
  prompts = jnp.asarray(lm.encode_prompts(bf16, ["abc"])[0])
  args = (prompts, 24, jax.random.PRNGKey(3), 1.0, 5, 0.9)  # past the 16-token context: a refill
  np.testing.assert_array_equal(lm.generate_tokens(bf16, params, *args),
                                lm.generate_tokens(f32, params, *args))
  hlo = lm.generate_tokens.lower(bf16, params, *args).as_text()
  assert not re.search(r"dot_general.*bf16", hlo)
