"""Shared CLI plumbing for train, evaluate, chat and export.

- :func:`run_cli`: user errors print one line (``error: ...``) on stderr and exit 2, never a
  traceback.
- :func:`parse`: tyro over a frozen dataclass, plus ``--config FILE.yaml|json`` (a saved
  config, a run's ``config.json`` included) whose values the flags override; tyro's own parse
  errors (a bad enum value, a non-number) become one line too; every numeric field is checked
  (:class:`Range` bounds, floats finite) before anything runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import json
import logging
import math
import os
import re
import sys
import threading
import types
import typing
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union

T = TypeVar("T")


class UsageError(ValueError):
    """Bad command-line input; the message names the flag, field, file or line."""


class HostSetupError(RuntimeError):
    """The host lacks what a command needs (e.g. user namespaces for the OS sandbox); the
    message says what and how to fix it."""


# Errors caused by the user's input (files, configs, flags); anything else is our bug.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    HostSetupError,
)
# Filesystem conditions the user fixes (space, quota, permissions, a read-only mount).
USER_OS_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
)
# How an out-of-space / unwritable filesystem reads in a tensorstore (orbax) error message.
_STORAGE_FAILURES = (
    "No space left on device",
    "Disk quota exceeded",
    "Read-only file system",
    "Permission denied",
    "File too large",
)


def storage_failure(e: BaseException) -> str | None:
    """The filesystem condition behind a failed write (e.g. "No space left on device"), or
    None when `e` is not one."""
    if isinstance(e, OSError):
        return e.strerror if e.errno in USER_OS_ERRNOS else None
    if not isinstance(e, ValueError):
        return None
    text = str(e)
    return next((f for f in _STORAGE_FAILURES if f in text), None)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # A warning about the user's data (e.g. an AgentBench item run on an empty table) is one
    # line, without the source line Python's default format appends.
    print(f"warning: {' '.join(str(message).split())}", file=file or sys.stderr)


def _quiet_thread_disk_errors(args: Any, _default: Callable = threading.excepthook) -> None:
    # A background writer (orbax's, TensorBoard's) hitting a full or read-only disk: the main
    # thread reports the same condition as one `error:` line, so no thread traceback. orbax's
    # writers raise tensorstore's ValueError ("RESOURCE_EXHAUSTED ... No space left") too.
    if storage_failure(args.exc_value) is not None:
        return
    _default(args)


class _DropStorageFailureLogs(logging.Filter):
    """orbax's writer threads log a full or read-only disk with tracebacks (absl, asyncio) while
    the save fails; the main thread reports it as one `error:` line, so these records go."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and storage_failure(exc) is not None:
            return False
        text = record.getMessage()
        return not any(f in text for f in _STORAGE_FAILURES)


def _quiet_closed_loop_callbacks(args: Any, _default: Callable = sys.unraisablehook) -> None:
    # tensorstore completes orbax's abandoned write futures onto an event loop orbax already
    # closed (after a failed save, at exit); Python reports each as "Exception ignored". Nothing
    # is lost there: the save's own outcome is what the run reports.
    exc = args.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
        return
    _default(args)


def run_cli(main: Callable[[], T]) -> T:
    import warnings

    warnings.showwarning = _one_line_warning
    threading.excepthook = _quiet_thread_disk_errors
    sys.unraisablehook = _quiet_closed_loop_callbacks
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(_DropStorageFailureLogs())
    try:
        return main()
    except USER_ERRORS as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
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


# ----------------------------------------------------------------------------- shared flag types

# The attention kernels cmat_jax.model.attention dispatches on (ModelConfig checks the same set).
AttentionImpl = Literal["auto", "xla", "cudnn", "pallas", "chunked"]
Dtype = Literal["bfloat16", "float32"]


@dataclasses.dataclass(frozen=True)
class Range:
    """Bounds of a numeric field, as ``Annotated[int, Range(ge=0)]`` (None = unbounded)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None

    def check(self, flag: str, value: float) -> None:
        if self.ge is not None and not value >= self.ge:
            raise UsageError(f"{flag} must be >= {self.ge:g}, got {value}")
        if self.gt is not None and not value > self.gt:
            raise UsageError(f"{flag} must be > {self.gt:g}, got {value}")
        if self.le is not None and not value <= self.le:
            raise UsageError(f"{flag} must be <= {self.le:g}, got {value}")


NonNegInt = Annotated[int, Range(ge=0)]
PosInt = Annotated[int, Range(ge=1)]
NonNegFloat = Annotated[float, Range(ge=0)]
PosFloat = Annotated[float, Range(gt=0)]


def _flag(prefix: str, name: str) -> str:
    return "--" + (prefix + name).replace("_", "-")


def check_fields(obj: Any, prefix: str = "") -> None:
    """Check every field of dataclass ``obj`` (recursively): ``Range`` bounds, and every float
    finite (a NaN learning rate or an infinite limit is a mistake, never a setting)."""
    hints = typing.get_type_hints(type(obj), include_extras=True)
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        flag = _flag(prefix, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_fields(value, prefix + f.name + ".")
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"{flag} must be a finite number, got {value}")
        hint = hints.get(f.name)
        for meta in _annotations(hint):
            if isinstance(meta, Range):
                meta.check(flag, value)


def _annotations(hint: Any) -> list[Any]:
    """Annotated metadata of ``hint`` and of the members of a union (``Annotated[int, ..] | None``)."""
    if typing.get_origin(hint) is Annotated:
        return list(hint.__metadata__)
    if typing.get_origin(hint) in (Union, types.UnionType):
        return [m for a in typing.get_args(hint) for m in _annotations(a)]
    return []


# ----------------------------------------------------------------------------- config files

# Keys a run's config.json records beside the job's own fields (see cmat_jax.train).
RUN_CONFIG_METADATA = ("job", "slot")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON mapping; errors name the file (and line)."""
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"--config: {p}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--config: {p}: unreadable ({e})") from None
    if p.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
            raise UsageError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    elif p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"{p}:{e.lineno}: invalid JSON ({e.msg})") from None
    else:
        raise UsageError(f"--config: {p}: expected a .yaml, .yml or .json file")
    if not isinstance(data, dict):
        raise UsageError(f"{p}: expected a mapping of field names to values")
    return data


