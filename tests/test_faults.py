"""Faults a user or the machine can cause, each ending as one line, a note or a mended run.

Ctrl-C at any moment, damaged or removed checkpoints, two runs on one folder, unreadable or
out-of-range inputs and flags; tiny generated data throughout.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest

from common.training import OtherRun

from common.npz import Npz, NpzError
from experiments import _cli
from common.checkpoint import CheckpointError, Checkpoints, FolderInUse, NoReadableStep, quiet_failed_reads
from tests.conftest import ROOT, run_cli

# ----------------------------------------------------------------------------------------------
# tiny data


def tiny_intel(n_train=32, n_val=16, n_test=16, seed=0) -> dict[str, np.ndarray]:
    """Arrays in the homework's .npz layout, brightness encoding the class."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        labels = rng.integers(0, 6, n)
        out[f"{name}_images"] = (rng.integers(0, 20, (n, 48, 48, 3)) + (labels * 45)[:, None, None, None]).astype(np.uint8)
        out[f"{name}_labels"] = labels
    return out


@pytest.fixture
def intel_npz(tmp_path) -> Path:
    path = tmp_path / "intel.npz"
    np.savez(path, **tiny_intel())
    return path


PHONES = {"a": "æ", "b": "b", "c": "k", "d": "d", "e": "ɛ", "o": "oʊ", "s": "s", "t": "t"}


@pytest.fixture
def p2g_dir(tmp_path) -> Path:
    """train / valid / test TSVs of letter-by-letter 'pronunciations'."""
    rng = np.random.default_rng(0)
    words = sorted({"".join(rng.choice(list(PHONES), rng.integers(2, 7))) for _ in range(600)})[:200]
    lines = [f"{' '.join(PHONES[c] for c in w)}\t{w}\n" for w in words]
    folder = tmp_path / "p2g"
    folder.mkdir()
    for name, part in (("train", lines[:128]), ("valid", lines[128:164]), ("test", lines[164:])):
        (folder / f"{name}.tsv").write_text("".join(part), encoding="utf-8")
    return folder


