"""Character-level GPT on the embedded Shakespeare plays (no download).

    python -m genflax.main --config configs/lm_shakespeare.py --workdir runs/lm
    python -m genflax.sample --workdir runs/lm --prompt "ROMEO:" --max_new_tokens 500 --temperature 0.8 --top_k 40 --top_p 0.95 --seed 0
    python -m genflax.sample --workdir runs/lm --prompts prompts.txt --references truths.txt --temperature 0

The final evaluation reports validation loss, perplexity, bits/char and
BLEU / ROUGE-L of greedy continuations of held-out passages beside a
repeat-the-last-line baseline (`eval.continuations`; `pip install -e '.[lm]'`).

Variants (the `:arg`, comma-separated): `nano` (the default: 4 layers, 4
heads, 128 wide, context 64; a few minutes on 2 CPU cores), `baby` (6x6x384,
context 256, dropout 0.2: hours on CPU), `gpt2` (GPT-2 small's shape,
12x12x768, context 1024, 86M parameters with characters; for accelerators:
bfloat16, layers scanned, activations rematerialised), `spm` (sentencepiece subwords
instead of characters, vocabulary 1024), `rotary` (rotary instead of
learned positions), `smoke` (seconds, for tests).

Sweeps (`python -m genflax.sweep --config configs/lm_shakespeare.py --sweep NAME
--workdir DIR`): `scaling`, validation loss against model size at nano's
budget of tokens (2,000 steps of 12 x 64); `tokens`, characters against
sentencepiece subwords in bits per character (experiments/sweep_lm_shakespeare).
"""
import ml_collections

from genflax import defaults


VARIANTS = ("nano", "baby", "gpt2", "spm", "rotary", "smoke")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  variants = defaults.variants(arg, VARIANTS)
  c = defaults.base("lm", "shakespeare", batch_size=12)
  c.tokenizer = ml_collections.ConfigDict(dict(
      kind="char",                 # char | sentencepiece (trained on the train split)
      vocab_size=0,                # sentencepiece only
  ))
  c.model = ml_collections.ConfigDict(dict(
      variant="nano",              # a row of genflax.models.transformer.VARIANTS, or L4-D128 (layers, width)
      positions="learned",         # learned | rotary
      norm="layernorm",            # layernorm | rmsnorm
      tie_embeddings=True,
      dropout=0.0,
      # auto | einsum | dot_product_attention (jax.nn's: cuDNN's fused kernel on GPUs).
      # auto: einsum on CPU, dot_product_attention elsewhere (genflax/platform.py).
      attention="auto",
      dense_grads="auto",          # auto | xla | row_major | onednn (auto: row_major on CPU; genflax/models/layers.py)
      dtype="float32",             # compute: float32 | bfloat16 | auto (params, losses, softmax stay
      #                              float32; auto: the faster here, genflax/platform.py)
      param_dtype="float32",       # parameters and optimizer state
      # The KV-cache decode's compute: auto | float32 | bfloat16. auto: float32 on CPU
      # (XLA:CPU has no bfloat16 one-row matmul), dtype elsewhere (genflax/platform.py).
      decode_dtype="auto",
      scan_layers=False,           # one block scanned over depth (compile time flat in depth)
      remat="none",                # none | dots | full: recompute block activations in backward
  ))
  c.optim = defaults.optim(name="adamw", lr=1e-3, warmup_steps=100, end_lr_frac=0.1,
                           weight_decay=0.1, grad_clip=1.0, b2=0.99)
  c.train.update(num_steps=2000, log_every_steps=50, eval_every_steps=250,
                 ckpt_every_steps=500)
  c.eval.update(
      batch_size=120,
      num_windows=0,               # 0: every validation window; n: a fixed seeded n of them
      num_samples=1,
      prompt="ROMEO\n",            # speakers head their lines in this corpus
      sample_tokens=300,
      temperature=0.8, top_k=40, top_p=0.95,
  )
  # At the final evaluation: held-out validation prompts, evenly spaced over
  # the split, continued by the model and scored against their true
  # continuations with BLEU and ROUGE-L (genflax/tasks/text_metrics.py).
  c.eval.continuations = ml_collections.ConfigDict(dict(
      num_prompts=256,             # 0: none scored
      prompt_tokens=64,            # each prompt's length, at most the context
      new_tokens=64,               # each continuation's, and its true text's
      temperature=0.0, top_k=0, top_p=1.0,  # greedy: the same scores every time
  ))
  # On CPU, one device per core runs the batch data-parallel: at nano size
  # the single default device leaves the second core idle (benchmarks/README.md).
  c.cpu_devices = -1
  # auto: between CPU devices, gradients are summed as one flat buffer (each
  # buffer of a collective costs tens of microseconds, about half a
  # millisecond between processes) and, for models under 4M parameters
  # (nano), reduce-scattered so that each device runs AdamW on its share of
  # the parameters, which are then all-gathered (ZeRO stage 1; genflax/optim.py);
  # on GPUs and TPUs, and with fsdp or tensor axes, XLA's own all-reduces
  # (genflax/platform.py). The run's log line `auto:` says what it chose.
  c.train.grad_allreduce = "auto"
  # Batches over data (and fsdp); fsdp shards parameters' embed axis, tensor
  # the heads, MLP and vocabulary. A mesh axis serves one logical axis per array.
  c.sharding_rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("heads", "tensor"),
                      ("mlp", "tensor"), ("vocab", "tensor"), ("length", None), ("kv", None),
                      ("layers", None))  # the stacked axis of model.scan_layers
  if "baby" in variants:
    c.model.update(variant="baby", dropout=0.2)
    c.data.batch_size = 64
    # 8 sequential microbatches of 8 windows: the same update, and on 2 CPU
    # cores 1.6x faster than one pass over 64 (benchmarks/README.md).
    c.train.microbatches = 8
    c.eval.batch_size = 64
    c.train.update(num_steps=5000, eval_every_steps=500)
    c.optim.update(lr=1e-3, warmup_steps=100)
  if "gpt2" in variants:
    c.model.update(variant="gpt2", dtype="bfloat16", scan_layers=True, remat="dots")
    c.data.batch_size = c.eval.batch_size = 32
    c.train.update(num_steps=5000, eval_every_steps=500, ckpt_every_steps=500)
    c.optim.update(lr=6e-4, warmup_steps=200)
    c.eval.num_windows = 512
  if "spm" in variants:
    c.tokenizer.update(kind="sentencepiece", vocab_size=1024)
  if "rotary" in variants:
    c.model.positions = "rotary"
  if "smoke" in variants:
    defaults.smoke(c)
    c.model.variant = "tiny"
    c.data.batch_size = 16
    c.eval.update(batch_size=32, num_windows=64, sample_tokens=24)
    c.eval.continuations.update(num_prompts=4, prompt_tokens=16, new_tokens=24)
    if c.tokenizer.kind == "sentencepiece":
      c.tokenizer.vocab_size = 400
  return c


SWEEPS = {
    # Depth x width at a fixed number of training tokens (steps, batch and
    # context stay nano's): a small scaling study.
    "scaling": dict(
        params={"model.variant": [f"L{l}-D{d}" for l in (2, 4, 6) for d in (64, 128, 192)]},
        metric="loss"),
    "tokens": dict(params={":tokenizer": ["", "spm"], "seed": [0, 1]}, metric="bits_per_char"),
}


def get_sweep(name: str) -> dict:
  return SWEEPS[name]
