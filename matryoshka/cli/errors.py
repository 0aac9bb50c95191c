"""The rule of the command line: a user's mistake is one line on stderr and exit status 2.

Exit statuses: 0 done, 2 a problem with the input or the environment (bad config or value,
missing or unreadable file, full disk, refused checkpoint), 130 interrupted (Ctrl-C), 1 an
internal failure: a bug, the only case that prints a traceback.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable


class UserError(Exception):
    """A problem with the user's input: printed as one clear line, exit status 2."""


USER_ERROR, INTERNAL_ERROR, INTERRUPTED = 2, 1, 130


def _user_errors() -> tuple[type[BaseException], ...]:
    from ..checkpoints import CheckpointError
    from ..data import EmptyDatasetError

    # ValueError covers ConfigError, EvaluationError, DataConfigError and the ml-mdm converter's errors;
    # OSError covers missing files, permissions, full disks and files where folders belong.
    return (UserError, ValueError, OSError, CheckpointError, EmptyDatasetError, ImportError)


def one_line(error: BaseException) -> str:
    """The message without PyTorch's advice to unpickle untrusted files (never give users that advice)."""
    text = str(error) or type(error).__name__
    kept = [
        line for line in text.splitlines() if "weights_only=False" not in line and "weights_only` argument" not in line
    ]
    return "\n".join(kept).strip() or type(error).__name__


def run_command(name: str, command: Callable[[], int]) -> int:
    """Run one ``mdm`` command under the rule above."""
    try:
        return command()
    except KeyboardInterrupt:
        print(f"\nmdm {name}: interrupted; what was written so far is kept", file=sys.stderr)
        return INTERRUPTED
    except _user_errors() as error:
        sys.stdout.flush()  # progress bars are closed by now: the error starts on a line of its own
        print(f"mdm {name}: error: {one_line(error)}", file=sys.stderr)
        return USER_ERROR
    except Exception:
        traceback.print_exc()
        print(
            f"mdm {name}: internal error (a bug in matryoshka; please report it with the traceback above)",
            file=sys.stderr,
        )
        return INTERNAL_ERROR
