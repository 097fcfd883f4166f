"""The one base class of the errors a user can fix: entry points print them as one line, no traceback."""

import os
import signal
import sys
from typing import NoReturn


class UserError(Exception):
    """A mistake in the config, data, checkpoints or command line, or a run that cannot go on; the message
    names the key, file or constraint and says what to do."""


# The exit code of an entry point stopped by a UserError that only the user can fix (a config, data or checkpoint
# mistake): torchrun does not restart a run stopped by it (megassm/torchrun.py).
USER_ERROR_EXIT = 2


def exit_on_user_error(tool: str, message: str) -> NoReturn:
    """An entry point stopped by a user's mistake: one line on stderr in argparse's form ("prepare_data.py: error: ..."
    for tool = its __file__), no traceback, USER_ERROR_EXIT."""
    print(f"{os.path.basename(tool)}: error: {message}", file=sys.stderr)
    sys.exit(USER_ERROR_EXIT)


TRAINER_PROGRAM = "megassm-train"  # the trainer's console script, the name its lines start with
ENTRY_MODULES = ("megassm.train", "megassm.torchrun")  # run by `python -m`, under torchrun too
STOPPED_WHILE_STARTING = "stopped by SIGINT while starting, before the first step; run the same command to start again"


def quiet_interrupt_while_importing() -> None:
    """Ctrl-C while an entry point still imports torch (its first seconds) ends it with one line from rank 0, as later
    in its start, not with a traceback per process (the import happens before any `try` of its own). Only for the
    entry points, until their own code runs (imports_done): a user's own script keeps Python's handling."""
    argv = getattr(sys, "orig_argv", [])
    locating = sys.argv[0] == "-m" and "-m" in argv[:-1]  # Python imports the package of the module `-m` runs
    if not (locating and argv[argv.index("-m") + 1] in ENTRY_MODULES) and not sys.argv[0].endswith(TRAINER_PROGRAM):
        return
    default = sys.excepthook

    def hook(kind: type[BaseException], error: BaseException, traceback) -> None:
        if not issubclass(kind, KeyboardInterrupt):
            return default(kind, error, traceback)
        if os.environ.get("RANK", "0") == "0":
            print(f"{TRAINER_PROGRAM}: {STOPPED_WHILE_STARTING}", file=sys.stderr, flush=True)
        os._exit(128 + signal.SIGINT)  # Python ends an unhandled KeyboardInterrupt by SIGINT, whatever its hook says

    hook.previous = default
    sys.excepthook = hook


def imports_done() -> None:
    """An entry point's own code runs and handles Ctrl-C itself: the hook of quiet_interrupt_while_importing goes."""
    sys.excepthook = getattr(sys.excepthook, "previous", sys.excepthook)
