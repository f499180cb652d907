"""How good are generated images: a feature network genflax trains, and FID-style scores.

Every image family scores its samples here (`reference` once per sample
count, then `scores`), so a GAN's FID and a diffusion model's compare.

Shapes: N images, H W C image, F feature width (128), L number of classes.

The Inception network of the usual FID knows nothing of 8x8 digits, so each
dataset gets its own small conv classifier, trained once on the labelled
train split with a fixed seed and saved (Orbax) under
`<data dir>/genflax_features/<dataset>/`; every run on that dataset reuses it,
so scores compare across runs. It trains for `train_steps(num_train)`
batches unless a config asks for another count (`eval.feature_steps`, e.g.
a smoke test's few), which is then kept apart, under `<dataset>-steps<N>/`. Its penultimate layer [N, F] is the feature
space of FID, KID and precision/recall; its class probabilities give the
Inception-Score-style score and the class coverage: the share of samples it
assigns to each class (`class_share_<k>`) and the largest share
(`class_share_max`; the test split's own is `class_share_max_real`), so a
generator that collapses onto a few classes shows in its metrics.

The set statistics are computed on the host in NumPy, FID's and KID's in
float64 (FID's matrix square root is ill-conditioned in float32 for a few
hundred samples), the k-NN distances of precision/recall in float32.
"""
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import tensorflow_datasets as tfds

from genflax import checks, data, files, metrics, sharding
from genflax.errors import ConfigError

FEATURE_WIDTH = 128
TRAIN_BATCH = 128
# At least 400 batches (~36 epochs of digits) and at least 3 epochs: on
# Fashion-MNIST 400 batches (0.85 epochs) reached 88.1% test accuracy, 1,406
# (3 epochs) 90.7% (experiments/fashion_mnist).
MIN_TRAIN_STEPS, TRAIN_EPOCHS = 400, 3
CHUNK = 200        # images per jitted feature call (the last chunk is padded)


class Classifier(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, x):
    """x [N, H, W, C] in [-1, 1] -> features [N, F], logits [N, L]."""
    h = nn.relu(nn.Conv(32, (3, 3))(x))
    h = nn.relu(nn.Conv(64, (3, 3), strides=2)(h))  # halves H, W
    h = nn.relu(nn.Conv(64, (3, 3), strides=2)(h))  # halves H, W
    f = nn.relu(nn.Dense(FEATURE_WIDTH)(h.reshape(h.shape[0], -1)))
    return f, nn.Dense(self.num_classes)(f)


def scale(images, num_levels: int):
  """uint8 levels -> [-1, 1], the range of a tanh generator."""
  return jnp.asarray(images, jnp.float32) / (num_levels - 1) * 2.0 - 1.0


# ---- The feature network: trained once per dataset, then loaded

def train_steps(num_train: int) -> int:
  """The feature network's default number of Adam steps for a train split of num_train."""
  return max(MIN_TRAIN_STEPS, -(-TRAIN_EPOCHS * num_train // TRAIN_BATCH))


def feature_dir(data_dir: str | None, dataset: str, steps: int = 0) -> str:
  """Where the network of `steps` (0: the default) lives; other step counts apart."""
  root = data_dir or tfds.core.constants.get_default_data_dir()
  name = dataset + (f"-steps{steps}" if steps else "")
  return os.path.join(os.path.abspath(os.path.expanduser(root)), "genflax_features", name)


def train_classifier(train, test, info, steps: int):
  """Adam on cross-entropy, seed 0: -> (params, test accuracy)."""
  model = Classifier(info.num_classes)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, *info.image_shape)))["params"]
  tx = optax.adam(1e-3)

  @jax.jit
  def step(params, opt_state, images, labels):
    def loss_fn(p):
      logits = model.apply({"params": p}, scale(images, info.num_levels))[1]
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  batches = data.Batches(train, TRAIN_BATCH, seed=0)
  for i in range(steps):
    batch = batches.get(i)
    params, opt_state = step(params, opt_state, batch["image"], batch["label"])
  apply = jax.jit(lambda p, x: model.apply({"params": p}, x))
  logits = chunked(lambda x: apply(params, x)[1], scale(test["image"], info.num_levels))
  return params, float(np.mean(np.argmax(logits, -1) == test["label"]))


