"""LM family: a causal Transformer trained on next-token cross-entropy.

Shapes: B batch, T context (tokens per window, `variant.context`), P prompt
length, N new tokens, V vocabulary.

Data: training draws windows of T + 1 tokens at random offsets: the train
stream is held as rows of 2T tokens starting every T, and each epoch crops
every row at a fresh offset in [0, T) (nanoGPT's random crops, visiting the
stream epoch by epoch), so windows do not start on the same grid every
epoch. The validation stream is cut into windows of T + 1 tokens that
overlap by one, so every token after the first is a target exactly once.
Evaluation runs over all validation windows (or, with
`eval.num_windows`, a fixed seeded subset of them) and reports the mean
next-token loss in nats, its perplexity, and bits per character and per
UTF-8 byte of the predicted text (which compare across tokenizers). The
final evaluation also continues `eval.continuations.num_prompts` held-out
passages' first `prompt_tokens` tokens by `new_tokens` (greedy unless the
config says otherwise) and scores the continuations against the passages'
true text with BLEU and ROUGE-L, beside a repeat-the-last-line baseline
(genflax/tasks/text_metrics.py; `genflax.sample --references` scores given
prompts the same way).

Sampling keeps a KV cache of T positions: one prefill of the prompt, then a
`lax.scan` of one-token steps. When the cache is full, the last T/2 tokens
are prefilled again into a fresh cache (the model only knows T positions),
inside the same compiled loop.
"""
import contextlib
import dataclasses
import functools
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from genflax import checks, data, evaluation, metrics, optim, platform, sharding, tokenizers
from genflax.errors import ConfigError
from genflax.models import layers, transformer
from genflax.models.transformer import Transformer
from genflax.tasks import text_metrics


# ---- Data

@dataclasses.dataclass(frozen=True)
class TextInfo:
  name: str
  tokenizer: object = dataclasses.field(repr=False)
  context: int               # T
  num_train_tokens: int
  num_val_tokens: int
  num_train_windows: int
  num_eval_windows: int
  tokens_per_char: float     # over the evaluated targets
  tokens_per_byte: float     # of their UTF-8 encoding
  crops: dict = dataclasses.field(default_factory=dict)  # the trainer's Batches(crops=)
  # Held-out prompts and their true continuations, int32 [n, prompt + new tokens]
  # (`held_out_passages`): what the final evaluation continues and scores.
  passages: np.ndarray | None = dataclasses.field(default=None, repr=False)

  def __str__(self):
    return (f"{self.name} ({self.tokenizer.kind} tokens, vocabulary {self.tokenizer.vocab_size}; "
            f"{self.num_train_tokens:,} train / {self.num_val_tokens:,} validation tokens; "
            f"{self.num_train_windows:,} train / {self.num_eval_windows:,} eval windows of "
            f"{self.context}+1; {1 / self.tokens_per_char:.3f} chars per token)")


def windows(ids: np.ndarray, t: int, width: int | None = None) -> np.ndarray:
  """A token stream [L] -> rows [n, width] starting every t tokens (width t + 1 by
  default: each window starts where the last ended; n as many as fit)."""
  width = width or t + 1
  n = (len(ids) - width) // t + 1
  starts = np.arange(n)[:, None] * t
  return ids[starts + np.arange(width)[None, :]]


def held_out_passages(ids: np.ndarray, n: int, length: int) -> np.ndarray:
  """n passages [n, length] of a token stream [L], their starts evenly spaced from
  its beginning to its end (the same passages in every run of a tokenizer)."""
  if len(ids) < length:
    raise ConfigError(f"the validation split has {len(ids):,} tokens, fewer than the "
                      f"{length:,} of one passage to continue (eval.continuations.prompt_tokens "
                      "+ new_tokens): shorten them, or set eval.continuations.num_prompts=0")
  starts = np.linspace(0, len(ids) - length, n).round().astype(int)
  return ids[starts[:, None] + np.arange(length)[None, :]]


