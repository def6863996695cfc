"""What the command-line tools share: config files whose overrides take structured values, and
user errors reported as one message.

    _CONFIG = cli.DEFINE_config_file("config", "a config file", reference=config.override_reference)
    if __name__ == "__main__":
      cli.run(main)

`--config.<key>=<value>` sets any key of the loaded config, or a key of `reference` (a function
returning the keys a command line may set even where the config file left them out). A key
that holds a section, a list or None takes a JSON value (Python literals as ml_collections
takes them work too), which replaces it whole:

    --config.model.token_reduction='[{"method": "evit", "keep_rate": 0.7}]'
    --config.task='{"name": "distillation", "teacher": {"path": "/tmp/dense"}}'
    --config.data.folder=/data/imagenet     # None-valued keys also take a bare string

Keys holding a number, string, bool or tuple are parsed by their type, as ml_collections'
config_flags does. Overrides apply in command-line order, so `--config.task.temperature=2`
after `--config.task='{...}'` refines the new section.

`run(main)` is absl's app.run, except that a `vitoken.errors.UserError` (from main, or from
reading the command line) prints `error: <message>` and exits with status 1; with
--verbosity=1 (or more) it raises as usual, traceback included.
"""
import ast
import copy
import importlib.util
import json
import os
import re
import sys
from typing import Any, Callable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from absl import app, flags
from ml_collections import config_dict
from ml_collections.config_flags import config_flags, config_path

from vitoken import settings as settings_lib
from vitoken.errors import ConfigError, MissingPathError, UserError

FLAGS = flags.FLAGS
_MISSING = object()

# The flags DEFINE_config_file defines belong to its caller (the tool), as config_flags' do.
flags.disclaim_key_flags()


class _Override(NamedTuple):
  index: int  # position in argv
  path: str  # "model.token_reduction"
  value: Optional[str]  # the text after '=', else the next argument, else None
  tokens: int  # arguments it spans: 1, or 2 for `--config.key value`
  negated: bool  # --noconfig.key


def _overrides(argv: Sequence[str], name: str) -> List[_Override]:
  """Every `--name.<path>[=value]` of argv, as config_flags finds them."""
  pattern = re.compile(rf"--?(no)?{re.escape(name)}\.([^=]+)(=(.*))?$", re.DOTALL)
  found = []
  for i, arg in enumerate(argv):
    if arg == "--":  # absl parses no flags after it
      break
    m = pattern.match(arg)
    if not m:
      continue
    if m[3] is not None:
      found.append(_Override(i, m[2], m[4], 1, bool(m[1])))
    else:
      nxt = argv[i + 1] if i + 1 < len(argv) else None
      found.append(_Override(i, m[2], nxt, 2 if nxt is not None else 1, bool(m[1])))
  return found


def _is_section(value) -> bool:
  return isinstance(value, (config_dict.ConfigDict, Mapping))


def _is_structured(value) -> bool:
  """Values config_flags cannot parse from text by their type: these take JSON."""
  return value is None or _is_section(value) or isinstance(value, list)


def _child(holder, part):
  """holder[part], or _MISSING."""
  if isinstance(holder, (list, tuple)):
    inside = isinstance(part, int) and -len(holder) <= part < len(holder)
    return holder[part] if inside else _MISSING
  if _is_section(holder) and isinstance(part, str) and part in holder:
    return holder[part]
  return _MISSING


def _decode(flag: str, text: Optional[str], current) -> Any:
  """A structured value from its text: JSON, else a Python literal, else (where the key holds
  None) the text itself as a string."""
  if text is None:
    raise ConfigError(f"{flag} needs a value, e.g. {flag}='{{...}}' (JSON)")
  try:
    return json.loads(text)
  except ValueError as e:
    json_error = e
  try:
    # config_flags read sections as Python literals; command lines written for it keep working.
    return ast.literal_eval(text)
  except (SyntaxError, ValueError):
    pass
  if current is None and not text.lstrip().startswith(("{", "[")):
    return text  # a path or a regex for a key that defaults to None
  raise ConfigError(
      f"{flag}={text!r} is not valid JSON ({json_error}); give the value as JSON, quoted "
      "for the shell, e.g. --config.model.token_reduction='[{\"method\": \"evit\", "
      "\"keep_rate\": 0.7}]' or --config.task='{\"name\": \"classification\"}'")


