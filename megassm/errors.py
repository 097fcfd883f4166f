"""The one base class of the errors a user can fix: entry points print them as one line, no traceback."""

import sys
from typing import NoReturn


class UserError(Exception):
    """A mistake in the config, data, checkpoints or command line, or a run that cannot go on; the message
    names the key, file or constraint and says what to do."""


# The exit code of an entry point stopped by a UserError that only the user can fix (a config, data or checkpoint
# mistake): torchrun does not restart a run stopped by it (megassm/torchrun.py).
USER_ERROR_EXIT = 2


def exit_on_user_error(line: str) -> NoReturn:
    """An entry point stopped by a user's mistake: the line on stderr, no traceback, USER_ERROR_EXIT."""
    print(line, file=sys.stderr)
    sys.exit(USER_ERROR_EXIT)
