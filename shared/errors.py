"""The one exception type for bad input a user can fix: a flag, a file, a data row, a launch.

The command-line apps print its message alone, once (from the main process), and exit with status 2
(:func:`tsd_common.launch.run_cli`); any other exception is a bug and keeps its traceback. It is a ``ValueError``,
so code that catches ``ValueError`` keeps working.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input, named in the message (the file, row, module or flag) with what to do about it."""


class MissingInputError(InputError, FileNotFoundError):
    """A file or directory the user named (or a default relies on) does not exist."""