def load_or_train(data_dir, train, test, info, steps: int = 0):
  """-> (features(x [N, H, W, C] in [-1, 1]) -> (features [N, F], probs [N, L]) float64,
  test accuracy). steps: the network's training steps; 0: train_steps(len(train))."""
  if not info.num_classes:
    raise ConfigError(f"dataset {info.name} has no labels: genflax's feature network "
                      "for FID is a classifier and needs them")
  default = train_steps(len(train["label"]))
  path = feature_dir(data_dir, info.name, 0 if steps in (0, default) else steps)
  model = Classifier(info.num_classes)

  def make():
    if os.path.exists(path):
      abstract = jax.eval_shape(lambda: {
          "params": model.init(jax.random.PRNGKey(0), jnp.zeros((1, *info.image_shape)))["params"],
          "test_accuracy": jnp.zeros(())})
      try:
        with _checkpointer() as ckptr:  # as NumPy: nothing here is a multi-host array
          return ckptr.restore(path, jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract))
      except Exception as e:  # pylint: disable=broad-except  (Orbax's errors have no common type)
        why = type(e).__name__ + (f": {str(e).strip().splitlines()[0][:200]}"
                                  if str(e).strip() else "")
        print(f"the feature network in {path} is unreadable ({why}): it is trained again",
              flush=True)
        shutil.rmtree(path)
    else:
      print(f"training the feature network that scores {info.name} images ({steps or default} "
            f"steps), once: it is kept in {path}", flush=True)
    params, acc = train_classifier(train, test, info, steps or default)
    saved = jax.device_get({"params": params, "test_accuracy": jnp.asarray(acc)})
    save(path, saved)
    return saved

  saved = sharding.process_0_first(make, "feature network")  # trained once, by process 0
  apply = jax.jit(lambda p, x: _features_and_probs(model, p, x))
  params = saved["params"]
  return (lambda x: chunked(lambda c: apply(params, c), x)), float(saved["test_accuracy"])


def _features_and_probs(model, params, x):
  f, logits = model.apply({"params": params}, x)
  return f, jax.nn.softmax(logits)


def save(path: str, tree) -> None:
  """Saves beside `path`, then renames: a concurrent run finds a whole checkpoint or none."""
  tmp = f"{path}.tmp{os.getpid()}"
  with _checkpointer() as ckptr:
    ckptr.save(tmp, tree)
  try:
    os.rename(tmp, path)
  except OSError:  # another process saved first; its network is the same (seed 0)
    if not os.path.exists(path):
      raise
    shutil.rmtree(tmp, ignore_errors=True)


def _checkpointer() -> ocp.StandardCheckpointer:
  """An Orbax checkpointer of this process alone: the network is not sharded,
  and in a multi-process run process 0 saves it while the others wait."""
  me = jax.process_index()
  return ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
      primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"features{me}"))


def chunked(fn, x):
  """fn over x [N, ...] in fixed CHUNK-sized pieces (one compilation) -> float64 numpy.
  The pieces are cut on the host: slicing a device array at each offset would
  compile one program per offset."""
  x = np.asarray(x)
  n = x.shape[0]
  pad = -n % CHUNK
  x = np.concatenate([x, np.repeat(x[-1:], pad, 0)]) if pad else x
  outs = [jax.device_get(fn(x[i:i + CHUNK])) for i in range(0, n + pad, CHUNK)]
  return jax.tree.map(lambda *a: np.concatenate(a).astype(np.float64)[:n], *outs)


# ---- What a family calls

def check(config) -> None:
  """The eval values every image family reads here (families call it from `check`)."""
  for key in ("fid_samples", "final_fid_samples", "feature_steps"):
    checks.integer(config, f"eval.{key}", 0)
  checks.integer(config, "eval.final_fid_draws", 1)


def generate(draw, n: int, rng, labels=None, chunk: int = CHUNK) -> np.ndarray:
  """n images [n, H, W, C] in [-1, 1] (NumPy) from draw(rng, labels [chunk] or None,
  chunk) -> [chunk, H, W, C], a chunk at a time (one compilation; the last chunk is
  cut), with fold_in(rng, start) for the chunk from image `start`. labels [n] or None."""
  outs = []
  for start in range(0, n, chunk):
    y = None
    if labels is not None:
      y = np.resize(np.asarray(labels[start:start + chunk], np.int32), chunk)
    outs.append(draw(jax.random.fold_in(rng, start), y, chunk))
  return np.concatenate(jax.device_get(outs))[:n]