def from_dict(
    kind: type[T], data: dict[str, Any], *, where: str, base: T | None = None,
    ignore: Collection[str] = (),
) -> T:  # fmt: skip
    """An instance of dataclass ``kind`` with the fields in ``data`` over ``base`` (default:
    ``kind``'s defaults; a field without one and not in ``data`` stays tyro.MISSING, so tyro
    asks for it). Unknown keys (other than ``ignore``) and ill-typed values name the file and
    field. ``__post_init__`` is not run here: tyro runs it on the final value."""
    import tyro

    hints = typing.get_type_hints(kind)
    fields = {f.name: f for f in dataclasses.fields(kind)}
    unknown = sorted(set(data) - set(fields) - set(ignore))
    if unknown:
        raise UsageError(f"{where}: unknown field {unknown[0]!r} (not a setting of this command)")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        if base is not None:
            values[name] = getattr(base, name)
        elif f.default is not dataclasses.MISSING:
            values[name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            values[name] = f.default_factory()
        else:
            values[name] = tyro.MISSING
        if name in data:
            values[name] = _convert(
                data[name], hints[name], f"{where}: field {name!r}", values[name]
            )
    obj = object.__new__(kind)
    for name, v in values.items():
        object.__setattr__(obj, name, v)
    return obj


def _convert(value: Any, hint: Any, where: str, current: Any = None) -> Any:
    """``value`` (parsed JSON/YAML) as type ``hint``; raises UsageError naming ``where``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        return _convert(value, args[0], where, current)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, where, current)
            except UsageError:
                pass
        raise UsageError(f"{where}: {value!r} is not a valid {_type_name(hint)}")
    if origin is Literal:
        if value not in args:
            raise UsageError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (tuple, list, Sequence) or hint in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise UsageError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return tuple(_convert(v, item, where) for v in value)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise UsageError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(hint, value, where=where, base=current)
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise UsageError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint in (str, Path):
        if not isinstance(value, str):
            raise UsageError(f"{where}: expected a string, got {value!r}")
        return hint(value)
    return value


def _type_name(hint: Any) -> str:
    return re.sub(r"typing\.|<class '([^']+)'>", r"\1", str(hint))


# ----------------------------------------------------------------------------- parsing

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_BOX = "│╭╮╰╯─┃━┏┓┗┛ "


def _one_line(rendered: str) -> str:
    """tyro's boxed error as one line: the box's title and first paragraph."""
    lines = [_ANSI.sub("", x).strip().strip(_BOX) for x in rendered.splitlines()]
    lines = [x.strip() for x in lines]
    head = [x for x in lines if x]
    if not head:
        return "invalid arguments"
    title, body = head[0], []
    for x in lines[lines.index(head[0]) + 1 :]:
        if not x or set(x) <= set(_BOX):
            if body:
                break
            continue
        body.append(x)
    text = " ".join(" ".join(body).split())
    return text or title


def flag_value(argv: Sequence[str], flag: str) -> str | None:
    """The value of ``flag`` in ``argv`` (``--flag V`` or ``--flag=V``), the last one wins."""
    found = None
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            found = argv[i + 1]
        elif a.startswith(flag + "="):
            found = a.split("=", 1)[1]
    return found


def parse(
    kind: type[T],
    argv: Sequence[str] | None = None,
    *,
    prog: str,
    description: str | None = None,
    default: T | None = None,
    config_ignore: Collection[str] = RUN_CONFIG_METADATA,
) -> T:
    """Parse ``argv`` into ``kind``: ``default`` (or ``kind``'s defaults), then the fields of
    ``--config FILE`` when given, then the flags; checked by :func:`check_fields`. Any user
    error raises :class:`UsageError` (one line) instead of printing tyro's box."""
    import tyro

    argv = list(sys.argv[1:] if argv is None else argv)
    config = flag_value(argv, "--config")
    start: Any = default
    if config is not None and config != "None":
        start = from_dict(
            kind, read_config_file(config), where=str(config), base=default, ignore=config_ignore
        )
    if start is None:
        start = from_dict(kind, {}, where=prog)

    config_help = (
        "Load settings from this YAML or JSON file (e.g. a run's config.json); flags given "
        "beside it override its values."
    )
    with_config = dataclasses.make_dataclass(
        "Args",
        [
            ("config", Annotated[str | None, tyro.conf.arg(help=config_help)], None),
            (
                "args",
                Annotated[kind, tyro.conf.arg(name="")],
                dataclasses.field(default_factory=lambda: start),
            ),
        ],
        frozen=True,
    )

    err = io.StringIO()
    old_columns = os.environ.get("COLUMNS")
    if not {"-h", "--help"} & set(argv):
        os.environ["COLUMNS"] = "1000"  # tyro wraps its error messages to the terminal width
    try:
        with contextlib.redirect_stderr(err):
            parsed = tyro.cli(with_config, args=argv, prog=prog, description=description)
    except SystemExit as e:
        if e.code in (0, None):
            raise
        raise UsageError(_one_line(err.getvalue())) from None
    finally:
        if old_columns is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old_columns
    check_fields(parsed.args)
    return parsed.args
