"""What every entry point shares: one-line errors, never a traceback, for user mistakes."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence


class UserError(Exception):
    """A mistake in the user's input (missing file, malformed line, bad flag value).

    Raised anywhere below an entry point; :func:`run` prints ``error: <message>`` on one line and
    exits with status 2.
    """


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors on one line (``prog: error: ...``) instead of usage + error."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# What Ctrl-C prints: a training command that has written checkpoints says how to resume.
_interrupted = {"message": "interrupted"}


def resumable_from(directory) -> None:
    """From now on, Ctrl-C says that rerunning the same command resumes from ``directory``."""
    _interrupted["message"] = f"interrupted: rerun the same command to resume from the checkpoints in {directory}"


def run(
    main: Callable[[Sequence[str] | None], int | None],
    argv: Sequence[str] | None = None,
    user_errors: tuple[type[Exception], ...] = (),
) -> None:
    """Call ``main(argv)`` and exit with its status; user errors (:class:`UserError` and the
    library's own data errors in ``user_errors``) and Ctrl-C become one line."""
    try:
        status = main(argv)
    except (UserError, *user_errors) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:  # unreadable or unwritable paths (a file where --out wants a folder, ...)
        print(f"error: {err.strerror or err}: {err.filename or ''}".rstrip(": "), file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(_interrupted["message"], file=sys.stderr)
        sys.exit(130)
    sys.exit(status or 0)


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value




def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def probability(text: str) -> float:
    """A value in (0, 1]: a nucleus (top-p) mass."""
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {text}")
    return value


def dropout_rate(text: str) -> float:
    """A value in [0, 1): a dropout rate (1 would drop everything and train nothing)."""
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1), got {text}")
    return value


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def strict_json(value, **kwargs) -> str:
    """``json.dumps`` that any JSON reader accepts: NaN and infinities become ``null``."""
    return json.dumps(_finite(value), allow_nan=False, **kwargs)


def add_run_options(parser: argparse.ArgumentParser, kernels: str) -> None:
    """``--impl`` (the model implementation; ``kernels`` names the xla_cpu package) and ``--quiet``."""
    from experiments._xla import IMPL_CHOICES

    parser.add_argument("--impl", choices=IMPL_CHOICES, default="auto",
                        help=f"reference: Flax's own layers; xla_cpu: the kernels of {kernels}; "
                             "auto: xla_cpu on a CPU, reference on an accelerator (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="print only the final JSON line")


def logger(quiet: bool):
    """``print`` with flush, or nothing with ``--quiet``."""
    return (lambda message: None) if quiet else (lambda message: print(message, flush=True))
