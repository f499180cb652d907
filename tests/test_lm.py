"""The LM family: corpus, tokenizers, Transformer, KV-cache sampling, CLI."""
import argparse
import collections
import functools
import hashlib
import os
import re

from etils import epath
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
import tensorflow_datasets as tfds
from tensorboard.backend.event_processing import event_accumulator

from genflax import data, sharding, tasks, tokenizers, trainer
from genflax.data import shakespeare
from genflax.errors import ConfigError
from genflax.models import layers, transformer
from genflax.tasks import lm, text_metrics
from tests import helpers

ODD_TEXT = "héllo  wörld\n\n  x\t☃ ok\nROMEO:\n  \n"


@functools.cache
def _train_text():
  return shakespeare.split(shakespeare.corpus())[0]


def _setup(**overrides):
  """A tiny char model (context 16) on one device, and its state."""
  config = helpers.config("lm_shakespeare", "smoke", **{"mesh.data": 1, **overrides})
  tok = tokenizers.CharTokenizer.train(_train_text())
  info = lm.TextInfo("shakespeare", tok, 16, 0, 0, 0, 0, "char", 1.0)
  setup = lm.build(config, info)
  return setup, nn.unbox(helpers.init(lm, setup, jax.random.PRNGKey(0)))


# ---- Corpus and tokenizers

def test_corpus_is_exactly_the_specified_text():
  text = shakespeare.corpus()
  assert len(text) == 4_956_338 and len(set(text)) == 80
  assert hashlib.sha256(text.encode("utf-8")).hexdigest() == (
      "45fd4b88f5a789d77b6a7f4f2cfab43ddd2a7e41052f530e80f283cb2b962c94")
  assert text.startswith("A Midsummer Night's Dream\n\nACT I\n\nSCENE I. Athens.")
  train, validation = data.load_text("shakespeare")  # through the tfds builder
  assert train + validation == text and len(train) == int(0.9 * len(text))


class GenflaxTestText(tfds.core.GeneratorBasedBuilder):
  """A catalogue-style text dataset: lines in "train" and "test" (no "validation")."""

  VERSION = tfds.core.Version("1.0.0")
  code_path = epath.Path(__file__)  # see test_data.GenflaxTestImages
  pkg_dir_path = epath.Path(__file__).parent

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(["To be", "or not"]),
            "test": self._generate_examples(["to bé"])}

  def _generate_examples(self, lines):
    yield from enumerate({"text": line} for line in lines)


def test_catalogue_text_dataset_loads(tmp_path):
  GenflaxTestText(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  assert data.load_text("genflax_test_text", str(tmp_path)) == ("To be\nor not", "to bé")


def test_unprepared_catalogue_text_dataset_is_a_clear_error():
  with pytest.raises(data.DatasetNotPreparedError, match="tfds build tiny_shakespeare"):
    data.load_text("tiny_shakespeare")


def test_char_tokenizer_round_trips_and_is_saved(tmp_path):
  tok = tokenizers.load_or_train("char", str(tmp_path), ODD_TEXT)
  assert tok.decode(tok.encode(ODD_TEXT)) == ODD_TEXT
  assert tok.vocab_size == len(set(ODD_TEXT))
  again = tokenizers.load_or_train("char", str(tmp_path), "other text")  # reused, not retrained
  np.testing.assert_array_equal(again.encode(ODD_TEXT), tok.encode(ODD_TEXT))
  with pytest.raises(Exception, match="not in the"):
    tok.encode("Z")


def test_sentencepiece_round_trips_and_is_saved(tmp_path):
  text = shakespeare.corpus()[:60_000]
  tok = tokenizers.load_or_train("sentencepiece", str(tmp_path), text, 400)
  assert tok.vocab_size == 400 and os.path.exists(tmp_path / "spm.model")
  for sample in (text[-5000:], ODD_TEXT):  # unseen characters go through bytes
    assert tok.decode(tok.encode(sample)) == sample
  assert len(tok.encode(text[-5000:])) < 0.7 * 5000  # subwords, not characters
  again = tokenizers.load_or_train("sentencepiece", str(tmp_path), "x", 400)
  np.testing.assert_array_equal(again.encode(ODD_TEXT), tok.encode(ODD_TEXT))


def test_windows_cover_every_target_once():
  ids = np.arange(21)
  w = lm.windows(ids, 4)  # [5, 5]
  assert w.shape == (5, 5)
  np.testing.assert_array_equal(w[:, 1:].reshape(-1), ids[1:])
  np.testing.assert_array_equal(w[:, 0], [0, 4, 8, 12, 16])
  rows = lm.windows(ids, 4, 8)  # the training rows: 2T from every T
  assert rows.shape == (4, 8)
  np.testing.assert_array_equal(rows[:, 0], [0, 4, 8, 12])
  np.testing.assert_array_equal(rows[-1], ids[12:20])


# ---- Model

def test_every_parameter_has_logical_axis_names():
  setup, _ = _setup()
  boxed = jax.eval_shape(functools.partial(lm.init, setup), jax.random.PRNGKey(0))["params"]
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  known = {"batch", "length", "embed", "heads", "kv", "mlp", "vocab"}
  for x in leaves:
    assert len(x.names) == x.value.ndim and set(x.names) <= known
  # Weight decay reaches matrices only.
  mask = lm.decay_mask(nn.unbox(boxed))
  flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_leaves_with_path(mask)}
  assert flat["['block0']['mlp_in']['kernel']"] and flat["['block0']['attn']['query']"]
  assert not any(m for k, m in flat.items() if "embed" in k or "norm" in k or "bias" in k)