def one_error_line(proc: subprocess.CompletedProcess, expected: str) -> None:
    """Exit status 2 and exactly one stderr line, ``error: ...`` containing ``expected``."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "error:" in lines[0] and expected in lines[0], proc.stderr


# ----------------------------------------------------------------------------------------------
# Ctrl-C


def interrupted(args: list[str], after_lines: int, delay: float = 0.0) -> subprocess.CompletedProcess:
    """``python -m args`` sent SIGINT (what Ctrl-C sends) once it has printed ``after_lines`` lines
    (0: ``delay`` seconds after it started, during its imports), ``delay`` seconds after that line."""
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = "".join(proc.stdout.readline() for _ in range(after_lines))
    time.sleep(delay)  # where in the work the signal lands, not a condition of the test
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, first + out, err)


@pytest.mark.slow
def test_ctrl_c_at_any_moment_is_one_line_and_status_130(intel_npz, p2g_dir, tmp_path):
    """SIGINT at several moments of each CLI (compiling, training, just after a save, between two
    checks), for the training CLIs after a line of output they printed, while work is left: every one
    ends with status 130, the one line on stderr, no traceback, no crash."""
    commands = {  # (arguments, (lines of output to wait for, then seconds))
        # verify prints its table at the end: seconds after the start instead (it runs for 15 s or more)
        "hopfield": (["experiments.hopfield", "verify"], ((0, 2.5), (0, 3.5), (0, 4.5), (0, 5.5))),
        "cnn": (["experiments.cnn", "--data", str(intel_npz), "--epochs", "60", "--batch-size", "16",
                 "--out", str(tmp_path / "cnn")], ((1, 0.0), (1, 1.0), (2, 0.0), (3, 0.3))),
        "p2g": (["experiments.p2g", "train", "--data-dir", str(p2g_dir), "--hidden", "16", "--batch-size", "32",
                 "--epochs", "60", "--out", str(tmp_path / "p2g")], ((1, 0.0), (1, 1.5), (2, 0.0), (3, 0.2))),
    }
    interrupted_runs = 0
    for name, (args, moments) in commands.items():
        for after_lines, delay in moments:
            proc = interrupted(args, after_lines, delay)
            lines = [line for line in proc.stderr.splitlines() if line.strip()]
            assert proc.returncode == 130, (name, after_lines, delay, proc.returncode, proc.stderr[-2000:])
            assert len(lines) == 1 and lines[0].startswith("interrupted"), (name, after_lines, proc.stderr[-2000:])
            assert "Traceback" not in proc.stdout + proc.stderr, (name, after_lines)
            interrupted_runs += 1
    assert interrupted_runs == 12


@pytest.mark.slow
def test_ctrl_c_while_a_cli_starts_is_one_line_and_status_130(intel_npz, tmp_path):
    """SIGINT during the imports, before the command line is parsed: the package's handler ends
    the process with the same line."""
    args = ["experiments.cnn", "--data", str(intel_npz), "--epochs", "1", "--out", str(tmp_path / "cnn")]
    for delay in (0.3, 0.7, 1.2):
        proc = interrupted(args, 0, delay)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 130 and lines == ["interrupted"], (delay, proc.returncode, proc.stderr[-2000:])


def test_ctrl_c_after_the_work_is_done_leaves_the_status_alone():
    """SIGINT while the interpreter shuts down after a finished command (here from an atexit
    hook): the process still exits 0, not killed by the signal nor reported as interrupted."""
    code = ("import atexit, os, signal\n"
            "from experiments import _cli\n"
            "atexit.register(lambda: os.kill(os.getpid(), signal.SIGINT))\n"
            "_cli.run(lambda argv: print('done'))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == "done\n" and proc.stderr == "", (proc.returncode, proc.stderr)


def test_ctrl_c_in_process_is_still_system_exit_130(capsys, monkeypatch):
    """With an explicit argv (a caller in the same process), Ctrl-C and user errors raise
    SystemExit instead of ending the process."""
    monkeypatch.setitem(_cli._interrupted, "message", "interrupted")

    def interrupt(argv):
        raise KeyboardInterrupt

    def mistake(argv):
        raise _cli.UserError("bad input")

    callers = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN under a background shell job
    for main, code, line in ((interrupt, 130, "interrupted\n"), (mistake, 2, "error: bad input\n")):
        with pytest.raises(SystemExit) as exit_info:
            _cli.run(main, [])
        assert exit_info.value.code == code and capsys.readouterr().err == line
    assert signal.getsignal(signal.SIGINT) is callers  # the caller's Ctrl-C is left alone


# ----------------------------------------------------------------------------------------------
# checkpoints: mended, locked, refused


quiet_failed_reads()  # as the command-line tools do: a failed read's leftovers stay quiet
STATE = jax.eval_shape(lambda: {"w": np.zeros(512, np.float32), "b": np.zeros(3, np.float32)})


def state_of(epoch: int) -> dict:
    return {"w": np.full(512, float(epoch), np.float32), "b": np.arange(3, dtype=np.float32) + epoch}


def train_run(directory: Path, scores: list[float]) -> None:
    """Epochs with these validation scores (higher is better), saved as the CLIs save them."""
    meta = {"history": [], "best_epoch": None}
    with Checkpoints(directory / "ckpt", lock=True) as checkpoints:
        for epoch, score in enumerate(scores):
            meta["history"].append(score)
            if meta["best_epoch"] is None or score > scores[meta["best_epoch"] - 1]:
                meta["best_epoch"] = epoch + 1
            checkpoints.save(epoch, state_of(epoch), meta, score)


def damage(step_dir: Path, how: str) -> None:
    """The ways a step is found broken: garbage manifests, arrays gone, the step folder gone."""
    import shutil

    if how == "manifest":
        for manifest in step_dir.rglob("manifest.ocdbt"):
            manifest.write_bytes(b"garbage")
    elif how == "arrays":
        shutil.rmtree(step_dir / "state")
    elif how == "removed":
        shutil.rmtree(step_dir)


def saved_meta(directory: Path) -> dict:
    """The meta of a run's newest epoch (whatever summary files the CLI writes beside it)."""
    with Checkpoints(directory / "ckpt", read_only=True) as ckpt:
        return ckpt.read_meta(ckpt.steps()[-1])


def resume(directory: Path, notes: list[str]):
    with Checkpoints(directory / "ckpt", lock=True) as checkpoints:
        return checkpoints.resume(STATE, lambda meta: None, notes.append)


