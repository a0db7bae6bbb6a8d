"""Shared CLI plumbing: user errors print one line and exit 2, never a traceback."""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# Errors caused by the user's input (files, configs, flags); anything else is our bug.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    PermissionError,
)
# Filesystem conditions the user fixes (space, quota, permissions, a read-only mount).
USER_OS_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
)


def run_cli(main: Callable[[], T]) -> T:
    try:
        return main()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as e:
        if e.errno not in USER_OS_ERRNOS:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