@pytest.mark.slow
@pytest.mark.parametrize("positions,attention", [("learned", "einsum"), ("rotary", "einsum"),
                                                ("learned", "dot_product_attention")])
def test_kv_cache_gives_the_logits_of_full_recomputation(positions, attention):
  setup, state = _setup(**{"model.positions": positions, "model.attention": attention})
  model, params = setup.model, {"params": state["params"]}
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, model.vocab_size)
  full, _ = model.apply(params, tokens)  # [2, 16, V]
  cache = transformer.init_cache(model.variant, 2)
  logits, cache = model.apply(params, tokens[:, :6], cache)  # prefill
  got = [logits]
  decode = jax.jit(lambda tok, cache, i: model.apply(params, tok, cache, i))
  for i in range(6, 16):
    logits, cache = decode(tokens[:, i:i + 1], cache, i)
    got.append(logits)
  np.testing.assert_allclose(jnp.concatenate(got, 1), full, atol=2e-5, rtol=1e-5)
  assert decode._cache_size() == 1  # one compilation for every position


@pytest.mark.slow
def test_greedy_decoding_never_copies_the_kv_cache():
  """XLA:CPU updates the [B*H, S, K] cache in place and reads it as it is;
  with a [B, S, H, K] cache it copied every layer's keys and values at every
  new token (24 cache-sized copies in this program), and nano's decoding
  made 13-26% fewer tokens/s."""
  setup, state = _setup()
  v = setup.model.variant
  hlo = lm.generate_tokens.lower(setup, state["params"], jnp.zeros((1, 1), jnp.int32), 40,
                                 jax.random.PRNGKey(0), 0.0, 0, 1.0).compile().as_text()
  cache_shape = [v.num_heads, v.context, v.width // v.num_heads]   # batch 1
  copies = [name for name, dims in re.findall(r"%(copy[\w.\-]*) = f32\[([\d,]*)\]", hlo)
            if np.prod([int(d) for d in dims.split(",")]) == np.prod(cache_shape)]
  assert hlo.count("dynamic-update-slice") >= 2 * v.num_layers  # the cache updates are there
  assert not copies, copies


def _stacked(params, num_layers):
  """Unrolled parameters (block0, block1, ...) in model.scan_layers' layout."""
  out = {k: v for k, v in params.items() if not k.startswith("block")}
  out["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs),
                               *[params[f"block{i}"] for i in range(num_layers)])
  return out


@pytest.mark.slow
@pytest.mark.parametrize("scan_layers, remat", [(True, "dots"), (False, "full")])
def test_scanned_and_rematerialised_blocks_equal_the_unrolled_model(scan_layers, remat):
  """model.scan_layers (one block scanned over stacked parameters) and
  model.remat: the unrolled model's logits, gradients and cached decoding."""
  v = transformer.VARIANTS["tiny"]
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 50)
  plain = transformer.Transformer(50, v, dropout=0.0)
  other = transformer.Transformer(50, v, dropout=0.0, scan_layers=scan_layers, remat=remat)
  params = nn.unbox(jax.jit(plain.init)(jax.random.PRNGKey(0), tokens))["params"]
  boxed = jax.jit(other.init)(jax.random.PRNGKey(0), tokens)["params"]
  theirs = _stacked(params, v.num_layers) if scan_layers else params
  assert jax.tree.structure(nn.unbox(boxed)) == jax.tree.structure(theirs)
  if scan_layers:  # the stacked axis has its own logical name
    assert nn.get_partition_spec(boxed)["blocks"]["attn"]["query"] == P(
        "layers", "embed", "heads", "kv")
  # Each model's logits and gradients in one compiled program (op by op took 20 s).
  logits_and_grads = lambda model: jax.jit(lambda p: (
      model.apply({"params": p}, tokens)[0],
      jax.grad(lambda p: jnp.mean(model.apply({"params": p}, tokens)[0] ** 2))(p)))
  want, want_grads = logits_and_grads(plain)(params)
  got, got_grads = logits_and_grads(other)(theirs)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  want_grads = _stacked(want_grads, v.num_layers) if scan_layers else want_grads
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
               got_grads, want_grads)
  decode = jax.jit(lambda p, t, cache, i: other.apply({"params": p}, t, cache, i),
                   static_argnums=3)
  cache = transformer.init_cache(v, 2, stacked=scan_layers)
  _, cache = decode(theirs, tokens[:, :5], cache, 0)
  step, _ = decode(theirs, tokens[:, 5:6], cache, 5)
  np.testing.assert_allclose(step[:, 0], want[:, 5], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_rematerialisation_keeps_fewer_activations():
  """What the backward pass keeps, from the compiled gradient's temporaries:
  full < dots < none."""
  v = transformer.Variant(num_layers=4, num_heads=4, width=64, context=64)
  tokens = jnp.zeros((8, 64), jnp.int32)
  temp = {}
  for remat in transformer.REMATS:
    model = transformer.Transformer(64, v, scan_layers=True, remat=remat)
    params = nn.unbox(model.init(jax.random.PRNGKey(0), tokens))["params"]
    grad = jax.jit(jax.grad(lambda p: jnp.mean(model.apply({"params": p}, tokens)[0] ** 2)))
    temp[remat] = grad.lower(params).compile().memory_analysis().temp_size_in_bytes
  assert temp["full"] < temp["dots"] < temp["none"], temp


@pytest.mark.slow
def test_written_out_attention_equals_jax_dot_product_attention():
  q, k, v = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 7, 3, 8))
  causal = jnp.tril(jnp.ones((7, 7), bool))
  np.testing.assert_allclose(transformer.attention(q, k, v, causal),
                             jax.nn.dot_product_attention(q, k, v, is_causal=True),
                             atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("features", [24, 4])  # transposes x, then dy and the result
def test_row_major_dense_gradients_equal_xla_gradients(features):
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 8))
  params = nn.Dense(features).init(jax.random.PRNGKey(1), x)

  def grads(kind):
    dense = nn.Dense(features, dot_general=layers.dense_dot_general(kind))
    loss = lambda p, x: jnp.sum(jnp.sin(dense.apply(p, x)))
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)

  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               grads("row_major"), grads("xla"))


