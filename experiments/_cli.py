"""What every entry point shares: one-line errors, never a traceback, for user mistakes."""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path


class UserError(Exception):
    """A mistake in the user's input (missing file, malformed line, bad flag value).

    Raised anywhere below an entry point; :func:`run` prints ``error: <message>`` on one line and
    exits with status 2.
    """


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help line ends with its default: ``(default: none)`` where there is none,
    ``(default: off)`` for a switch, ``(required)`` for a required option; help that already names
    its default is left as it is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if action.required:
            return f"{text} (required)"
        if action.default is None:
            return f"{text} (default: none)"
        if action.default is False and action.nargs == 0:
            return f"{text} (default: off)"
        return f"{text} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors on one line (``prog: error: ...``, a subcommand's parser naming
    the subcommand) instead of usage + error, and every default in ``--help``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)  # a flag is its full name (--config is read before parsing)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def parse_args(self, args=None, namespace=None):
        """As argparse's, but arguments that no parser knows are reported by the subcommand's
        parser (``prog train: error: unrecognized arguments: ...``) where one was chosen."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            parser = self
            for action in self._actions:
                if isinstance(action, argparse._SubParsersAction) and getattr(parsed, action.dest, None):
                    parser = action.choices[getattr(parsed, action.dest)]
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed


# What Ctrl-C prints: a training command that has written checkpoints says how to resume.
_interrupted = {"message": "interrupted"}


def resumable_from(directory) -> None:
    """From now on, Ctrl-C says that rerunning the same command (on every process of a
    multi-process run) resumes from ``directory``."""
    import jax

    who = "every process with the same command" if jax.process_count() > 1 else "the same command"
    _interrupted["message"] = f"interrupted: rerun {who} to resume from the checkpoints in {directory}"


def _flush_std_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, RuntimeError):  # a closed pipe, or a write this interrupted
            pass


def _end(status: int, hard: bool):
    """Exit with ``status``; ``hard``: flush and end the process at once (``os._exit``), skipping the
    interpreter's shutdown, where threads still running (XLA's, orbax's event loop, tqdm's
    monitor) crashed it or printed tracebacks after the one line."""
    if not hard:
        sys.exit(status)
    _flush_std_streams()
    os._exit(status)


def _on_sigint(signum, frame) -> None:
    """Ctrl-C in a command-line process: the one line, then the process ends at once. Raising
    KeyboardInterrupt instead lost it where it landed in a garbage-collection callback, and
    unwinding through XLA and orbax crashed the interpreter's shutdown. Ending here is what a
    kill at that moment does, which the checkpoints are made to survive."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _flush_std_streams()
    try:
        clear = "\r\033[K" if os.isatty(2) else ""  # the line a progress bar may have left
        os.write(2, f"{clear}{_interrupted['message']}\n".encode())
    except OSError:  # stderr closed: the status says it
        pass
    os._exit(130)


def run(
    main: Callable[[Sequence[str] | None], int | None],
    argv: Sequence[str] | None = None,
    user_errors: tuple[type[Exception], ...] = (),
    hints: dict[type[Exception], str] | None = None,
) -> None:
    """Call ``main(argv)`` and exit with its status; user errors (:class:`UserError` and the
    library's own data errors in ``user_errors``) and Ctrl-C become one line (status 2 and 130);
    ``hints`` adds, to an error of one of its types, what to do about it (the flags to use).

    With ``argv`` None (the process's own command line) Ctrl-C and errors end the process without
    the interpreter's shutdown (:func:`_on_sigint`, :func:`_end`); with an explicit ``argv`` (a
    caller in the same process, a test) they raise ``SystemExit`` as usual."""
    from experiments._parallel import lost_process_hook

    from common.checkpoint import quiet_failed_reads

    hard = argv is None
    quiet_failed_reads()
    if hard:  # the process-wide hooks: Ctrl-C, and a lost peer of a multi-process run
        signal.signal(signal.SIGINT, _on_sigint)
        sys.excepthook = lost_process_hook(sys.excepthook)
    try:
        status = main(argv)
    except KeyboardInterrupt:
        print(_interrupted["message"], file=sys.stderr)
        _end(130, hard)
    except (UserError, *user_errors) as err:
        hint = next((text for kind, text in (hints or {}).items() if isinstance(err, kind)), None)
        print(f"error: {err}" + (f"; {hint}" if hint else ""), file=sys.stderr)
        _end(2, hard)
    except OSError as err:  # unreadable or unwritable paths (a file where --out wants a folder, ...)
        print(f"error: {err.strerror or err}: {err.filename or ''}".rstrip(": "), file=sys.stderr)
        _end(2, hard)
    if hard:  # the work is done: a Ctrl-C during the interpreter's shutdown must not turn it into a kill
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(status or 0)