def balanced_labels(n: int, num_classes: int | None):
  """[n] labels 0, 1, ..., L - 1, 0, 1, ... for a conditional model (num_classes given),
  else None."""
  return None if num_classes is None else np.arange(n) % num_classes


def save_samples(args, info, conditional: bool, draw) -> None:
  """`genflax.sample`'s output for an image family, from draw (as `generate` takes it).

  args.out ending .npz: args.num images as data, `images` uint8 [N, H, W, C] in the
  dataset's levels (0 to info.num_levels - 1, as the dataset's own images) and, for a
  conditional model, `labels` int32 [N] (all args.label, else balanced). Any other
  name: a PNG grid, 8 per row, one row per class for a conditional model without
  --label. Parent folders are made; the file appears whole or not at all.
  """
  num_classes = info.num_classes if conditional else None
  if args.out.endswith(".npz"):
    metrics.check_label(args.label, num_classes)
    labels = (balanced_labels(args.num, num_classes) if args.label is None
              else np.full(args.num, args.label, np.int32))
    images = generate(draw, args.num, jax.random.PRNGKey(args.seed), labels,
                      min(CHUNK, args.num))
    levels = np.rint((np.clip(images, -1, 1) + 1) / 2 * (info.num_levels - 1)).astype(np.uint8)
    arrays = {"images": levels} if labels is None else {"images": levels,
                                                        "labels": labels.astype(np.int32)}
    files.write_atomically(args.out, lambda f: np.savez(f, **arrays))
    print(f"wrote {args.num} samples to {args.out}")
    return
  rows, cols, labels = metrics.sample_grid(args.num, args.label, num_classes)
  images = generate(draw, rows * cols, jax.random.PRNGKey(args.seed), labels,
                    min(CHUNK, rows * cols))
  metrics.save_sample_grid(args.out, (images + 1.0) / 2.0, rows, cols)

def reference(config, train, test, info, n: int, cache: dict | None = None) -> dict:
  """The real side of every score of n generated images.

  The floor compares n train images (at most all of them) with the test
  split: the score of a generator as good as fresh real data. cache: a dict
  the family keeps (its setup's), where the test split's side, the same
  for every n, is computed once, and each n's floor once.
  """
  cache = {} if cache is None else cache
  if ("image_metrics.reference", n) in cache:
    return cache["image_metrics.reference", n]
  if "image_metrics.real" not in cache:
    features, accuracy = load_or_train(config.data.data_dir or None, train, test, info,
                                       config.eval.get("feature_steps", 0))
    real, real_probs = features(scale(test["image"], info.num_levels))
    cache["image_metrics.real"] = {"features": features, "accuracy": accuracy, "real": real,
                                   "real_radii": knn_radii(real),
                                   "is_real": inception_score(real_probs),
                                   "class_share_max_real": class_shares(real_probs).max()}
  side = cache["image_metrics.real"]
  floor, _ = side["features"](scale(train["image"][:n], info.num_levels))
  cache["image_metrics.reference", n] = {**side, "fid_floor": fid(floor, side["real"]),
                                         "kid_floor": kid(floor, side["real"])}
  return cache["image_metrics.reference", n]


def scores(ref: dict, images) -> dict:
  """FID, KID, IS and precision/recall of images [N, H, W, C] in [-1, 1] against the
  test split, with the reference's floors and the feature network's accuracy."""
  fake, probs = ref["features"](images)
  precision, recall = precision_recall(ref["real"], fake, real_radii=ref["real_radii"])
  shares = class_shares(probs)
  return {"fid": fid(fake, ref["real"]), "fid_floor": ref["fid_floor"],
          "kid": kid(fake, ref["real"]), "kid_floor": ref["kid_floor"],
          "is": inception_score(probs), "is_real": ref["is_real"],
          "precision": precision, "recall": recall,
          "class_share_max": shares.max(), "class_share_max_real": ref["class_share_max_real"],
          **{f"class_share_{k}": share for k, share in enumerate(shares)},
          "feature_net_test_accuracy": ref["accuracy"]}


SPREAD = ("fid", "kid", "is", "precision", "recall", "class_share_max")  # given as _sd