@pytest.mark.slow
def test_row_major_dense_grads_compile_to_row_major_matmuls():
  """XLA writes the MLP's weight gradients as dots contracting the left
  operand's leading axis (a slow path on XLA:CPU); model.dense_grads=row_major
  leaves only dots that contract its last axis."""
  def mlp_dot_contractions(kind):
    setup, state = _setup(**{"model.dense_grads": kind})
    step = jax.jit(functools.partial(lm.train_step, setup))
    hlo = step.lower(state, {"tokens": np.zeros((16, 16), np.int32)},
                     jax.random.PRNGKey(1)).compile().as_text()
    return collections.Counter(
        re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line).group(1)
        for line in hlo.splitlines() if re.search(r" dot\(", line) and "/mlp_" in line)

  assert mlp_dot_contractions("xla")["0"] == 4                       # 2 layers x mlp_in, mlp_out
  assert mlp_dot_contractions("row_major") == {"1": 12}              # 2 layers x 2 x 3 matmuls


@pytest.mark.slow
def test_changing_a_future_token_leaves_earlier_logits_alone():
  setup, state = _setup(**{"model.positions": "rotary", "model.norm": "rmsnorm",
                           "model.tie_embeddings": False})
  tokens = jax.random.randint(jax.random.PRNGKey(2), (1, 16), 0, setup.model.vocab_size)
  changed = tokens.at[0, 10].set((tokens[0, 10] + 1) % setup.model.vocab_size)
  a, _ = setup.model.apply({"params": state["params"]}, tokens)
  b, _ = setup.model.apply({"params": state["params"]}, changed)
  np.testing.assert_array_equal(a[:, :10], b[:, :10])
  assert not np.allclose(a[:, 10:], b[:, 10:])