def test_one_folder_keeps_the_latest_two_epochs_and_the_best(tmp_path):
    """orbax's preservation policy: the last two steps and the best (the earliest of equals)."""
    train_run(tmp_path, [0.1, 0.9, 0.5, 0.9, 0.3, 0.2])
    with Checkpoints(tmp_path / "ckpt", read_only=True) as ckpt:
        assert ckpt.steps() == [1, 4, 5] and ckpt.best_step() == 1
        state, meta = ckpt.restore(STATE, 1)
    assert float(state["w"][0]) == 1.0 and meta["best_epoch"] == 2


def test_a_step_without_a_score_is_never_the_best(tmp_path):
    """A diverged epoch (saved without a score) is kept as the latest but never selected."""
    with Checkpoints(tmp_path / "ckpt") as checkpoints:
        checkpoints.save(0, state_of(0), {"history": [None]})
        assert checkpoints.best_step() is None
        checkpoints.save(1, state_of(1), {"history": [None, 0.5]}, 0.5)
        checkpoints.save(2, state_of(2), {"history": [None, 0.5, None]})
        assert checkpoints.steps() == [1, 2] and checkpoints.best_step() == 1


def test_a_folder_of_another_run_is_refused_whole(tmp_path):
    """What the run check raises stops the resume and removes nothing (it is not an unreadable step)."""
    train_run(tmp_path, [0.1, 0.9, 0.5])

    def other_run(meta):
        raise OtherRun(tmp_path, "holds a run with other settings or data")

    with Checkpoints(tmp_path / "ckpt", lock=True) as checkpoints:
        with pytest.raises(OtherRun):
            checkpoints.resume(STATE, other_run, print)
        assert checkpoints.steps() == [1, 2]


@pytest.mark.parametrize("how", ["manifest", "arrays", "removed"])
def test_a_newer_unreadable_step_is_skipped_and_removed(tmp_path, capfd, how):
    train_run(tmp_path, [0.1, 0.9, 0.5])
    damage(tmp_path / "ckpt" / "2", how)
    notes = []
    step, state, meta = resume(tmp_path, notes)
    assert step == 1 and float(state["w"][0]) == 1.0 and len(meta["history"]) == 2
    assert how == "removed" or any("step 2" in note and "skipping" in note for note in notes)
    with Checkpoints(tmp_path / "ckpt", read_only=True) as ckpt:
        assert ckpt.steps() == [1]
    assert "Traceback" not in capfd.readouterr().err  # reads left in flight after a failed one stay quiet


def test_no_readable_step_is_a_checkpoint_error(tmp_path):
    train_run(tmp_path, [0.1, 0.9])
    for step in (0, 1):
        damage(tmp_path / "ckpt" / str(step), "manifest")
    with pytest.raises(CheckpointError, match="no readable checkpoint step"):
        resume(tmp_path, [])


def test_evaluating_a_damaged_best_is_a_checkpoint_error_and_writes_nothing(tmp_path):
    train_run(tmp_path, [0.1, 0.9, 0.5, 0.4])
    damage(tmp_path / "ckpt" / "1", "manifest")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with Checkpoints(tmp_path / "ckpt", read_only=True) as ckpt:
        with pytest.raises(CheckpointError, match="step 1 cannot be read"):
            ckpt.restore(STATE, ckpt.best_step())
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_a_damaged_metrics_file_of_a_step_is_a_checkpoint_error(tmp_path):
    """orbax reads every step's metrics when the folder opens: a damaged one is one error (and the
    folder's lock is released), not a JSON traceback."""
    train_run(tmp_path, [0.1, 0.9])
    (tmp_path / "ckpt" / "1" / "metrics" / "metrics").write_text("garbage")
    with pytest.raises(NoReadableStep, match="cannot be opened"):
        Checkpoints(tmp_path / "ckpt", lock=True)
    Checkpoints(tmp_path / "other", lock=True).close()  # the lock was released


def test_training_into_the_other_parts_out_is_refused(intel_npz, p2g_dir, tmp_path):
    from experiments import cnn as cnn_cli
    from experiments import p2g as p2g_cli

    for part, main, argv in (("p2g", cnn_cli.main, ["--data", str(intel_npz)]),
                             ("cnn", p2g_cli.main, ["train", "--data-dir", str(p2g_dir)])):
        out = tmp_path / f"{part}-out"
        out.mkdir()
        (out / "metrics.json").write_text(json.dumps({"part": part}))
        with pytest.raises(_cli.UserError, match=f"a {part.upper()} run, not a"):
            main([*argv, "--epochs", "1", "--out", str(out)])
        assert sorted(p.name for p in out.iterdir()) == ["metrics.json"]


