"""Search spaces: what a sweep varies, from the command line or a config file.

On the command line (`--param KEY=SPACE`) and in a config file's
`get_sweep` (as these strings, or as the objects they parse to):

    [a, b, c]  or  choice(a, b, c)   these values (a grid axis)
    range(start, stop[, step])       the integers start, start + step, ... < stop (a grid axis)
    uniform(low, high)               a float, uniform in [low, high]
    loguniform(low, high)            a float, log-uniform in [low, high]
    int(low, high)                   an integer in [low, high]
    logint(low, high)                an integer in [low, high], log-uniform
    a                                one fixed value

Values are Python literals; bare words are strings (`[ns, hinge]`) and
tuples stay tuples (`[(64,), (128, 128)]`). A key is a dotted config key
(`optim.lr`), or `:NAME` for an axis of the config file's variants (the
`:arg` of `--config FILE:arg`): `':loss=["", hinge, wgan]'` runs the
default, then `FILE:hinge`, then `FILE:wgan`.
"""
import ast
import dataclasses
import math

from genflax.errors import ConfigError

SYNTAX = ("[a, b], choice(a, b), range(start, stop), uniform(low, high), "
          "loguniform(low, high), int(low, high), logint(low, high) or one value")


@dataclasses.dataclass(frozen=True)
class Choice:
  """One of `values`: what a grid runs through."""
  values: tuple

  def __post_init__(self):
    if not self.values:
      raise ValueError("an empty list of values")
    codes = [encode(v) for v in self.values]
    if len(set(codes)) < len(codes):
      raise ValueError(f"repeated values in {list(self.values)}")

  def suggest(self, trial, name: str):
    codes = [encode(v) for v in self.values]
    return self.values[codes.index(trial.suggest_categorical(name, codes))]

  def __str__(self):
    return "[" + ", ".join(_text(v) for v in self.values) + "]"


@dataclasses.dataclass(frozen=True)
class Float:
  low: float
  high: float
  log: bool = False

  def __post_init__(self):
    _check_bounds(self.low, self.high, self.log)

  def suggest(self, trial, name: str):
    return trial.suggest_float(name, self.low, self.high, log=self.log)

  def __str__(self):
    return f"{'loguniform' if self.log else 'uniform'}({self.low!r}, {self.high!r})"


@dataclasses.dataclass(frozen=True)
class Int:
  low: int
  high: int
  log: bool = False

  def __post_init__(self):
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (self.low, self.high)):
      raise ValueError(f"integer bounds, got {self.low!r} and {self.high!r}")
    _check_bounds(self.low, self.high, self.log)

  def suggest(self, trial, name: str):
    return trial.suggest_int(name, self.low, self.high, log=self.log)

  def __str__(self):
    return f"{'logint' if self.log else 'int'}({self.low}, {self.high})"


Space = Choice | Float | Int


def _check_bounds(low, high, log):
  if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
    raise ValueError(f"numeric bounds, got {low!r} and {high!r}")
  if not low < high:
    raise ValueError(f"low < high, got {low!r} and {high!r}")
  if log and low <= 0:
    raise ValueError(f"a log scale needs low > 0, got {low!r}")


def choice(*values) -> Choice:
  return Choice(tuple(values))


def uniform(low, high) -> Float:
  return Float(low, high)


def loguniform(low, high) -> Float:
  return Float(low, high, log=True)


def randint(low, high) -> Int:
  return Int(low, high)


def logint(low, high) -> Int:
  return Int(low, high, log=True)


_CALLS = {
    "choice": choice,
    "range": lambda *a: Choice(tuple(range(*a))),
    "uniform": uniform,
    "loguniform": loguniform,
    "int": randint,
    "logint": logint,
}


def parse(key: str, text: str) -> Space:
  """`--param KEY=TEXT` -> its space, or a ConfigError that says how to write it."""
  where = f"--param {key}={text}"
  try:
    node = ast.parse(text.strip(), mode="eval").body
    if isinstance(node, ast.List):
      return Choice(tuple(_literal(e) for e in node.elts))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
      if node.func.id not in _CALLS or node.keywords:
        raise ValueError(f"{node.func.id}(...) is not a space")
      return _CALLS[node.func.id](*[_literal(a) for a in node.args])
    return Choice((_literal(node),))
  except SyntaxError:
    raise ConfigError(f"{where}: cannot read it; write {SYNTAX} "
                      "(quote strings with spaces or symbols)") from None
  except (ValueError, TypeError) as e:
    raise ConfigError(f"{where}: {e}; write {SYNTAX}") from None


def from_config(key: str, value) -> Space:
  """A space as a config file's get_sweep gives it: a Space, a list of values, or a string."""
  if isinstance(value, (Choice, Float, Int)):
    return value
  if isinstance(value, str):
    return parse(key, value)
  if isinstance(value, list):
    try:
      return Choice(tuple(tuple(v) if isinstance(v, list) else v for v in value))
    except ValueError as e:
      raise ConfigError(f"sweep parameter {key}: {e}") from None
  raise ConfigError(f"sweep parameter {key}={value!r}: give a list of values, a space "
                    f"from genflax.sweep.space or a string ({SYNTAX})")


def _literal(node):
  """A value of the space grammar: a Python literal; bare names are strings."""
  if isinstance(node, ast.Name):
    return node.id
  if isinstance(node, (ast.Tuple, ast.List)):
    return tuple(_literal(e) for e in node.elts)
  try:
    return ast.literal_eval(node)
  except ValueError:
    raise ValueError(f"{ast.unparse(node)!r} is not a value") from None


def encode(value):
  """What Optuna stores for a choice: its own types as they are, others as text."""
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  return format_value(value)


def format_value(value) -> str:
  """A value as `--config.KEY=` takes it (and as tables show it)."""
  if isinstance(value, tuple):
    inner = ", ".join(format_value(v) for v in value)
    return f"({inner},)" if len(value) == 1 else f"({inner})"
  if isinstance(value, float):
    return repr(value)
  return str(value)


def _text(value) -> str:
  """A value as the space grammar reads it back: strings bare where they can be."""
  if isinstance(value, str):
    return value if value.isidentifier() and value not in ("True", "False", "None") else repr(value)
  if isinstance(value, tuple):
    inner = ", ".join(_text(v) for v in value)
    return f"({inner},)" if len(value) == 1 else f"({inner})"
  return repr(value)


def grid(spaces: dict[str, Space]) -> dict[str, list]:
  """The Optuna grid (name -> encoded values) of spaces that are all finite."""
  ranges = [k for k, s in spaces.items() if not isinstance(s, Choice)]
  if ranges:
    raise ConfigError(f"a grid needs lists of values, but {', '.join(ranges)} "
                      f"{'is a range' if len(ranges) == 1 else 'are ranges'}: give "
                      "[a, b, ...] or range(start, stop), or use --sampler random or tpe")
  return {k: [encode(v) for v in s.values] for k, s in spaces.items()}


def grid_size(spaces: dict[str, Space]) -> int | None:
  """How many points a grid of these spaces has; None if one is a range."""
  if not all(isinstance(s, Choice) for s in spaces.values()):
    return None
  return math.prod(len(s.values) for s in spaces.values())