@pytest.mark.slow
def test_greedy_decoding_is_deterministic_and_matches_recomputation():
  setup, state = _setup()
  params = state["params"]
  prompts, pads = lm.encode_prompts(setup, ["ROMEO\n", "O"])
  assert pads == [0, 5] and prompts.shape == (2, 6)
  assert lm.encode_prompts(setup, [""])[0].shape == (1, 1)  # a newline to start from
  gen = lambda n, seed, **kw: np.asarray(lm.generate_tokens(
      setup, params, jnp.asarray(prompts), n, jax.random.PRNGKey(seed),
      kw.get("temperature", 0.0), kw.get("top_k", 0), kw.get("top_p", 1.0)))
  assert gen(1, 0).shape == (2, 7)  # shorter than the half-context a refill keeps
  out = gen(30, 0)  # past the context of 16: refills the cache twice
  np.testing.assert_array_equal(out, gen(30, 1))
  np.testing.assert_array_equal(out[:, :6], prompts)
  # Within the context each greedy token is the argmax of a full recomputation.
  logits, _ = setup.model.apply({"params": params}, jnp.asarray(out[:, :16]))
  np.testing.assert_array_equal(out[:, 6:16], np.argmax(logits[:, 5:15], -1))
  # Real sampling depends on the seed.
  assert not np.array_equal(gen(30, 3, temperature=1.0, top_p=0.95),
                            gen(30, 4, temperature=1.0, top_p=0.95))


def test_top_k_and_top_p_keep_the_likeliest_tokens():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  top1 = lm.sample_token(jax.random.PRNGKey(0), jnp.array([[0.1, 2.0, -1.0]]), 1.0, 1, 1.0)
  assert int(top1[0]) == 1  # top_k=1 is greedy
  draws = jax.vmap(lambda r: lm.sample_token(r, logits, 1.0, 0, 0.7))(
      jax.random.split(jax.random.PRNGKey(0), 400))
  assert set(np.asarray(draws).reshape(-1).tolist()) == {0, 1}


@pytest.mark.slow
@pytest.mark.parametrize("microbatches", [1, 4])
def test_sharding_rules_split_parameters_and_keep_the_maths(microbatches):
  """On a (data 2, fsdp 2, tensor 2) mesh: the planned layout, and the same step.

  With 4 microbatches of gradient accumulation too: the one-pass step's update.
  """
  mesh_cfg = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2,
              "train.microbatches": microbatches, "train.grad_allreduce": "per_param"}
  setup, state = _setup()
  sharded_setup, _ = _setup(**mesh_cfg)
  mesh = sharded_setup.mesh
  init, _, shardings = trainer.state_layout(lm, sharded_setup, mesh)
  params = shardings["task"]["params"]
  assert params["embed"]["embedding"].spec == P("tensor", "fsdp")
  assert params["block0"]["attn"]["query"].spec == P("fsdp", "tensor", None)
  assert params["block0"]["mlp_out"]["kernel"].spec == P("tensor", "fsdp")
  assert params["block0"]["norm1"]["scale"].spec == P("fsdp")
  windows = lm.windows(setup.info.tokenizer.encode(_train_text()[:5000]), 16)[:16]
  batch = {"tokens": windows}
  sharded_state = tasks.run_once(init, *tasks.run_keys(0), out_shardings=shardings)
  step = jax.jit(functools.partial(lm.train_step, sharded_setup),
                 in_shardings=(shardings["task"], sharding.batch_sharding(mesh), None))
  got, got_metrics = step(sharded_state["task"], sharding.put_batch(
      batch, sharding.batch_sharding(mesh)), jax.random.PRNGKey(1))
  assert got["params"]["block0"]["attn"]["query"].sharding.is_equivalent_to(
      params["block0"]["attn"]["query"], 3)
  want_state = nn.unbox(helpers.init(lm, setup, tasks.run_keys(0)[0]))
  want, want_metrics = jax.jit(functools.partial(lm.train_step, setup))(
      want_state, batch, jax.random.PRNGKey(1))
  assert float(got_metrics["loss"]) == pytest.approx(float(want_metrics["loss"]), rel=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               got["params"], want["params"])