def test_a_second_run_on_the_same_folder_is_refused_while_the_first_holds_it(tmp_path):
    first = Checkpoints(tmp_path / "run" / "ckpt", lock=True)
    with pytest.raises(FolderInUse, match="another run is using"):
        Checkpoints(tmp_path / "run" / "ckpt", lock=True)
    first.close()
    Checkpoints(tmp_path / "run" / "ckpt", lock=True).close()  # free again once the first has ended


@pytest.mark.slow
def test_ckpt_replaced_by_a_file_and_an_earlier_layout_are_one_line_errors(intel_npz, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "ckpt").write_text("not a folder")
    with pytest.raises(CheckpointError, match="a file where a checkpoint folder belongs"):
        Checkpoints(tmp_path / "a" / "ckpt")
    (tmp_path / "old" / "lr_0.01" / "best" / "0").mkdir(parents=True)  # the two-folder layout
    (tmp_path / "old" / "lr_0.01" / "ckpt" / "0").mkdir(parents=True)
    for argv in (["--out", str(tmp_path / "old"), "--epochs", "1"], ["--evaluate", str(tmp_path / "old" / "lr_0.01")],
                 ["--evaluate", str(tmp_path / "old" / "lr_0.01" / "ckpt")]):
        proc = run_cli("experiments.cnn", "--data", str(intel_npz), "--batch-size", "4", *argv)
        one_error_line(proc, "written by an earlier version")
        assert "new --out" in proc.stderr


@pytest.mark.slow
def test_p2g_test_names_a_damaged_best_and_a_rerun_trains_on(p2g_dir, tmp_path):
    """The CLI path: the best step damaged after training: p2g test says which step cannot be
    read in one line; a rerun with more epochs resumes from the newest readable step."""
    common = ["experiments.p2g", "train", "--data-dir", str(p2g_dir), "--hidden", "16", "--batch-size", "32",
              "--out", str(tmp_path / "run")]
    assert run_cli(*common, "--epochs", "2", "--quiet").returncode == 0
    best = saved_meta(tmp_path / "run")["best_epoch"]
    damage(tmp_path / "run" / "ckpt" / str(best - 1), "manifest")
    test = ["experiments.p2g", "test", "--checkpoint", str(tmp_path / "run"), "--data-dir", str(p2g_dir), "--quiet"]
    one_error_line(run_cli(*test), f"step {best - 1} cannot be read")
    proc = run_cli(*common, "--epochs", "3")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert len(saved_meta(tmp_path / "run")["history"]) == 3


@pytest.mark.slow
def test_two_runs_on_one_out_folder(p2g_dir, tmp_path):
    """A second training run on a folder another run is training into stops with one line and
    leaves the first undisturbed: it goes on to its next epoch, and after a Ctrl-C the same command
    resumes it to the end."""
    args = ["train", "--data-dir", str(p2g_dir), "--hidden", "16", "--batch-size", "32", "--epochs", "60",
            "--out", str(tmp_path / "run")]
    first = subprocess.Popen([sys.executable, "-m", "experiments.p2g", *args], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        while "epoch  1/60" not in first.stdout.readline():  # its first epoch saved: it holds the folder
            assert first.poll() is None, first.communicate()
        second = run_cli("experiments.p2g", *args, "--quiet")
        one_error_line(second, "another run is using")
        while "epoch  2/60" not in first.stdout.readline():  # and it trains on
            assert first.poll() is None, first.communicate()
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=120) == 130
    finally:
        first.kill()
    assert run_cli("experiments.p2g", *args, "--quiet").returncode == 0
    assert len(saved_meta(tmp_path / "run")["history"]) == 60


# ----------------------------------------------------------------------------------------------
# inputs