def datasets(config, workdir: str):
  """Windows {"tokens": int32 [N, T + 1]}; the tokenizer is trained into workdir/tokenizer."""
  train_text, val_text = data.load_text(config.data.name, config.data.data_dir or None)
  tok = sharding.process_0_first(lambda: tokenizers.load_or_train(
      config.tokenizer.kind, os.path.join(workdir, "tokenizer"), train_text,
      config.tokenizer.vocab_size), "tokenizer")  # trained once, by process 0
  t = variant(config).context
  train_ids, val_ids = tok.encode(train_text), tok.encode(val_text)
  train, test = windows(train_ids, t, 2 * t), windows(val_ids, t)
  if config.eval.num_windows and config.eval.num_windows < len(test):
    rows = np.random.default_rng(config.seed).choice(len(test), config.eval.num_windows,
                                                     replace=False)
    test = test[np.sort(rows)]
  targets = "".join(tok.decode(w[1:]) for w in test)
  n = test[:, 1:].size
  # .get: genflax.sample reads the config.json of runs made before the section existed.
  c = config.eval.get("continuations")
  passages = (held_out_passages(val_ids, c.num_prompts, c.prompt_tokens + c.new_tokens)
              if c and c.num_prompts else None)
  info = TextInfo(config.data.name, tok, t, len(train_ids), len(val_ids), len(train), len(test),
                  n / len(targets), n / len(targets.encode("utf-8")), {"tokens": t + 1},
                  passages)
  return {"tokens": train}, {"tokens": test}, info


# ---- Setup and state

@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a static jit argument
class Setup:
  config: object
  info: TextInfo
  model: Transformer
  decoder: Transformer       # the same network in model.decode_dtype: what generate_tokens runs
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  mesh: jax.sharding.Mesh


def variant(config) -> transformer.Variant:
  name = config.model.variant
  v = transformer.get_variant(name)
  if v is None:
    raise ConfigError(f"model.variant={name!r}: expected one of {sorted(transformer.VARIANTS)} "
                      "or a size L<layers>-D<width>[-H<heads>][-T<context>], e.g. L4-D128, "
                      "with width a multiple of heads and an even width per head")
  return v


def check(config) -> None:
  """The LM's config values (genflax/checks.py has the shared ones)."""
  checks.one_of(config, "tokenizer.kind", tokenizers.KINDS)
  if config.tokenizer.kind == "sentencepiece":
    checks.integer(config, "tokenizer.vocab_size", 2)
  variant(config)
  checks.one_of(config, "model.positions", transformer.POSITIONS)
  checks.one_of(config, "model.norm", transformer.NORMS)
  checks.one_of(config, "model.attention", ("auto", *transformer.ATTENTIONS))
  checks.one_of(config, "model.dense_grads", layers.DENSE_GRADS)
  if "decode_dtype" in config.model:
    checks.one_of(config, "model.decode_dtype", ("auto", *layers.DTYPES))
  layers.dense_grads(config.model.dense_grads)  # onednn: whether it runs here
  checks.boolean(config, "model.tie_embeddings")
  checks.boolean(config, "model.scan_layers")
  checks.one_of(config, "model.remat", tuple(transformer.REMATS))
  checks.number(config, "model.dropout", low=0, below=1)
  checks.integer(config, "eval.num_windows", 0)
  checks.integer(config, "eval.sample_tokens", 0)
  checks.sampling(config.eval, "eval.")
  checks.integer(config, "eval.continuations.num_prompts", 0)
  checks.integer(config, "eval.continuations.new_tokens", 1)
  checks.integer(config, "eval.continuations.prompt_tokens", 1)
  prompt, t = config.eval.continuations.prompt_tokens, variant(config).context
  if prompt > t:  # the sampler's prefill holds at most the context
    raise ConfigError(f"eval.continuations.prompt_tokens={prompt} is longer than the model's "
                      f"context of {t} tokens: use at most {t}")
  checks.sampling(config.eval.continuations, "eval.continuations.")


def build(config, info: TextInfo) -> Setup:
  m = config.model
  # `auto` values are chosen by the trainer (genflax/platform.py); a config
  # built directly gets this backend's choice.
  attention = platform.attention(jax.default_backend()) if m.attention == "auto" else m.attention
  model = Transformer(info.tokenizer.vocab_size, variant(config), m.positions, m.norm,
                      m.tie_embeddings, m.dropout, attention, layers.dense_grads(m.dense_grads),
                      *layers.dtypes(m), m.get("scan_layers", False), m.get("remat", "none"))
  dtype = m.get("dtype", "float32")
  decode = m.get("decode_dtype", dtype)  # runs saved before it decode in their dtype
  if decode == "auto":
    decode = platform.decode_dtype(jax.default_backend(), dtype)
  decoder = model if jnp.dtype(decode) == model.dtype else model.clone(dtype=jnp.dtype(decode))
  steps = config.train.num_steps
  return Setup(config, info, model, decoder, optim.build(config.optim, steps, decay_mask),
               optim.schedule(config.optim, steps), sharding.make_mesh(config.mesh))