@pytest.mark.slow
def test_sampling_on_a_sharded_mesh_picks_the_one_device_tokens():
  """Greedy decoding past the context (cache restarts) with parameters split
  over (data 2, fsdp 2, tensor 2): the cache folds the tensor-sharded heads
  into its leading axis, and the tokens are the one-device ones."""
  setup, _ = _setup()
  sharded_setup, _ = _setup(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  init, _, shardings = trainer.state_layout(lm, sharded_setup, sharded_setup.mesh)
  sharded = tasks.run_once(init, *tasks.run_keys(0), out_shardings=shardings)["task"]["params"]
  assert sharded["block0"]["attn"]["key"].sharding.spec == P("fsdp", "tensor", None)
  params = nn.unbox(helpers.init(lm, setup, tasks.run_keys(0)[0]))["params"]
  prompts = jnp.asarray(lm.encode_prompts(setup, ["To be", "or not to"])[0])
  args = (prompts, 40, jax.random.PRNGKey(3), 0.0, 0, 1.0)  # 40 new tokens, context 16
  want = lm.generate_tokens(setup, params, *args)
  np.testing.assert_array_equal(lm.generate_tokens(sharded_setup, sharded, *args), want)
  assert len(set(np.asarray(want)[0, -40:].tolist())) > 1  # not one repeated token


@pytest.mark.slow
def test_flat_allreduce_step_equals_the_one_device_step():
  """train.grad_allreduce=flat over 8 devices, 2 microbatches: the model runs
  inside shard_map without its layout constraints, and the update is the
  one-device one."""
  setup, _ = _setup()
  flat_setup, _ = _setup(**{"mesh.data": 8, "train.grad_allreduce": "flat",
                            "train.microbatches": 2})
  mesh = flat_setup.mesh
  init, _, shardings = trainer.state_layout(lm, flat_setup, mesh)
  batch = {"tokens": lm.windows(setup.info.tokenizer.encode(_train_text()[:5000]), 16)[:16]}
  step = jax.jit(functools.partial(lm.train_step, flat_setup),
                 in_shardings=(shardings["task"], sharding.batch_sharding(mesh), None))
  got, got_metrics = step(tasks.run_once(init, *tasks.run_keys(0), out_shardings=shardings)["task"],
                          sharding.put_batch(batch, sharding.batch_sharding(mesh)),
                          jax.random.PRNGKey(1))
  want_state = nn.unbox(helpers.init(lm, setup, tasks.run_keys(0)[0]))
  want, want_metrics = jax.jit(functools.partial(lm.train_step, setup))(
      want_state, batch, jax.random.PRNGKey(1))
  assert float(got_metrics["loss"]) == pytest.approx(float(want_metrics["loss"]), rel=1e-5)
  assert float(got_metrics["grad_norm"]) == pytest.approx(float(want_metrics["grad_norm"]), rel=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               got["params"], want["params"])

@pytest.mark.slow
def test_reduce_scatter_step_equals_the_one_device_step():
  """train.grad_allreduce=reduce_scatter over 8 devices, 2 microbatches: the
  optimizer state split 8 ways, one reduce-scatter in and one all-gather
  out, and the one-device update, clipping at the global norm included."""
  setup, _ = _setup()
  rs_setup, _ = _setup(**{"mesh.data": 8, "train.grad_allreduce": "reduce_scatter",
                          "train.microbatches": 2})
  mesh = rs_setup.mesh
  init, _, shardings = trainer.state_layout(lm, rs_setup, mesh)
  adam = shardings["task"]["opt_state"][1][0]
  assert adam.mu.decay.spec == P(("data", "fsdp")) and adam.count.spec == P()
  batch = {"tokens": lm.windows(setup.info.tokenizer.encode(_train_text()[:5000]), 16)[:16]}
  step = jax.jit(functools.partial(lm.train_step, rs_setup),
                 in_shardings=(shardings["task"], sharding.batch_sharding(mesh), None))
  args = (tasks.run_once(init, *tasks.run_keys(0), out_shardings=shardings)["task"],
          sharding.put_batch(batch, sharding.batch_sharding(mesh)), jax.random.PRNGKey(1))
  compiled = step.lower(*args).compile()
  hlo = compiled.as_text()
  got, got_metrics = compiled(*args)
  mu = got["opt_state"][1][0].mu.decay
  assert {s.data.shape for s in mu.addressable_shards} == {(mu.shape[0] // 8,)}
  want_state = nn.unbox(helpers.init(lm, setup, tasks.run_keys(0)[0]))
  want, want_metrics = jax.jit(functools.partial(lm.train_step, setup))(
      want_state, batch, jax.random.PRNGKey(1))
  assert float(want_metrics["grad_norm"]) > setup.config.optim.grad_clip  # clipping acts
  assert float(got_metrics["grad_norm"]) == pytest.approx(float(want_metrics["grad_norm"]), rel=1e-4)
  assert float(got_metrics["loss"]) == pytest.approx(float(want_metrics["loss"]), rel=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               got["params"], want["params"])
  # The decayed and the other parameters: a reduce-scatter and an all-gather
  # each (XLA may merge the two of a kind); all-reduces only of scalars.
  assert 1 <= hlo.count(" reduce-scatter(") <= 2 and 1 <= hlo.count(" all-gather(") <= 2
  reduced = re.findall(r"= \(?([^=]*?)\)? all-reduce\(", hlo)
  assert reduced and all(re.fullmatch(r"(f32\[\](\{\})?,? ?)+", r.strip()) for r in reduced), reduced


# ---- Training, and sampling from a trained run

@pytest.mark.slow
def test_loss_goes_down_on_a_short_run():
  setup, state = _setup(**{"optim.lr": 3e-3, "optim.warmup_steps": 5, "train.num_steps": 80})
  windows = lm.windows(setup.info.tokenizer.encode(_train_text()[:200_000]), 16)
  batches = data.Batches({"tokens": windows}, 32, seed=0)
  step = jax.jit(functools.partial(lm.train_step, setup))
  losses = []
  for i in range(80):
    state, metrics = step(state, batches.get(i), jax.random.PRNGKey(i))
    losses.append(float(metrics["loss"]))
  assert losses[0] > 4.0  # about log(80) at init
  assert np.mean(losses[-10:]) < 3.0


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("lm_smoke"))
  return workdir, trainer.train(helpers.config("lm_shakespeare"), workdir)


def test_smoke_run_reports_perplexity_and_bits(smoke_run):
  workdir, results = smoke_run
  helpers.assert_smoke_ran(results)
  assert results["step"] == 12 and results["train_step_traces"] == 1
  assert results["perplexity"] == pytest.approx(np.exp(results["loss"]), rel=1e-6)
  assert results["bits_per_char"] == pytest.approx(results["loss"] / np.log(2), rel=1e-6)
  assert 0 < results["bits_per_byte"] <= results["bits_per_char"]  # no fewer bytes than chars
  assert os.path.exists(os.path.join(workdir, "tokenizer", "chars.json"))
  events = event_accumulator.EventAccumulator(os.path.join(workdir, "tb"))
  events.Reload()
  assert [e.step for e in events.Tensors("samples/text_summary")] == [8, 12]


def test_sample_cli_continues_several_prompts(smoke_run):
  workdir, _ = smoke_run
  result = helpers.cli("--workdir", workdir, "--prompt", "ROMEO:", "--prompt", "JULIET\nO",
                       "--max_new_tokens", "40", "--temperature", "0.8", "--top_k", "40",
                       "--top_p", "0.95", "--seed", "0", module="genflax.sample")
  assert result.returncode == 0, result.stderr
  assert "step 12" in result.stdout
  texts = result.stdout.split("---- sample ")[1:]
  assert len(texts) == 2
  assert texts[0].startswith("0\nROMEO:") and texts[1].startswith("1\nJULIET\nO")


# ---- Continuations of held-out text, scored

@pytest.fixture(scope="module")
def trained(smoke_run):
  """The smoke run's (setup, parameters) as genflax.sample loads them: its held-out
  passages and tokenizer, on one device."""
  _, setup, state, _ = trainer.load_run(smoke_run[0])
  return setup, state["params"]


def _texts(setup):
  """The smoke passages' prompts and true continuations, as text."""
  c, tok = setup.config.eval.continuations, setup.info.tokenizer
  passages = setup.info.passages
  return ([tok.decode(p) for p in passages[:, :c.prompt_tokens]],
          [tok.decode(p) for p in passages[:, c.prompt_tokens:]])


def test_final_evaluation_scores_the_continuations(smoke_run):
  _, results = smoke_run
  for key in ("bleu", "bleu_baseline"):
    assert 0 <= results[key] <= 100 and np.isfinite(results[key]), results
  for key in ("rouge_l", "rouge_l_baseline"):
    assert 0 <= results[key] <= 1 and np.isfinite(results[key]), results


def test_passages_are_evenly_spaced_held_out_text():
  passages = lm.held_out_passages(np.arange(100), 3, 10)
  np.testing.assert_array_equal(passages[:, 0], [0, 45, 90])
  np.testing.assert_array_equal(passages[2], np.arange(90, 100))
  with pytest.raises(ConfigError, match="fewer than the 10 of one passage"):
    lm.held_out_passages(np.arange(9), 3, 10)


def test_true_continuations_score_full_marks_and_others_less(trained, monkeypatch):
  """The evaluation's own pairing, with the sampler replaced by one that returns
  each passage's true continuation (then BLEU 100, ROUGE-L 1: a prompt scored
  against another's truth would fall short), or another passage's."""
  setup, params = trained
  c = setup.config.eval.continuations
  truths = setup.info.passages[:, c.prompt_tokens:]
  assert setup.info.passages.shape == (4, 16 + 24)
  monkeypatch.setattr(lm, "continue_tokens", lambda *args: truths)
  perfect = lm.continuation_scores(setup, params, jax.random.PRNGKey(0))
  assert perfect["bleu"] == pytest.approx(100) and perfect["rouge_l"] == pytest.approx(1)
  assert 0 <= perfect["bleu_baseline"] < 50 and 0 < perfect["rouge_l_baseline"] < 0.5
  monkeypatch.setattr(lm, "continue_tokens", lambda *args: np.roll(truths, 1, 0))
  shifted = lm.continuation_scores(setup, params, jax.random.PRNGKey(0))
  assert shifted["bleu"] < 50 and shifted["rouge_l"] < 0.5
  assert shifted["bleu_baseline"] == perfect["bleu_baseline"]
  # One word changed in each text: lower, but not nothing.
  prompts, refs = _texts(setup)
  changed = text_metrics.scores(prompts, [r.replace(r.split()[1], "zzz", 1) for r in refs], refs)
  assert 10 < changed["bleu"] < 100 and 0.5 < changed["rouge_l"] < 1


def test_continuations_in_batches_keep_their_rows(trained, monkeypatch):
  """10 prompts in batches of at most 4: three of 4 rows (the last padded), one
  shape to compile, and each prompt's own new tokens back in its row."""
  setup, params = trained
  shapes = []

  def fake(setup, params, prompts, num_new, rng, *sampling):  # new tokens: the prompt + 100
    shapes.append(prompts.shape)
    return jnp.concatenate([prompts, prompts[:, :num_new] + 100], 1)

  monkeypatch.setattr(lm, "generate_tokens", fake)
  prompts = np.arange(30, dtype=np.int32).reshape(10, 3)
  new = lm.continue_tokens(setup, params, prompts, 2, jax.random.PRNGKey(0),
                           setup.config.eval.continuations, batch_size=4)
  assert shapes == [(4, 3)] * 3
  np.testing.assert_array_equal(new, prompts[:, :2] + 100)


def test_the_baseline_repeats_the_prompts_last_line():
  assert text_metrics.repeat_last_line("ROMEO\nO Romeo.\n\nJUL", 12) == "O Romeo.\nO R"
  assert text_metrics.repeat_last_line("no line", 9) == "no lineno"


def test_without_the_libraries_the_scores_are_skipped_in_one_line(trained, monkeypatch, capsys):
  setup, params = trained
  monkeypatch.setitem(text_metrics.LIBRARIES, "rouge-score", "genflax_no_such_module")
  assert lm.continuation_scores(setup, params, jax.random.PRNGKey(0)) == {}
  assert capsys.readouterr().out == ("continuation scores skipped: BLEU and ROUGE-L need "
                                     "rouge-score, not installed here: pip install 'genflax[lm]'\n")


def _write_texts(path, texts):
  path.write_text("".join(t.replace("\\", "\\\\").replace("\n", "\\n") + "\n" for t in texts))
  return str(path)


def test_sample_cli_scores_continuations_against_references(smoke_run, trained, tmp_path):
  """Held-out prompts from a file, continued by genflax.sample and scored against
  references of several lengths: the model's own continuations (sampled here
  with the command's seed; greedy ones of 12 steps' training repeat one
  letter) cut to those lengths score BLEU 100 and ROUGE-L 1, so each
  continuation is paired with its prompt and as long as its reference."""
  setup, params = trained
  c, tok = setup.config.eval.continuations, setup.info.tokenizer
  prompts, _ = _texts(setup)
  sampling = argparse.Namespace(temperature=1.0, top_k=0, top_p=1.0)
  new = lm.continue_tokens(setup, params, setup.info.passages[:, :c.prompt_tokens], c.new_tokens,
                           jax.random.PRNGKey(0), sampling)
  refs = [tok.decode(row[:c.new_tokens - 4 * i]) for i, row in enumerate(new)]
  result = helpers.cli("--workdir", smoke_run[0], "--temperature", "1", "--seed", "0",
                       "--prompts", _write_texts(tmp_path / "p.txt", prompts),
                       "--references", _write_texts(tmp_path / "r.txt", refs),
                       module="genflax.sample")
  assert result.returncode == 0, result.stderr
  assert result.stdout.count("---- sample ") == 4
  assert f"---- sample 3\n{prompts[3]}{refs[3]}\n" in result.stdout
  scores = dict(re.findall(r"(\w+) ([\d.e+-]+)", result.stdout.splitlines()[-1]))
  want = text_metrics.scores(prompts, refs, refs)
  assert want["bleu"] == pytest.approx(100) and want["rouge_l"] == pytest.approx(1)
  for key, value in want.items():
    assert float(scores[key]) == pytest.approx(value, rel=1e-3, abs=1e-4), (key, result.stdout)


def test_sample_cli_bad_prompt_files_are_one_line(smoke_run, tmp_path):
  workdir, _ = smoke_run
  two = _write_texts(tmp_path / "two.txt", ["To be", "or not\nto be"])
  (tmp_path / "blank.txt").write_text("To be\n\nor not\n")
  for args, message in [
      (["--prompts", str(tmp_path / "none.txt")], "--prompts=" + str(tmp_path / "none.txt") +
       ": No such file or directory"),
      (["--prompts", two, "--references", str(tmp_path / "blank.txt")],
       f"--references={tmp_path / 'blank.txt'}: line 2 is blank"),
      (["--prompt", "ROMEO", "--references", two], "--references holds 2 texts for 1 prompts"),
      (["--prompts", two, "--prompt", "ROMEO"], "--prompt and --prompts both given"),
      (["--prompts", two, "--references", two, "--max_new_tokens", "5"],
       "--max_new_tokens and --references both given")]:
    result = helpers.cli("--workdir", workdir, *args, module="genflax.sample")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("flag,message", [
    ("--top_p=0", "--top_p=0.0: must be in (0, 1]"),
    ("--temperature=-0.5", "--temperature=-0.5: must be >= 0"),
    ("--top_k=-1", "--top_k=-1: must be >= 0"),
])
def test_sampling_flags_that_would_mask_every_token_are_refused(smoke_run, flag, message):
  workdir, _ = smoke_run
  result = helpers.cli("--workdir", workdir, "--prompt", "ROMEO:", flag, module="genflax.sample")
  assert result.returncode == 2 and "Traceback" not in result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), result.stderr


def test_sentencepiece_datasets_measure_tokens_per_char_and_byte(tmp_path):
  config = helpers.config("lm_shakespeare", "spm,smoke")
  train, test, info = lm.datasets(config, str(tmp_path))
  assert 0.2 < info.tokens_per_byte <= info.tokens_per_char < 0.8
  assert train["tokens"].shape[1] == 32 and test["tokens"].shape == (64, 17)  # 2T; T + 1
  assert info.crops == {"tokens": 17}
  assert train["tokens"].max() < info.tokenizer.vocab_size == 400
  assert os.path.exists(tmp_path / "tokenizer" / "spm.model")


def test_sizes_written_out_are_variants():
  assert transformer.get_variant("L4-D128") == transformer.VARIANTS["nano"]
  assert transformer.get_variant("L6-D384-H6-T256") == transformer.VARIANTS["baby"]
  for bad in ("L4-D100-H3", "L0-D64", "4x128", "L2-D96-H32", "nanoo"):  # 96 / 32 heads: odd
    assert transformer.get_variant(bad) is None
  with pytest.raises(ConfigError, match="or a size L<layers>-D<width>"):
    lm.variant(helpers.config("lm_shakespeare", **{"model.variant": "L4-D100-H3"}))


@pytest.mark.slow
def test_evaluation_in_batches_that_do_not_divide_the_split_counts_every_window_once(tmp_path):
  """64 eval windows in batches of 24 (the last padded with 8 copies, masked) on 8
  devices give the means of one batch of all 64."""
  results = []
  for batch in (24, 64):
    config = helpers.config("lm_shakespeare", **{"eval.batch_size": batch})
    _, test, info = lm.datasets(config, str(tmp_path))
    setup = lm.build(config, info)
    params = helpers.init(lm, setup, jax.random.PRNGKey(0))
    assert len(test["tokens"]) == 64
    results.append(lm.evaluate(setup, nn.unbox(params), test, jax.random.PRNGKey(1), False))
  assert results[0] == pytest.approx(results[1], rel=1e-6)
  assert results[0]["loss"] > 3  # an untrained model: near log(vocabulary)