def npz_faults(folder: Path) -> dict[str, Path]:
    """One file for each way an .npz can be unreadable."""
    data = tiny_intel(8, 4, 4)
    files = {}
    files["empty"] = folder / "empty.npz"
    files["empty"].write_bytes(b"")
    files["text"] = folder / "text.npz"
    files["text"].write_text("train_images,train_labels\n")
    files["pk"] = folder / "pk.npz"
    files["pk"].write_bytes(b"PKab")  # zip's first two bytes, no archive
    files["npy"] = folder / "plain.npz"
    with open(files["npy"], "wb") as f:
        np.save(f, data["train_images"])
    files["zlib"] = folder / "compressed.npz"
    np.savez_compressed(files["zlib"], **data)
    raw = bytearray(files["zlib"].read_bytes())
    with zipfile.ZipFile(files["zlib"]) as archive:
        info = archive.getinfo("train_images.npy")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    raw[start + 100 : start + 400] = bytes(range(256)) + bytes(44)  # inside the deflated stream
    files["zlib"].write_bytes(bytes(raw))
    files["crc"] = folder / "crc.npz"
    np.savez(files["crc"], **data)
    raw = bytearray(files["crc"].read_bytes())
    at = raw.index(b"train_images.npy") + 500
    raw[at : at + 16] = bytes(16)
    files["crc"].write_bytes(bytes(raw))
    files["objects"] = folder / "objects.npz"
    np.savez(files["objects"], **dict(data, train_images=np.array([None] * 8, dtype=object)))
    return files


def test_every_unreadable_npz_is_one_npz_error(tmp_path):
    for kind, path in npz_faults(tmp_path).items():
        with pytest.raises(NpzError) as info:
            with Npz(path, "EXPECTED") as data:
                for name in data.files:
                    data[name]
        message = str(info.value)
        assert "\n" not in message and str(path) in message and message.endswith("EXPECTED"), (kind, message)
        assert "pickle" not in message or kind == "objects", (kind, message)  # numpy's guess for any non-zip file


def test_cnn_and_hopfield_loaders_turn_npz_faults_into_their_one_line_errors(tmp_path):
    from cnn.data import DataError, load_npz
    from experiments.hopfield import load_image_patterns

    for kind, path in npz_faults(tmp_path).items():
        with pytest.raises(DataError):
            load_npz(path)
        with pytest.raises(_cli.UserError):
            load_image_patterns(path, 4, None)


def test_hopfield_images_must_be_finite_pixels_and_fewer_than_asked_is_a_note(tmp_path, capsys):
    from experiments.hopfield import load_image_patterns

    images = np.random.default_rng(0).integers(0, 256, (5, 4, 4, 3)).astype(np.float32)
    for name, bad in (("nan", np.where(images > 250, np.nan, images)), ("range", images * 2.0),
                      ("negative", images - 10.0)):
        np.savez(tmp_path / f"{name}.npz", train_images=bad)
        with pytest.raises(_cli.UserError, match="expected pixel values 0..255"):
            load_image_patterns(tmp_path / f"{name}.npz", 5, None)
    np.savez(tmp_path / "ok.npz", train_images=images)
    rows, shape = load_image_patterns(tmp_path / "ok.npz", 32, None)
    assert rows.shape == (5, 48) and shape == (4, 4, 3)
    assert "holds 5 images in train_images, fewer than --patterns 32" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_input_faults_are_one_line(intel_npz, tmp_path):
    files = npz_faults(tmp_path)
    cases = [(["experiments.cnn", "--data", str(path), "--epochs", "1", "--out", str(tmp_path / "o")], "expected an .npz")
             for path in files.values()]
    cases += [(["experiments.hopfield", "retrieve", "--images", str(files[kind]), "--out", str(tmp_path / "h")],
               "cannot be read") for kind in ("crc", "objects")]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text('{"selected": {"lr": 0.0')  # cut short while written
    cases.append((["experiments.cnn", "--evaluate", str(tmp_path / "run"), "--data", str(intel_npz)], "not readable JSON"))
    (tmp_path / "ckpt_file" / "lr_0.01").mkdir(parents=True)
    (tmp_path / "ckpt_file" / "lr_0.01" / "ckpt").write_text("")
    cases.append((["experiments.cnn", "--data", str(intel_npz), "--epochs", "1", "--batch-size", "16", "--out",
                   str(tmp_path / "ckpt_file")], "a file where a checkpoint folder belongs"))
    for args, expected in cases:
        proc = run_cli(*args)
        assert "Traceback" not in proc.stderr, (args, proc.stderr)
        one_error_line(proc, expected)


