"""The one base class of the errors a user can fix: entry points print them as one line, no traceback."""


class UserError(Exception):
    """A mistake in the config, data, checkpoints or command line, or a run that cannot go on; the message
    names the key, file or constraint and says what to do."""


# The exit code of an entry point stopped by a UserError that only the user can fix (a config, data or checkpoint
# mistake): torchrun does not restart a run stopped by it (megassm/torchrun.py).
USER_ERROR_EXIT = 2
