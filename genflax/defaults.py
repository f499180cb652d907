"""Config sections that every experiment has, with their defaults.

Config files (`configs/*.py`) start from these and change what differs, so
a key means the same thing in every experiment. Durations are in steps.
"""
import ml_collections

from genflax.errors import ConfigError


def variants(arg: str, known) -> set[str]:
  """The comma-separated variants of a config's `:arg`; an unknown one is an error
  that lists those the config has."""
  chosen = set(filter(None, arg.split(",")))
  unknown = sorted(chosen - set(known))
  if unknown:
    raise ConfigError(f"unknown variant{'s' if len(unknown) > 1 else ''} "
                      f"{', '.join(map(repr, unknown))} in ':{arg}'; this config's variants "
                      f"are {', '.join(sorted(known))} (comma-separated)")
  return chosen


def base(task: str, dataset: str, batch_size: int) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = task                  # the family module: genflax.tasks.<task>
  c.seed = 0
  c.data = ml_collections.ConfigDict(dict(
      name=dataset,
      data_dir="",               # "" = tfds's default (TFDS_DATA_DIR or ~/tensorflow_datasets)
      # The directory of an IDX dataset's files (fashion_mnist, idx), read once
      # to prepare it into data_dir. "" = the dataset's own: fashion_mnist's is
      # Debian's /usr/share/datasets/fashion-mnist; idx has none.
      idx_dir="",
      batch_size=batch_size,     # global, over all devices and hosts
      # Training sets up to this many MB live on every device and the step
      # gathers its own batch (no host work per step); larger ones are sent
      # from the host each step. 0: always from the host. (genflax/data/feed.py)
      on_device_mb=256,
  ))
  c.optim = optim()
  c.train = ml_collections.ConfigDict(dict(
      num_steps=1000,
      log_every_steps=100,
      eval_every_steps=500,
      ckpt_every_steps=500,
      keep_checkpoints=3,
      # Gradient accumulation: each step's batch runs as this many sequential
      # microbatches whose gradients are averaged before the one update (less
      # activation memory; on CPU the smaller working set also runs faster).
      microbatches=1,
      # How gradients are averaged over data-parallel devices: per_param (the
      # all-reduces XLA inserts, one buffer per parameter; randomness drawn
      # for the whole batch, the same on any mesh), flat (one all-reduce of
      # all gradients as one buffer, each device drawing its own randomness;
      # faster between CPU devices and processes: benchmarks/README.md) or
      # reduce_scatter (as flat, but each device updates only its 1/n of the
      # parameters with its 1/n of the optimizer state: ZeRO stage 1), or
      # auto: chosen for the backend, mesh and model size (genflax/platform.py).
      grad_allreduce="per_param",
      profile_steps=(0, 0),      # (start, stop): trace these steps into workdir/profile
  ))
  c.eval = ml_collections.ConfigDict(dict(
      batch_size=120,            # the last test batch is padded and masked
      num_samples=32,            # test examples given to task.samples (reconstructions, prompts)
  ))
  # Axis sizes of the device mesh; -1 takes the remaining devices. The devices
  # are placed by the physical topology; dcn_data / dcn_fsdp > 1 split that
  # axis into groups across TPU slices or GPU hosts (a hybrid mesh:
  # genflax/sharding.py), e.g. data=16, dcn_data=2 for two 8-GPU hosts.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1))
  # On a CPU-only machine, XLA makes one device that small matmuls run on one
  # core of; N > 0 splits the host into N devices (-1: one per core) so the
  # batch runs data-parallel over the cores. 0 keeps XLA's default. An
  # XLA_FLAGS device count set in the environment wins.
  c.cpu_devices = 0
  # keep: malloc keeps the memory a step frees for the next one instead of
  # faulting it back in; system: malloc as it is; auto: keep on one CPU
  # device (genflax/hostmem.py).
  c.host_malloc = "auto"
  c.sharding_rules = ()          # (logical axis, mesh axis) pairs
  return c


def optim(**overrides) -> ml_collections.ConfigDict:
  """See genflax.optim for what each key does."""
  c = ml_collections.ConfigDict(dict(
      name="adam", lr=1e-3, schedule="cosine", warmup_steps=100, decay_steps=0,
      end_lr_frac=0.01, weight_decay=0.0, grad_clip=0.0, b1=0.9, b2=0.999))
  c.update(overrides)
  return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a run to seconds, for tests: a few steps, each part exercised once.

  Convolutions are XLA's own: they compile in about half the time of the
  matmul form `auto` picks on CPU (a diffusion smoke run: 23 s against 38 s
  of compiling), and tests/test_conv.py checks each family's train step in
  every form against them.
  """
  c.train.update(num_steps=12, log_every_steps=4, eval_every_steps=8, ckpt_every_steps=8)
  if "conv" in c.get("model", {}):
    c.model.conv = "xla"
  for key in c.keys():  # every optimizer section: `optim`, or one per network (GANs)
    if key.startswith("optim"):
      c[key].warmup_steps = min(c[key].warmup_steps, 2)
  return c
