"""Errors a person can act on: one message, one non-zero exit, no traceback."""
import functools
import sys


class UserError(Exception):
    """A problem with the user's files or options; the message names the file and the fix."""


EXIT_USER_ERROR = 2


def exit_on_user_error(main):
    """Decorator for entry points: print a UserError as one line and exit with status 2."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f'error: {err}', file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
    return wrapper
