"""Orbax checkpoints of the whole training state, and the workdir's identity.

A checkpoint holds two items: `state` (parameters, optimizer states, step
and RNG, as one pytree, sharded as in training) and `meta` (JSON: the data
position and which experiment wrote it). Saving is asynchronous: Orbax
copies the arrays before `save` returns, so the next step may donate them.
"""
import json
import os

import orbax.checkpoint as ocp

from genflax.errors import UserError

# Config entries that define an experiment. Resuming with others changed
# (more steps, another log interval) is fine; with these changed, the
# checkpoints would belong to something else.
IDENTITY_KEYS = ("task", "model", "data.name")
# ...except these, which change how the same model is computed, not what.
NOT_IDENTITY = ("model.dense_grads",)


def manager(workdir: str, keep: int | None = None, read_only: bool = False
            ) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=not read_only, read_only=read_only,
      enable_async_checkpointing=True)
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "checkpoints"), options=options,
      item_names=("state", "meta"))


def save(mngr: ocp.CheckpointManager, step: int, state, meta: dict) -> None:
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
      force=True)


def restore(mngr: ocp.CheckpointManager, abstract_state):
  """Latest (state, meta), laid out like `abstract_state`; None if there is none."""
  step = mngr.latest_step()
  if step is None:
    return None
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
  return restored.state, restored.meta


def identity(config: dict) -> dict:
  """The IDENTITY_KEYS entries of a config (as a JSON dict), flat: {"model.arch": ...}."""
  out = {}

  def add(key, value):
    if isinstance(value, dict):
      for k, v in value.items():
        add(f"{key}.{k}", v)
    else:
      out[key] = value

  for key in IDENTITY_KEYS:
    value = config
    for part in key.split("."):
      value = value.get(part) if isinstance(value, dict) else None
    add(key, value)
  return {k: v for k, v in out.items() if k not in NOT_IDENTITY}


def check_workdir(workdir: str, config, latest_step: int | None) -> None:
  """Refuses a workdir whose checkpoints another experiment wrote."""
  path = os.path.join(workdir, "config.json")
  if latest_step is None or not os.path.exists(path):
    return
  with open(path) as f:
    theirs = identity(json.load(f))
  ours = identity(json.loads(config.to_json_best_effort()))
  diffs = [f"{k}={theirs.get(k)!r} there, {ours.get(k)!r} here"
           for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)]
  if diffs:
    raise UserError(
        f"workdir {workdir} holds checkpoints (latest step {latest_step}) of another "
        f"experiment ({'; '.join(diffs)}). Use a new --workdir, or delete "
        f"{workdir} to start this one there.")


def write_config(workdir: str, config) -> None:
  os.makedirs(workdir, exist_ok=True)
  tmp = os.path.join(workdir, "config.json.tmp")
  with open(tmp, "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
  os.replace(tmp, os.path.join(workdir, "config.json"))