class _ConfigFileParser(flags.ArgumentParser):
  """Loads `file.py[:arg]` through its get_config(arg), creates the overridden keys that only the
  reference has, and applies the overrides config_flags cannot parse (structured values).

  `argv` is the command line, shared with config_flags (its `sys_argv`), which then sees only
  the overrides left to it; the structured ones become flags of their own, so absl accepts them.
  """

  def __init__(self, name: str, flag_values: flags.FlagValues, argv: List[str],
               reference: Optional[Callable[[], Any]]):
    self.name = name
    self.flag_values = flag_values
    self.argv = argv
    self.reference = reference

  def flag_type(self):
    return "config object"

  def parse(self, argument):
    config = self._load(argument)
    if isinstance(config, config_dict.ConfigDict):
      self._apply_overrides(config)
    if callable(getattr(config, "lock", None)):
      config.lock()
    return config

  def _load(self, argument: str):
    path, colon, arg = argument.partition(":")
    if not os.path.isfile(path):
      raise MissingPathError(f"config file {path!r} does not exist (--{self.name}={argument}); "
                             "give the path of a .py file with get_config(arg), e.g. "
                             f"--{self.name}=configs/quickstart.py")
    spec = importlib.util.spec_from_file_location(f"{self.name}_config", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as config_flags loads it (dataclasses look it up there)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
      raise ConfigError(f"config file {path} has no get_config(arg) function")
    try:
      return module.get_config(*([arg] if colon else []))
    except UserError:
      raise
    except ValueError as e:
      # A config file rejects its argument with ValueError: the user's to fix.
      raise ConfigError(f"--{self.name}={argument}: {e}") from e

  def _apply_overrides(self, config):
    overrides = _overrides(self.argv, self.name)
    reference = self.reference() if self.reference else None
    applied = []
    # In command-line order, so a key inside a section given whole exists when it is reached.
    for o in overrides:
      try:
        parts = config_path.split(o.path)
      except ValueError:
        continue  # not a path config_flags can read either; it reports it
      current, schema = self._ensure(config, reference, parts, o)
      if not _is_structured(current):
        continue  # config_flags parses it by its type
      earlier = [p for p in overrides if p.index < o.index
                 and (p.path.startswith(o.path + ".") or p.path.startswith(o.path + "["))]
      if earlier:
        raise ConfigError(f"--{self.name}.{earlier[0].path} comes before --{self.name}.{o.path}, "
                          "which replaces it; give the whole value first, then its parts")
      self._set(config, parts, o, current, section=_is_section(schema))
      applied.append(o)
    # config_flags defines a flag per override it sees; it must not see these.
    dropped = {o.index + k for o in applied for k in range(o.tokens)}
    self.argv[:] = [a for i, a in enumerate(self.argv) if i not in dropped]

  def _ensure(self, config, reference, parts: Tuple, o: _Override):
    """(the value at `parts`, the reference's there or _MISSING), first creating the value from
    the reference where the config lacks it; an error for a key neither has."""
    holder, ref = config, reference
    for depth, part in enumerate(parts):
      value, ref_value = _child(holder, part), _child(ref, part) if ref is not None else _MISSING
      if value is _MISSING:
        if ref_value is _MISSING or not isinstance(holder, config_dict.ConfigDict):
          self._unknown(holder, ref, parts[:depth], part, o)
        # Only the keys given on the command line are created: the others keep the file's
        # (absent) value, which their owner's defaults fill in.
        value = config_dict.ConfigDict() if _is_section(ref_value) else copy.deepcopy(ref_value)
        holder[part] = value
      holder, ref = value, (None if ref_value is _MISSING else ref_value)
    return holder, ref_value

  def _unknown(self, holder, ref, prefix, part, o: _Override):
    where = ".".join([self.name, *map(str, prefix)])
    if not _is_section(holder):
      raise ConfigError(f"--{self.name}.{o.path}: {where} is a {type(holder).__name__}, not a "
                        f"section with keys; set it whole, e.g. --{where}='...'")
    allowed = set(holder) | (set(ref) if _is_section(ref) else set())
    raise ConfigError(settings_lib.unknown_keys_message([str(part)], allowed, where)
                      + f" (in --{self.name}.{o.path})")

  def _set(self, config, parts: Tuple, o: _Override, current, *, section: bool):
    flag = f"--{self.name}.{o.path}"
    if o.negated:
      raise ConfigError(f"--no{self.name}.{o.path}: this key takes a JSON value, not on/off")
    value = _decode(flag, o.value, current)
    if section and not (value is None or isinstance(value, Mapping)):
      raise ConfigError(f"{flag}={o.value!r}: {self.name}.{o.path} is a section; give a JSON "
                        "object, e.g. {\"name\": ...}")
    holder = config
    for part in parts[:-1]:
      holder = _child(holder, part)
    if isinstance(holder, config_dict.ConfigDict):
      # A structured key changes kind (one reducer dict, a list of them, None) as it pleases.
      with holder.ignore_type():
        holder[parts[-1]] = value
    else:
      holder[parts[-1]] = value
    name = f"{self.name}.{o.path}"
    if name not in self.flag_values:
      flags.DEFINE_flag(_AppliedFlag(name, f"{self.name}'s {o.path}, as JSON"), self.flag_values)
    self.flag_values[name].decoded[o.value] = value


class _AppliedParser(flags.ArgumentParser):

  def __init__(self, decoded):
    self.decoded = decoded

  def parse(self, argument):
    return self.decoded.get(argument, argument)


class _AppliedFlag(flags.Flag):
  """A structured override, already applied to the config when it was loaded: absl parses the
  argument again only to accept it (and keep its value for `FLAGS[name].value`)."""

  def __init__(self, name: str, help_string: str):
    self.decoded = {}
    super().__init__(_AppliedParser(self.decoded), flags.ArgumentSerializer(), name, None,
                     help_string)


def DEFINE_config_file(name: str, help_string: str, *,  # pylint: disable=invalid-name
                       reference: Optional[Callable[[], Any]] = None,
                       flag_values: flags.FlagValues = FLAGS) -> flags.FlagHolder:
  """config_flags.DEFINE_config_file (locked) whose overrides also take structured values and may
  set the keys of `reference()` the file left out. Parse with `parse` (as `run` does)."""
  argv: List[str] = []  # filled by `parse` before each parse
  holder = config_flags.DEFINE_config_file(name, None, help_string, flag_values=flag_values,
                                           lock_config=False, sys_argv=argv)
  flag_values[name].parser = _ConfigFileParser(name, flag_values, argv, reference)
  return holder


def parse(argv: Sequence[str], flag_values: flags.FlagValues = FLAGS, *,
          known_only: bool = False) -> List[str]:
  """flag_values(argv), the command line first handed to the config flags of DEFINE_config_file;
  the arguments left over (argv[0] first)."""
  argv = flag_values.read_flags_from_files(list(argv), force_gnu=False)
  for name in list(flag_values):
    parser = flag_values[name].parser
    if isinstance(parser, _ConfigFileParser) and name == parser.name:
      parser.argv[:] = argv
  try:
    return flag_values(argv, known_only=known_only)
  except flags.Error as e:
    # absl re-raises a flag parser's ValueError as a flag error of its own; a user error
    # reaches the caller as it was raised, with its type, message and cause.
    if not isinstance(e.__context__, UserError):
      raise
    error = e.__context__
  raise error


def load_config(argv: Sequence[str], *, name: str = "config",
                reference: Optional[Callable[[], Any]] = None):
  """The config a command line gives (`["prog", "--config=configs/x.py:arg",
  "--config.key=value", ...]`), read as the tools read it; other flags are ignored."""
  flag_values = flags.FlagValues()
  holder = DEFINE_config_file(name, "config file", reference=reference, flag_values=flag_values)
  parse(argv, flag_values, known_only=True)
  return holder.value


def _verbose(argv: Sequence[str]) -> bool:
  """Whether --verbosity (-v) >= 1 was asked for, parsed or not (parsing may have failed)."""
  if "verbosity" in FLAGS and FLAGS["verbosity"].present:
    return FLAGS.verbosity >= 1
  verbose = False
  for i, arg in enumerate(argv):  # the last one given counts, as in absl
    m = re.match(r"--?(verbosity|v)(=(.*))?$", arg)
    if m:
      value = m[3] if m[2] else (argv[i + 1] if i + 1 < len(argv) else "")
      verbose = value.strip().lstrip("-").isdigit() and int(value) >= 1
  return verbose


def _fail(message: str, hint: str = ""):
  sys.stderr.write(f"error: {message}\n{hint}")
  sys.stderr.flush()
  sys.exit(1)


def _parse_or_exit(argv: Sequence[str]) -> List[str]:
  try:
    return parse(argv)
  except UserError as e:
    if _verbose(argv):
      raise
    _fail(str(e))
  except flags.Error as e:
    if _verbose(argv):
      raise
    _fail(str(e), "Pass --helpshort or --helpfull to see help on flags.\n")


def run(main: Callable[[List[str]], Any]):
  """app.run(main), with user errors printed as one message (see the module doc)."""
  argv = list(sys.argv)

  def reporting_main(args):
    # Read now: main may change the verbosity (quieting libraries sets absl's).
    verbose = _verbose(argv)
    try:
      return main(args)
    except UserError as e:
      if verbose:
        raise
      _fail(str(e))

  app.run(reporting_main, flags_parser=_parse_or_exit)