def decay_mask(params):
  """Weight decay for weight matrices only: not embeddings, norms or biases."""
  def is_matrix(path, x):
    keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    ndim = x.ndim - ("blocks" in keys)  # model.scan_layers stacks the blocks on one more axis
    return ndim >= 2 and keys[-1] not in ("embedding", "pos_embed")
  return jax.tree_util.tree_map_with_path(is_matrix, params)


def init(setup: Setup, rng) -> dict:
  tokens = jnp.zeros((1, setup.info.context), jnp.int32)
  params = setup.model.init(rng, tokens)["params"]  # boxed with logical axis names
  return {"params": params,
          "opt_state": optim.init(setup.tx, params, setup.config.train, decay_mask)}


def learning_rates(setup: Setup, step: int) -> dict:
  return {"lr": setup.schedule(step)}


# ---- Training and evaluation

def apply_on_mesh(setup: Setup, params, tokens, train=False, rng=None):
  """Logits [B, T, V] with the activations' logical axes bound to the mesh.

  Inside `shard_map` (train.grad_allreduce=flat) each device holds its own
  rows and the whole model, so there is nothing to lay out.
  """
  layout = contextlib.ExitStack()
  if not jax.sharding.get_abstract_mesh().manual_axes:
    layout.enter_context(jax.sharding.use_abstract_mesh(setup.mesh.abstract_mesh))
    layout.enter_context(nn.logical_axis_rules(tuple(map(tuple, setup.config.sharding_rules))))
  with layout:
    logits, _ = setup.model.apply({"params": params}, tokens, train=train,
                                  rngs=None if rng is None else {"dropout": rng})
  return logits


def window_loss(logits, tokens):
  """Mean next-token NLL per window, nats: logits [B, T, V], tokens [B, T + 1] -> [B]."""
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
  return nll.mean(-1)


def train_step(setup: Setup, state: dict, batch: dict, rng):
  def loss_fn(params, batch, rng):
    tokens = batch["tokens"]  # [B, T + 1]
    logits = apply_on_mesh(setup, params, tokens[:, :-1], train=True, rng=rng)
    loss = window_loss(logits, tokens).mean()
    return loss, {"loss": loss}

  return optim.update(setup.tx, state, loss_fn, batch, rng, setup.config.train, setup.mesh,
                      decay_mask)


def eval_step(setup: Setup, state: dict, batch: dict, rng, final: bool) -> dict:
  """Per window: loss (nats per token), bits per character and per byte [B]."""
  del rng, final  # evaluation is deterministic
  tokens = batch["tokens"]
  loss = window_loss(apply_on_mesh(setup, state["params"], tokens[:, :-1]), tokens)
  # Windows hold equal numbers of targets, so means over windows are exact.
  bits = loss / math.log(2)
  return {"loss": loss, "bits_per_char": bits * setup.info.tokens_per_char,
          "bits_per_byte": bits * setup.info.tokens_per_byte}


_eval_step = jax.jit(eval_step, static_argnums=(0, 4))


def evaluate(setup: Setup, state: dict, test: dict, rng, final: bool,
             parts: evaluation.Parts | None = None) -> dict:
  """eval_step's means over the eval windows, plus perplexity = exp(mean loss);
  at the final evaluation, the continuations' BLEU and ROUGE-L too. Each is one of
  `parts`."""
  parts = parts or evaluation.Parts()
  step = lambda s, b, r, f: _eval_step(setup, s, b, r, f)
  values = dict(parts("means", lambda: evaluation.split_means(
      step, state, test, setup.config.eval.batch_size, sharding.batch_sharding(setup.mesh),
      rng, final)))
  values["perplexity"] = math.exp(values["loss"])
  if final and setup.info.passages is not None:
    values.update(parts("continuations", lambda: continuation_scores(setup, state["params"], rng)))
  return values


