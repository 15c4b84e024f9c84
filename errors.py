"""The one exception library code raises for what a user can fix (a flag, a file, the disk, a checkpoint), and
the one place that turns it into one line on stderr for the command-line scripts."""
import functools


class RunError(Exception):
    """A failure the user can act on; its message says what happened and what to do, in one line."""


def one_line_errors(main):
    """A script's main() that exits with `error: <message>` and status 1 on a RunError, never a traceback."""
    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except RunError as error:  # SystemExit prints its message on stderr and exits with status 1
            raise SystemExit(f"error: {error}") from None
    return wrapped