def checkpoint_hints() -> dict[type[Exception], str]:
    """What the training commands add to a checkpoint error's line: the flags that get past it."""
    from common.checkpoint import EarlierLayout, FolderInUse, NoReadableStep
    from common.training import MoreEpochs, OtherRun

    return {FolderInUse: "wait for it to end or choose another --out", EarlierLayout: "train into a new --out",
            NoReadableStep: "train into another --out (or remove the folder to start afresh)",
            MoreEpochs: "choose another --out or at least as many --epochs", OtherRun: "choose another --out"}


def warn(message: str) -> None:
    """A warning about the data or the run (malformed lines skipped, a checkpoint that cannot be
    rebuilt): to stderr, also under ``--quiet``."""
    print(message, file=sys.stderr, flush=True)


def write_json(path: str | Path, value, **kwargs) -> None:
    """Write ``value`` as strict JSON (:func:`strict_json`) to ``path`` atomically: a temporary file
    in the same folder, flushed to disk, then renamed over ``path``, so that a run killed while
    writing leaves the old file or the new one, never a truncated one."""
    path = Path(path)
    text = strict_json(value, **kwargs)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")  # the umask's mode, unlike mkstemp
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_json(path: str | Path, what: str):
    """The JSON value in ``path``; a missing, unreadable or malformed file is a one-line
    :class:`UserError` naming ``what`` the file should be."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such file (expected {what})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: not readable JSON ({err}); expected {what}") from None


def number(kind: type, test: Callable[[float], bool], rule: str, name: str) -> Callable[[str], float]:
    """An argparse ``type``: the text as ``kind`` (int or float) where ``test`` holds for it, else
    argparse's one-line error saying ``rule`` ("must be ...")."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"{rule}, got {text}")
        return value

    parse.__name__ = name  # argparse names the type in its messages
    return parse


SEED_LIMIT = 2**32  # what jax.random.key, NumPy and Python's random all take
positive_float = number(float, lambda v: math.isfinite(v) and v > 0, "must be a finite number > 0", "positive_float")
unit_interval = number(float, lambda v: 0.0 <= v <= 1.0, "must lie in [0, 1]", "unit_interval")
probability = number(float, lambda v: 0.0 < v <= 1.0, "must lie in (0, 1]", "probability")  # a nucleus mass
dropout_rate = number(float, lambda v: 0.0 <= v < 1.0, "must lie in [0, 1)", "dropout_rate")  # 1 trains nothing
fraction = number(float, lambda v: 0.0 <= v < 1.0, "must lie in [0, 1)", "fraction")
non_negative_float = number(float, lambda v: math.isfinite(v) and v >= 0, "must be a finite number >= 0",
                            "non_negative_float")
positive_int = number(int, lambda v: v > 0, "must be a positive integer", "positive_int")
non_negative_int = number(int, lambda v: v >= 0, "must be an integer >= 0", "non_negative_int")
seed = number(int, lambda v: 0 <= v < SEED_LIMIT, "must be an integer in [0, 2**32)", "seed")


def folder(text: str) -> Path:
    """An output folder: one that exists, or a path where none does yet (not a file)."""
    path = Path(text)
    blocked = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise argparse.ArgumentTypeError(f"{blocked} is a file, expected a folder (or a path where none exists yet)")
    return path


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


def logger(quiet: bool):
    """``print`` with flush, or nothing with ``--quiet``."""
    return (lambda message: None) if quiet else (lambda message: print(message, flush=True))