def continuation_scores(setup: Setup, params, rng) -> dict:
  """BLEU and ROUGE-L of the held-out passages' continuations and of the baseline
  (text_metrics.scores); {} with one line that says why when the libraries are missing."""
  why = text_metrics.missing()
  if why:
    if jax.process_index() == 0:
      print(f"continuation scores skipped: {why}")
    return {}
  e, tok = setup.config.eval, setup.info.tokenizer
  c = e.continuations
  prompts = setup.info.passages[:, :c.prompt_tokens]                 # [n, P]
  truths = setup.info.passages[:, c.prompt_tokens:]                  # [n, N]
  new = continue_tokens(setup, params, prompts, c.new_tokens, rng, c, e.batch_size)
  return text_metrics.scores([tok.decode(p) for p in prompts], [tok.decode(x) for x in new],
                             [tok.decode(x) for x in truths])


def train_flops(setup: Setup) -> float:
  """FLOPs of one training window, nanoGPT's estimate: 6 N T + 12 L D T^2.

  N counts the weights used in matmuls: not the embedding lookups, but the
  output projection onto the vocabulary (the embedding itself when tied).
  """
  v, t = setup.model.variant, setup.info.context
  shapes = jax.eval_shape(setup.model.init, jax.random.PRNGKey(0), jnp.zeros((1, t), jnp.int32))
  sizes = {"/".join(str(k.key) for k in path): math.prod(x.shape) for path, x in
           jax.tree_util.tree_leaves_with_path(nn.unbox(shapes["params"]))}
  n = sum(size for name, size in sizes.items() if name not in ("embed/embedding", "pos_embed"))
  if setup.model.tie_embeddings:
    n += sizes["embed/embedding"]
  return 6 * n * t + 12 * v.num_layers * v.width * t * t


# ---- Sampling

def sample_token(rng, logits, temperature: float, top_k: int, top_p: float):
  """logits [B, V] -> tokens [B]; temperature 0 is greedy."""
  if temperature == 0:
    return jnp.argmax(logits, -1)
  logits = logits / temperature
  if top_k:
    kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]  # [B, 1]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1:
    ordered = jnp.sort(logits, -1)[:, ::-1]                   # [B, V], most likely first
    probs = jax.nn.softmax(ordered, -1)
    kept = jnp.cumsum(probs, -1) - probs < top_p               # the token crossing top_p stays
    cut = jnp.min(jnp.where(kept, ordered, jnp.inf), -1, keepdims=True)
    logits = jnp.where(logits < cut, -jnp.inf, logits)
  return jax.random.categorical(rng, logits)


@functools.partial(jax.jit, static_argnums=(0, 3, 5, 6, 7))
def generate_tokens(setup: Setup, params, prompts, num_new: int, rng,
                    temperature: float, top_k: int, top_p: float):
  """prompts int [B, P] (P <= T) -> [B, P + N]: the prompts and N sampled tokens,
  computed in model.decode_dtype (setup.decoder)."""
  model, s = setup.decoder, setup.info.context
  b, p = prompts.shape
  keep = s // 2
  new_cache = lambda: transformer.init_cache(model.variant, b, model.dtype, model.scan_layers)
  logits, cache = model.apply({"params": params}, prompts, new_cache())
  buf = jnp.concatenate([prompts, jnp.zeros((b, num_new), prompts.dtype)], 1)  # [B, P + N]

  def step(carry, i):
    buf, cache, pos, last, rng = carry
    rng, sub = jax.random.split(rng)
    tok = sample_token(sub, last, temperature, top_k, top_p).astype(buf.dtype)  # [B]
    buf = jax.lax.dynamic_update_slice(buf, tok[:, None], (0, p + i))

    def refill(_):  # the cache is full: restart it from the last T/2 tokens
      window = jax.lax.dynamic_slice(buf, (0, p + i + 1 - keep), (b, keep))
      logits, c = model.apply({"params": params}, window, new_cache())
      return c, jnp.int32(keep), logits[:, -1]

    def advance(_):
      logits, c = model.apply({"params": params}, tok[:, None], cache, pos)
      return c, pos + 1, logits[:, -1]

    if p + num_new <= s:  # the cache never fills (nor holds the T/2 tokens a refill takes)
      cache, pos, last = advance(None)
    else:
      cache, pos, last = jax.lax.cond(pos == s, refill, advance, None)
    return (buf, cache, pos, last, rng), None

  carry = (buf, cache, jnp.int32(p), logits[:, -1], rng)
  (buf, *_), _ = jax.lax.scan(step, carry, jnp.arange(num_new))
  return buf


