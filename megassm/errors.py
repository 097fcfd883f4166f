"""The one base class of the errors a user can fix: entry points print them as one line, no traceback."""


class UserError(Exception):
    """A mistake in the config, data, checkpoints or command line, or a run that cannot go on; the message
    names the key, file or constraint and says what to do."""
