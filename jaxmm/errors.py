"""User-facing errors. The CLI prints them as one line and exits non-zero."""


class JaxmmError(Exception):
  """Base class: bad input from the user (file, config, argument), never a bug."""


class ConfigError(JaxmmError):
  """A config is malformed, or holds a key that changes the math and is not handled."""


class ConversionError(JaxmmError):
  """A checkpoint cannot be converted: missing/extra/misshapen tensor, corrupt file."""


class InputError(JaxmmError):
  """Bad model inputs: shapes, image size, token counts, schedules."""