def test_p2g_tsv_with_bom_is_read_and_utf16_or_nul_is_one_line(tmp_path):
    from p2g.data import DataError, read_tsv

    (tmp_path / "bom.tsv").write_bytes("\ufeffk æ t\tcat\nd ɔ g\tdog\n".encode("utf-8"))
    assert [p.spelling for p in read_tsv(tmp_path / "bom.tsv")] == ["cat", "dog"]
    assert read_tsv(tmp_path / "bom.tsv")[0].phonemes == ("k", "æ", "t")  # the mark is not a phoneme
    (tmp_path / "le.tsv").write_bytes("k æ t\tcat\n".encode("utf-16"))
    (tmp_path / "be.tsv").write_bytes("k æ t\tcat\n".encode("utf-16-be"))
    (tmp_path / "nul.tsv").write_bytes(b"k a t\tcat\nd o\x00g\tdog\n")
    for name, where in (("le", ":1: UTF-16"), ("be", ":1: NUL byte"), ("nul", ":2: NUL byte")):
        with pytest.raises(DataError, match=where) as info:
            read_tsv(tmp_path / f"{name}.tsv")
        assert "\n" not in str(info.value)


def test_plot_file_names_are_short_and_distinct():
    from experiments.p2g import plot_name

    taken = set()
    long = plot_name("é" * 300, taken)
    assert len(f"attention_{long}.png".encode()) < 255
    assert plot_name("a-b", taken) == "a_b" and plot_name("a b", taken) != "a_b"
    assert plot_name("cat", set()) == "cat"


# ----------------------------------------------------------------------------------------------
# flags and outputs