def scores_over_draws(ref: dict, generate, rng, draws: int) -> dict:
  """`scores` of `draws` independent sets of samples, generate(rng) -> images: each
  value's mean over the sets and, for more than one, the standard deviation of the
  SPREAD ones between them (`fid_sd`, ..., ddof 1) and their number (`fid_draws`).
  The first set is generate(rng) itself, so one draw scores as `scores` does."""
  runs = [scores(ref, generate(rng if d == 0 else jax.random.fold_in(rng, d)))
          for d in range(draws)]
  values = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}
  if draws > 1:
    values.update({f"{k}_sd": float(np.std([r[k] for r in runs], ddof=1)) for k in SPREAD})
    values["fid_draws"] = draws
  return values


# ---- Set statistics (float64 NumPy)

def fid(a, b) -> float:
  """Fréchet distance of Gaussians fitted to features a [N, F] and b [M, F].

  |mu_a - mu_b|^2 + tr(Sa + Sb - 2 (Sa Sb)^1/2), with tr (Sa Sb)^1/2 taken as
  the sum of square roots of the eigenvalues of Sa^1/2 Sb Sa^1/2 (symmetric
  PSD, so eigh is stable where a general sqrtm may return complex noise).
  """
  mu_a, mu_b = a.mean(0), b.mean(0)
  cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  w, v = np.linalg.eigh(cov_a)
  root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
  tr_root = np.sum(np.sqrt(np.clip(cross, 0, None)))
  return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_root)


def kid(a, b, num_subsets: int = 20, subset_size: int = 200, seed: int = 0) -> float:
  """Kernel Inception Distance: unbiased MMD^2, kernel (x.y / F + 1)^3, mean over subsets."""
  rng = np.random.default_rng(seed)
  m = min(subset_size, len(a), len(b))
  values = []
  for _ in range(num_subsets):
    x = a[rng.choice(len(a), m, replace=False)]
    y = b[rng.choice(len(b), m, replace=False)]
    k = lambda p, q: (p @ q.T / a.shape[1] + 1) ** 3
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    off = lambda km: (km.sum() - np.trace(km)) / (m * (m - 1))
    values.append(off(kxx) + off(kyy) - 2 * kxy.mean())
  return float(np.mean(values))


def inception_score(probs) -> float:
  """exp E_x KL(p(y|x) || p(y)) from class probabilities [N, L]: high when samples are
  confidently classified and cover the classes (at most L)."""
  p = np.clip(probs, 1e-12, 1.0)
  marginal = p.mean(0, keepdims=True)
  return float(np.exp(np.mean(np.sum(p * (np.log(p) - np.log(marginal)), 1))))


def class_shares(probs) -> np.ndarray:
  """[L]: the share of the images [N] whose most probable class is each class."""
  return np.bincount(np.argmax(probs, -1), minlength=probs.shape[-1]) / len(probs)


def precision_recall(real, fake, k: int = 3, real_radii=None) -> tuple[float, float]:
  """k-NN manifold precision and recall (Kynkäänniemi et al. 2019).

  Precision: the share of fake points inside some real point's k-NN ball
  (quality); recall: the share of real points inside some fake point's ball
  (diversity). real_radii: knn_radii(real, k), where the caller keeps them.
  """
  def coverage(ref, radii, query):
    return float(np.mean(np.any(_distances(query, ref) <= radii[None, :], 1)))
  real_radii = knn_radii(real, k) if real_radii is None else real_radii
  return coverage(real, real_radii, fake), coverage(fake, knn_radii(fake, k), real)


def knn_radii(points, k: int = 3, block: int = 1000):
  """Each point's distance to its k-th nearest other point (index 0 is itself).

  `block` points' rows of squared distances at a time, and the root of the k-th
  alone: a test split's whole matrix (10,000 points) is 400 MB of float32.
  """
  kth = [np.partition(_squared_distances(points[i:i + block], points), k, axis=1)[:, k]
         for i in range(0, len(points), block)]
  return np.sqrt(np.concatenate(kth))


def _squared_distances(a, b):
  """[len(a), len(b)] in float32: the k-NN scores need no float64 (radii within 1e-6 of
  it), and a test split's radii took 7.8 s in float64 against 0.9 s."""
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  d = a @ b.T
  d *= -2
  d += np.sum(a * a, 1)[:, None]
  d += np.sum(b * b, 1)[None, :]
  return np.maximum(d, 0, out=d)


def _distances(a, b):
  return np.sqrt(_squared_distances(a, b))
