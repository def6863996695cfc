"""The errors a user causes and can fix, apart from the library's own failures.

A `UserError` carries one message that names the setting, file or input at fault and the fix;
the command-line tools print that message alone (the traceback only with --verbosity=1), while
any other exception is a bug or a library failure and keeps its traceback. Each type also
derives from the builtin a caller would catch (ValueError, FileNotFoundError, RuntimeError),
so `except ValueError` around a config still works.
"""


class UserError(Exception):
  """Something the user can fix: a config value, a path, the data, a checkpoint, an input."""


class ConfigError(UserError, ValueError):
  """A config key or value that is wrong (unknown key, bad value, settings that conflict)."""


class DataError(UserError, ValueError):
  """A dataset that cannot be found, built or read as configured."""


class MissingPathError(UserError, FileNotFoundError):
  """A path the user gave (a workdir, a checkpoint, a data folder) that does not exist."""


class CheckpointError(UserError, ValueError):
  """A checkpoint that is not there, cannot be read or does not fit the run."""


class StorageError(UserError, RuntimeError):
  """Storage that fails the run: a folder that is not writable, a full disk, no permission."""


class InputError(UserError, ValueError):
  """An input of the wrong shape or type (images, tokens, params) given to the models."""
