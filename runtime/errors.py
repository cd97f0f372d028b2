"""User errors: a problem the user can fix is one line on stderr, not a traceback.

Imports nothing of the project and nothing heavy, so that any module can raise one."""
import sys
from typing import Any, Callable


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file, mismatched checkpoint).

    Scripts print it as one line and exit with a non-zero code (see ``run_cli``)."""


def run_cli(main: Callable[[], Any]) -> None:
    """Run a script's ``main``; a ``UserError`` becomes one line on stderr and exit 2."""
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