def continue_tokens(setup: Setup, params, prompts: np.ndarray, num_new: int, rng,
                    sampling, batch_size: int | None = None) -> np.ndarray:
  """prompts int32 [B, P] -> the N new tokens [B, N] on the host, sampled with
  `sampling`'s temperature, top_k and top_p; the prompts replicated over the mesh.

  With batch_size, in as few equal batches of at most that many prompts as
  cover B (the last padded with copies: one compilation), each batch with its
  own key from `rng`; one batch draws from `rng` itself.
  """
  b, p = prompts.shape
  count = -(-b // min(batch_size or b, b))
  size = -(-b // count)
  prompts = np.concatenate([prompts, np.repeat(prompts[-1:], count * size - b, 0)])
  keys = jax.random.split(rng, count) if count > 1 else [rng]
  repl = sharding.replicated(setup.mesh)
  new = []
  for i, key in enumerate(keys):
    rows = sharding.put_batch({"prompts": prompts[i * size:(i + 1) * size]}, repl)["prompts"]
    out = generate_tokens(setup, params, rows, num_new, key, sampling.temperature,
                          sampling.top_k, sampling.top_p)
    new.append(np.asarray(jax.device_get(out))[:, p:])
  return np.concatenate(new)[:b]


def encode_prompts(setup: Setup, prompts: list[str]) -> tuple[np.ndarray, list[int]]:
  """Prompts -> int32 [B, P] and each one's padding.

  Shorter prompts are left-padded with newlines, the corpus's own separator,
  so one batch needs no attention mask (an empty prompt starts from a
  newline); prompts longer than T keep their end.
  """
  tok = setup.info.tokenizer
  newline = int(tok.encode("\n")[-1])
  encoded = [tok.encode(text)[-setup.info.context:] for text in prompts]
  p = max(1, *map(len, encoded))
  pads = [p - len(e) for e in encoded]
  return np.stack([np.concatenate([np.full(n, newline, np.int32), e])
                   for n, e in zip(pads, encoded)]), pads


def samples(setup: Setup, state: dict, batch: dict, rng):
  """Tokens [1, P + N] continuing `eval.prompt` (the same at every eval)."""
  del batch  # the prompt comes from the config
  e = setup.config.eval
  prompts, _ = encode_prompts(setup, [e.prompt])
  return generate_tokens(setup, state["params"], jnp.asarray(prompts), e.sample_tokens, rng,
                         e.temperature, e.top_k, e.top_p)


def write_samples(setup: Setup, tokens, writer, step: int) -> None:
  text = setup.info.tokenizer.decode(tokens[0])
  writer.text(step, "samples", text)
  if writer.enabled:  # the console log is process 0's, as the trainer's
    print(f"sample at step {step}:\n{text}\n")


def generate(setup: Setup, state: dict, args) -> None:
  """`genflax.sample`: continues each prompt (batched) and prints the texts.

  With `args.references` (one per prompt), each continuation is as many
  tokens long as its reference and is scored against it as the final
  evaluation scores its passages (text_metrics.scores).
  """
  tok, texts, references = setup.info.tokenizer, list(args.prompt), args.references
  lengths = ([len(tok.encode(r)) for r in references] if references
             else [args.max_new_tokens] * len(texts))
  prompts, pads = encode_prompts(setup, texts)
  new = continue_tokens(setup, state["params"], prompts, max(lengths),
                        jax.random.PRNGKey(args.seed), args)
  new = [row[:n] for row, n in zip(new, lengths)]
  for i, (prompt, pad) in enumerate(zip(prompts, pads)):
    print(f"---- sample {i}\n{tok.decode(np.concatenate([prompt[pad:], new[i]]))}")
  if references:
    values = text_metrics.scores(texts, [tok.decode(row) for row in new], references)
    print(f"scores  {metrics.format_values(values)}")