def parse_error(main, argv: list[str], capsys) -> str:
    """The one stderr line of a flag error (exit status 2), parsed before any work."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("argv, expected", [
    (["verify", "--seed", "-1"], "verify: error: argument --seed"),
    (["verify", "--seed", str(2**32)], "verify: error: argument --seed"),
    (["verify", "--beta-max", "inf"], "verify: error: argument --beta-max"),
    (["verify", "--beta-min", "10", "--beta-max", "1"], "verify: error: --beta-min"),
    (["retrieve", "--noise", "1.5"], "retrieve: error: argument --noise"),
    (["retrieve", "--noise", "nan"], "retrieve: error: argument --noise"),
    (["retrieve", "--seed", "x"], "retrieve: error: argument --seed"),
])
def test_hopfield_flag_errors(argv, expected, capsys):
    from experiments import hopfield

    assert expected in parse_error(hopfield.main, argv, capsys)


@pytest.mark.parametrize("argv, expected", [
    (["--lr", "0.01", "1e-2"], "the same learning rate twice"),
    (["--lr", "inf"], "argument --lr"),
    (["--seed", "-1"], "argument --seed"),
    (["--seed", "99999999999"], "argument --seed"),
])
def test_cnn_flag_errors(argv, expected, capsys):
    from experiments import cnn

    assert expected in parse_error(cnn.main, argv, capsys)


@pytest.mark.parametrize("argv, expected", [
    (["test", "--checkpoint", "x", "--k", "2"], "test: error: --k"),
    (["test", "--checkpoint", "x", "--topp", "0.5", "--examples", "-1"], "test: error: argument --examples"),
    (["test", "--checkpoint", "x", "--data-dir", "d", "--test-file", "f"], "test: error: --test-file and --data-dir"),
    (["test", "--checkpoint", "x", "--seed", "-1"], "test: error: argument --seed"),
    (["train", "--seed", str(2**40)], "train: error: argument --seed"),
    (["train", "--hidden", "15"], "train: error: --hidden"),
    (["train", "--hopfield-steps", "2"], "train: error: --hopfield-steps"),
    (["train", "--bogus", "1"], "train: error: unrecognized arguments: --bogus 1"),
])
def test_p2g_flag_errors_name_the_subcommand(argv, expected, capsys):
    from experiments import p2g

    assert expected in parse_error(p2g.main, argv, capsys)


def test_plot_attention_words_are_nfc_like_the_data(monkeypatch):
    from experiments import p2g

    seen = {}
    monkeypatch.setattr(p2g, "cmd_test", lambda args, log: seen.setdefault("words", args.plot_attention) and 0)
    p2g.main(["test", "--checkpoint", "x", "--quiet", "--plot-attention", "cafe\u0301"])
    assert seen["words"] == ("caf\u00e9",)


def option_lines(main, argv: list[str], capsys) -> dict[str, str]:
    """Each option of ``main(argv + ['--help'])`` -> its help text."""
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    text = capsys.readouterr().out
    options, current = {}, None
    for line in text.split("options:")[1].splitlines():
        stripped = line.strip()
        if line.startswith("  -"):  # an option; its help goes on, further indented, below
            current = stripped.split()[0].rstrip(",")
            options[current] = stripped
        elif current:
            options[current] += " " + stripped
    return options


@pytest.mark.parametrize("module, argv", [("cnn", []), ("p2g", ["train"]), ("p2g", ["test"]),
                                          ("hopfield", ["verify"]), ("hopfield", ["retrieve"])])
def test_help_gives_every_option_a_default(module, argv, capsys):
    """Every option says its default, or that it is required (and then names no default)."""
    import importlib

    main = importlib.import_module(f"experiments.{module}").main
    for option, text in option_lines(main, argv, capsys).items():
        if option == "--checkpoint" and argv == ["test"]:
            assert text.endswith("(required)") and "default" not in text, text
        elif option not in ("-h",):
            assert "default" in text, (option, text)


def test_number_flag_types():
    for kind, good, bad in ((_cli.seed, ["0", str(2**32 - 1)], ["-1", str(2**32), "1.5", "x"]),
                            (_cli.positive_float, ["1e-3", "5"], ["0", "-1", "inf", "nan", "x"]),
                            (_cli.unit_interval, ["0", "1", "0.3"], ["-0.1", "1.01", "nan", "inf"])):
        for text in good:
            kind(text)
        for text in bad:
            with pytest.raises(argparse.ArgumentTypeError):
                kind(text)


def test_json_results_are_written_atomically_and_read_with_one_line_errors(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    _cli.write_json(path, {"a": float("nan"), "b": [1, 2]})
    assert json.loads(path.read_text()) == {"a": None, "b": [1, 2]}

    def interrupted_rename(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted_rename)
    with pytest.raises(KeyboardInterrupt):
        _cli.write_json(path, {"a": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"a": None, "b": [1, 2]}  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary left
    path.write_text('{"a": 1, "b"')
    with pytest.raises(_cli.UserError, match="not readable JSON") as info:
        _cli.read_json(path, "a metrics file")
    assert "\n" not in str(info.value)


def test_warnings_reach_stderr_under_quiet(p2g_dir, capsys):
    """The malformed-line report of the data evaluated goes to stderr, --quiet or not."""
    from experiments.configs import P2GTestConfig
    from experiments.p2g import test_pairs

    with (p2g_dir / "test.tsv").open("a", encoding="utf-8") as f:
        f.write("no tab here\n")
    args = P2GTestConfig(checkpoint=Path("x"), test_file=p2g_dir / "test.tsv")
    pairs, _ = test_pairs(args, {"data": "x"}, _cli.logger(True))
    captured = capsys.readouterr()
    assert captured.out == "" and "skipped 1 malformed line(s)" in captured.err and "no tab" in captured.err


# ----------------------------------------------------------------------------------------------
# training runs: divergence, other data, a sweep killed between its members' saves


@pytest.mark.slow
def test_a_p2g_run_whose_loss_is_not_finite_stops_as_diverged(p2g_dir, tmp_path):
    out = tmp_path / "run"
    proc = run_cli("experiments.p2g", "train", "--data-dir", str(p2g_dir), "--hidden", "16", "--batch-size", "32",
                   "--epochs", "3", "--lr", "1e38", "--out", str(out))
    one_error_line(proc, "diverged")
    metrics = json.loads((out / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    run = metrics["runs"]["1e+38"]
    assert run["diverged"] is True and run["history"][-1]["train_loss"] is None and metrics["selected"] is None
    assert len(run["history"]) < 3  # stopped, not trained on


@pytest.mark.slow
def test_every_lr_diverged_still_writes_metrics(intel_npz, tmp_path):
    out = tmp_path / "run"
    proc = run_cli("experiments.cnn", "--data", str(intel_npz), "--lr", "1e6", "--epochs", "2", "--out", str(out))
    one_error_line(proc, "every learning rate diverged")
    assert json.loads((out / "metrics.json").read_text())["runs"]["1e+06"]["diverged"] is True


@pytest.mark.slow
def test_resuming_with_other_data_of_the_same_size_is_refused(tmp_path):
    from experiments import cnn as cnn_cli

    for seed in (0, 1):
        np.savez(tmp_path / f"d{seed}.npz", **tiny_intel(seed=seed))
    run = lambda data, epochs: cnn_cli.main(["--data", str(tmp_path / data), "--lr", "0.01", "--epochs", str(epochs),
                                             "--quiet", "--out", str(tmp_path / "run")])
    other_val = tiny_intel(seed=0)
    other_val["val_labels"] = (other_val["val_labels"] + 1) % 6
    np.savez(tmp_path / "other_val.npz", **other_val)
    assert run("d0.npz", 1) == 0
    with pytest.raises(OtherRun, match="other settings or data \\(train_data"):
        run("d1.npz", 2)
    with pytest.raises(OtherRun, match="other settings or data \\(val_data"):
        run("other_val.npz", 2)
    assert run("d0.npz", 2) == 0


@pytest.mark.slow
def test_p2g_resumes_from_a_copy_of_its_data_elsewhere_but_not_with_another_validation_set(p2g_dir, tmp_path):
    """The data's fingerprints decide whether a run may resume, not the folder it was read from."""
    import shutil

    from experiments import p2g as p2g_cli

    copy = tmp_path / "copy"
    shutil.copytree(p2g_dir, copy)
    run = lambda data, epochs: p2g_cli.main(["train", "--data-dir", str(data), "--hidden", "16", "--batch-size", "32",
                                             "--epochs", str(epochs), "--quiet", "--out", str(tmp_path / "run")])
    assert run(p2g_dir, 1) == 0
    assert run(copy, 2) == 0
    assert len(saved_meta(tmp_path / "run")["history"]) == 2
    lines = (copy / "valid.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    (copy / "valid.tsv").write_text("".join(lines[:-1]), encoding="utf-8")
    with pytest.raises(OtherRun, match="other settings or data \\(val_data"):
        run(copy, 3)


def test_evaluate_names_a_run_of_another_part_or_version(intel_npz, tmp_path):
    from experiments import cnn as cnn_cli

    for name, metrics, expected in (("p2g", {"part": "p2g", "selected": {"checkpoint": "runs/p2g/best"}}, "a P2G run"),
                                    ("old", {"model": "baseline", "selected": {"lr": 0.01}}, "an earlier version")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(metrics))
        with pytest.raises(_cli.UserError, match=expected):
            cnn_cli.main(["--evaluate", str(tmp_path / name), "--data", str(intel_npz), "--quiet"])
    (tmp_path / "stopped" / "lr_0.01" / "ckpt").mkdir(parents=True)  # a sweep stopped before its metrics.json
    with pytest.raises(_cli.UserError, match="no metrics.json to say which run was selected; pass one of its runs .*lr_0.01"):
        cnn_cli.main(["--evaluate", str(tmp_path / "stopped"), "--data", str(intel_npz), "--quiet"])


@pytest.mark.slow
def test_a_vmapped_sweep_killed_between_members_resumes_to_the_uninterrupted_metrics(intel_npz, tmp_path):
    """Saves of a 2-lr vmapped sweep, epoch by epoch: lr 0.05's, then lr 0.01's. A kill after the
    3rd save leaves lr 0.05 one epoch ahead; the rerun goes back to the common epoch and ends as
    the uninterrupted sweep."""
    from tests.conftest import run_killed_at_save

    common = ["--data", str(intel_npz), "--lr", "0.05", "0.01", "--vmap-sweep", "--epochs", "3", "--quiet"]
    assert run_cli("experiments.cnn", *common, "--out", str(tmp_path / "clean")).returncode == 0
    proc = run_killed_at_save(3, "after", "experiments.cnn", *common, "--out", str(tmp_path / "killed"))
    assert proc.returncode == -9, proc.stderr
    proc = run_cli("experiments.cnn", *common[:-1], "--out", str(tmp_path / "killed"))
    assert proc.returncode == 0 and "going back to epoch" in proc.stdout, proc.stdout + proc.stderr
    clean, killed = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("clean", "killed"))
    for metrics in (clean, killed):
        for run in metrics["runs"].values():
            for record in run["history"]:
                del record["seconds"]
    assert killed["runs"] == clean["runs"] and killed["test"] == clean["test"]
