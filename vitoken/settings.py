"""One way to read a config section: turn it into plain values and reject unknown keys.

Every section of a run's config (data, optim, schedule, model, a reducer entry, a task, the
teacher, ...) goes through these few functions, so a misspelt key is always an error that
names the section, suggests the closest key and lists the allowed ones.

    values = settings.resolve(config.data, DEFAULTS, "data config")        # defaults filled in
    settings.check_keys(entry, allowed_names, "token_reduction method 'tome'")
    settings.check_call(fn, entry, "task 'classification'")               # fn's signature is the schema
"""
import difflib
import inspect
from typing import Any, Callable, Collection, Dict, Iterable, Mapping, Optional

from vitoken.errors import ConfigError


def plain(value, *, sequences=tuple):
  """ConfigDicts, FrozenConfigDicts and mappings to dicts, lists to `sequences`, recursively.

  `sequences=tuple` (the default) makes the result hashable where its leaves are, which
  static module attributes need; pass `list` to keep lists.
  """
  if hasattr(value, "to_dict"):  # ml_collections.ConfigDict / FrozenConfigDict
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {k: plain(v, sequences=sequences) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return sequences(plain(v, sequences=sequences) for v in value)
  return value


def pair(size) -> tuple:
  """A size given as one int or as two (height, width), as a 2-tuple."""
  return (size, size) if isinstance(size, int) else tuple(size)


def is_count(value, minimum: int = 1) -> bool:
  """True for a whole number >= `minimum` (an int or an integral float; never a bool)."""
  try:
    return not isinstance(value, bool) and int(value) == value and value >= minimum
  except (TypeError, ValueError):
    return False


def as_dict(value, section: str) -> Dict[str, Any]:
  """A section (None, ConfigDict or mapping) as a plain dict; anything else is an error."""
  if value is None:
    return {}
  if not (hasattr(value, "to_dict") or isinstance(value, Mapping)):
    raise ConfigError(f"{section} must be a ConfigDict or a dict, got {type(value).__name__}")
  return plain(value)


def unknown_keys_message(unknown: Iterable[str], allowed: Collection[str], section: str) -> str:
  unknown = sorted(unknown)
  allowed = sorted(allowed)
  what = f"key {unknown[0]!r}" if len(unknown) == 1 else f"keys {unknown}"
  hints = [f"{k!r} -> {m[0]!r}" for k in unknown
           if (m := difflib.get_close_matches(k, allowed, n=1))]
  hint = ""
  if len(unknown) == 1 and hints:
    hint = f"; did you mean {hints[0].split(' -> ')[1]}?"
  elif hints:
    hint = f"; did you mean {', '.join(hints)}?"
  return f"unknown {section} {what}{hint}; allowed keys: {allowed}"


def check_keys(given: Iterable[str], allowed: Collection[str], section: str) -> None:
  """Raises ConfigError naming every key of `given` that `allowed` does not have."""
  unknown = set(given) - set(allowed)
  if unknown:
    raise ConfigError(unknown_keys_message(unknown, allowed, section))


def resolve(given, defaults: Mapping[str, Any], section: str) -> Dict[str, Any]:
  """`given` (None, ConfigDict or mapping) over `defaults`, as a plain dict; unknown keys raise."""
  given = as_dict(given, section)
  defaults = as_dict(defaults, section)
  check_keys(given, defaults, section)
  return {**defaults, **given}


def signature_keys(fn: Callable, *, exclude: Collection[str] = ()) -> Dict[str, Any]:
  """{name: default or inspect.Parameter.empty} of fn's named parameters (its config schema)."""
  params = inspect.signature(fn).parameters
  return {n: p.default for n, p in params.items()
          if p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
          and n not in exclude}


def takes_var_keywords(fn: Callable) -> bool:
  return any(p.kind is inspect.Parameter.VAR_KEYWORD
             for p in inspect.signature(fn).parameters.values())


def check_call(fn: Callable, given: Mapping[str, Any], section: str, *,
               exclude: Collection[str] = (), extra_allowed: Optional[Collection[str]] = None
               ) -> None:
  """Rejects keys that are not parameters of `fn` (its signature is the schema) and names
  required parameters that are missing. Where `fn` takes **kwargs, `extra_allowed` lists what
  they may be (None: anything)."""
  schema = signature_keys(fn, exclude=exclude)
  if not takes_var_keywords(fn) or extra_allowed is not None:
    check_keys(given, set(schema) | set(extra_allowed or ()), section)
  missing = sorted(n for n, d in schema.items() if d is inspect.Parameter.empty and n not in given)
  if missing:
    raise ConfigError(f"{section} needs {missing}; add {'it' if len(missing) == 1 else 'them'} "
                      "to that section of the config")
