"""Data parallelism on JAX's runtime: global batches, several devices in one process, and several
processes joined by jax.distributed (two CPU processes on 127.0.0.1, gloo collectives)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

from common.parallel import batch_sharding, data_mesh, global_batch, in_process_collectives, local_rows, to_host
from common.checkpoint import Checkpoints
from tests.conftest import ROOT, slow
from tests.test_cnn import tiny_splits
from tests.test_p2g import synthetic_pairs


def test_a_global_batch_is_the_host_batch_split_along_data():
    mesh = data_mesh(jax.devices()[:2])
    sharding = batch_sharding(mesh)
    assert local_rows(sharding, 8) == slice(0, 8)  # one process holds every row
    batch = {"x": np.arange(24).reshape(8, 3), "y": np.arange(8)}
    arrays = global_batch(sharding, batch)
    for name, array in arrays.items():
        np.testing.assert_array_equal(to_host(array), batch[name])
        assert [shard.data.shape[0] for shard in array.addressable_shards] == [4, 4]
    assert in_process_collectives(mesh) and not in_process_collectives(data_mesh(jax.devices()[:1]))
    with pytest.raises(ValueError, match="cannot be split evenly"):
        local_rows(sharding, 7)


@pytest.mark.parametrize("batch_norm", [False, slow(True)], ids=["baseline", "batch norm"])
def test_a_cnn_step_on_two_devices_equals_one_device(batch_norm):
    """Dropout on, BatchNorm statistics over the global batch: splitting a batch of 16 over two
    devices changes only rounding. One step is compared: a few steps of SGD on tiny data amplify
    rounding chaotically. Conv biases feeding a BatchNorm get rounding noise only (their true
    gradient is 0) and are left out, as in test_cnn's sweep test."""
    from cnn.train import Trainer
    from common.parallel import put_replicated

    data = tiny_splits(n_train=16)
    batch = {"images": data["train_images"], "labels": data["train_labels"].astype(np.int32)}
    results = []
    for devices in (jax.devices()[:1], jax.devices()[:2]):
        trainer = Trainer(batch_norm, 0.05, 16, devices=devices)
        start = trainer.init_state()
        initial = jax.tree.map(np.asarray, start.params)
        state, loss = trainer._train_step(start, global_batch(trainer.batch_sharding, batch),
                                          put_replicated(trainer.mesh, np.int32(0)))
        results.append((initial, state, float(loss)))
    (initial, one, loss_one), (_, two, loss_two) = results
    assert loss_two == pytest.approx(loss_one, rel=1e-6)
    for (path, a), b, before in zip(jax.tree_util.tree_flatten_with_path(one.params)[0], jax.tree.leaves(two.params),
                                    jax.tree.leaves(initial)):
        name = jax.tree_util.keystr(path)
        if batch_norm and "blocks" in name and "conv" in name and "bias" in name:
            continue
        update_a, update_b = np.asarray(a) - before, np.asarray(b) - before
        ulps = 4 * np.finfo(np.float32).eps * np.abs(before).max()
        np.testing.assert_allclose(update_b, update_a, rtol=0, atol=1e-4 * np.abs(update_a).max() + ulps, err_msg=name)
    chex.assert_trees_all_close(two.stats, one.stats, rtol=1e-5, atol=1e-6)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(n: int, module: list[str], args: list[str], timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """``python -m module args`` as ``n`` processes of one run on 127.0.0.1 (one CPU device each)."""
    if n == 1:
        commands = [[sys.executable, "-m", *module, *args]]
    else:
        port = free_port()
        commands = [[sys.executable, "-m", *module, *args, "--coordinator", f"127.0.0.1:{port}",
                     "--num-processes", str(n), "--process-id", str(i)] for i in range(n)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    procs = [subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in commands]
    results = []
    for proc, command in zip(procs, commands):
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        results.append(subprocess.CompletedProcess(command, proc.returncode, out, err))
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    return results


def history(out, run: str) -> list[dict]:
    records = json.loads((out / "metrics.json").read_text())["runs"][run]["history"]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def assert_histories_close(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert y[key] == pytest.approx(x[key], rel=2e-5, abs=1e-6), key


def final_params(directory, trainer):
    checkpoints = Checkpoints(directory, read_only=True)
    state, _ = checkpoints.restore(trainer.abstract_state(), checkpoints.steps()[-1])
    checkpoints.close()
    return state.params


@pytest.mark.slow
def test_cnn_cli_two_processes_match_one_and_resume_in_one(tmp_path):
    from cnn.train import Trainer

    np.savez(tmp_path / "tiny.npz", **tiny_splits(n_train=32))
    # lr 0.01: at 0.05 the float32 reassociation of the two processes' all-reduce (7e-8 after the
    # first epoch) grows past the bound within three epochs
    common = ["--data", str(tmp_path / "tiny.npz"), "--lr", "0.01", "--quiet"]
    run_processes(1, ["experiments.cnn"], [*common, "--epochs", "3", "--out", str(tmp_path / "one")])
    two = run_processes(2, ["experiments.cnn"], [*common, "--epochs", "2", "--out", str(tmp_path / "two")])
    assert '"val_acc"' in two[0].stdout and '"val_acc"' not in two[1].stdout  # only process 0 prints the result
    # the two-process checkpoint, resumed by one process for its last epoch
    run_processes(1, ["experiments.cnn"], [*common, "--epochs", "3", "--out", str(tmp_path / "two")])
    assert_histories_close(history(tmp_path / "one", "0.01"), history(tmp_path / "two", "0.01"))
    trainer = Trainer(False, 0.01, 8)
    chex.assert_trees_all_close(final_params(tmp_path / "two" / "lr_0.01" / "ckpt", trainer),
                                final_params(tmp_path / "one" / "lr_0.01" / "ckpt", trainer), rtol=1e-4, atol=1e-6)
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["processes"] == 1 and metrics["selected"]["epoch"] is not None


@pytest.mark.slow
def test_p2g_cli_two_processes_match_one(tmp_path):
    from p2g.train import Trainer

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for name, count, seed in (("train", 128, 0), ("valid", 32, 1)):
        rows = [f"{' '.join(p.phonemes)}\t{p.spelling}" for p in synthetic_pairs(count, seed=seed)]
        (data_dir / f"{name}.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    common = ["train", "--attn", "--data-dir", str(data_dir), "--hidden", "16", "--batch-size", "32", "--epochs", "2",
              "--quiet"]
    run_processes(1, ["experiments.p2g"], [*common, "--out", str(tmp_path / "one")])
    run_processes(2, ["experiments.p2g"], [*common, "--out", str(tmp_path / "two")])
    assert_histories_close(history(tmp_path / "one", "0.003"), history(tmp_path / "two", "0.003"))
    config = json.loads((tmp_path / "one" / "metrics.json").read_text())["runs"]["0.003"]["config"]
    trainer = Trainer(len(config["src_vocab"]), len(config["tgt_vocab"]), hidden=16, attention=True,
                      batch_size=32)
    chex.assert_trees_all_close(final_params(tmp_path / "two" / "ckpt", trainer),
                                final_params(tmp_path / "one" / "ckpt", trainer), rtol=1e-4, atol=1e-6)
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["processes"] == 2


def test_jax_private_state_is_where_this_module_reads_it():
    """common.jax_private reads JAX's private distributed state and cluster detectors: fails loudly
    when a JAX release moves them (a one-process run has joined nothing; the detectors include
    SLURM's and Open MPI's and can be asked)."""
    from common import jax_private

    assert jax_private.joined() is None
    names = {env.__name__ for env in jax_private.cluster_environments()}
    assert {"SlurmCluster", "OmpiCluster"} <= names, names
    assert all(isinstance(env.is_env_present(), bool) for env in jax_private.cluster_environments()
               if env.__name__ in ("SlurmCluster", "OmpiCluster"))


def test_parallel_flags_are_checked(tmp_path, capsys):
    from experiments import cnn as cnn_cli

    for argv, expected in ((["--coordinator", "127.0.0.1:1"], "--coordinator, --num-processes and --process-id together"),
                           (["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"],
                            "--process-id must lie in 0..1")):
        with pytest.raises(SystemExit) as exc:
            cnn_cli.main([*argv, "--out", str(tmp_path)])
        assert exc.value.code == 2 and expected in capsys.readouterr().err


# The failure paths of a multi-process run: each ends every process with one line, never a
# traceback or a C++ abort, within a bounded time.


def start(module: list[str], args: list[str], port: int, num_processes: int, process_id: int, **popen):
    """``python -m module args`` as process ``process_id`` of ``num_processes`` on 127.0.0.1:``port``."""
    command = [sys.executable, "-m", *module, *args, "--coordinator", f"127.0.0.1:{port}",
               "--num-processes", str(num_processes), "--process-id", str(process_id)]
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **popen}
    return subprocess.Popen(command, cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"), text=True, **popen)


def finish(proc, timeout: float = 120) -> tuple[str, str]:
    """The output of ``proc`` once it ends; killed, and the test failed, after ``timeout`` seconds."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"{proc.args} still running after {timeout} s")


def assert_one_error_line(err: str, *parts: str) -> str:
    """``err`` holds one ``error: ...`` line with ``parts`` in it, and no traceback."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    for part in parts:
        assert part in errors[0], errors[0]
    return errors[0]


def tiny_npz(tmp_path, n_train: int = 32):
    path = tmp_path / "tiny.npz"
    if not path.exists():
        np.savez(path, **tiny_splits(n_train=n_train))
    return path


def cnn_args(tmp_path, *extra: str) -> list[str]:
    return ["--data", str(tiny_npz(tmp_path)), "--lr", "0.05", "--epochs", "2", "--quiet", "--out", str(tmp_path / "out"),
            *extra]


def test_flags_are_checked_once_by_check_process_flags():
    from common.parallel import check_process_flags

    check_process_flags(None, None, None)
    check_process_flags("127.0.0.1:1234", 2, 1)
    for flags, message in ((("127.0.0.1:1234", 2, None), "together"), (("127.0.0.1", 2, 0), "HOST:PORT"),
                           (("127.0.0.1:0", 2, 0), "HOST:PORT"), (("127.0.0.1:1234", 2, 2), r"0\.\.1")):
        with pytest.raises(ValueError, match=message):
            check_process_flags(*flags)


def test_a_taken_port_is_found_before_jax_binds_it():
    from common.parallel import check_port_free

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"port {port} on 127.0.0.1 is in use"):
            check_port_free(f"127.0.0.1:{port}")
    check_port_free(f"127.0.0.1:{port}")  # free again


def test_the_data_fingerprint_sees_values_not_identity():
    """What resume and the multi-process check compare: equal for equal values, different for
    another shape of the same bytes or another spelling."""
    from common.training import fingerprint
    from p2g.data import Pair

    images, pairs = np.arange(6).reshape(2, 3), [Pair(("a", "b"), "ab")]
    assert fingerprint(images, np.arange(2)) == fingerprint(np.arange(6).reshape(2, 3), np.arange(2))
    assert fingerprint(images) != fingerprint(np.arange(6).reshape(3, 2))
    assert fingerprint(images) != fingerprint(images.astype(np.int32 if images.dtype == np.int64 else np.int64))
    assert fingerprint([(p.phonemes, p.spelling) for p in pairs]) == fingerprint([(("a", "b"), "ab")])
    assert fingerprint([(("a", "b"), "ab")]) != fingerprint([(("a", "b"), "ba")])


@pytest.mark.slow
def test_a_process_whose_peers_never_come_stops_after_the_join_timeout(tmp_path):
    """Process 0 alone (it runs the coordinator) and process 1 alone (no coordinator to reach),
    each of its own two-process run: one line naming what to check, status 2, soon after
    --join-timeout, before JAX's own timeout aborts the process."""
    procs = [start(["experiments.cnn"], cnn_args(tmp_path, "--join-timeout", "3"), free_port(), 2, i) for i in (0, 1)]
    for proc in procs:
        _, err = finish(proc)
        assert proc.returncode == 2, err
        assert_one_error_line(err, "not all 2 processes joined within 3 s", "the same --coordinator and --num-processes")


@pytest.mark.slow
def test_ctrl_c_stops_a_process_waiting_for_its_peers(tmp_path):
    """JAX's join blocks in C++, where no signal handler runs: the join waits in a thread."""
    port = free_port()
    proc = start(["experiments.cnn"], cnn_args(tmp_path), port, 2, 0)
    deadline = time.monotonic() + 120
    while True:  # until the coordinator listens: the process waits for process 1 then
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = finish(proc, timeout=30)  # long before its 300 s join timeout
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "interrupted", err
    assert "Traceback" not in err


@pytest.mark.slow
def test_a_taken_coordinator_port_is_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        _, err = finish(start(["experiments.cnn"], cnn_args(tmp_path), port, 2, 0))
    assert_one_error_line(err, f"port {port} on 127.0.0.1 is in use")


@pytest.mark.slow
def test_processes_started_with_other_settings_all_stop_with_one_line(tmp_path):
    """Process 1 with another --epochs, then another --num-processes (with a process id that
    exists in process 0's run, so both join): each process says what differs, status 2; a run of
    two whose process 0 waits for three ends at the join timeout."""
    port = free_port()
    procs = [start(["experiments.cnn"], cnn_args(tmp_path, *extra), port, 2, i)
             for i, extra in enumerate([(), ("--epochs", "3")])]
    (_, err0), (_, err1) = finish(procs[0]), finish(procs[1])
    assert [p.returncode for p in procs] == [2, 2], err0 + err1
    assert_one_error_line(err0, "process 1 of this run started with other settings than process 0 (--epochs)")
    assert_one_error_line(err1, "this process was started with other settings than process 0 "
                                "(--epochs 3 here, 2 on process 0)")

    port = free_port()
    procs = [start(["experiments.cnn"], cnn_args(tmp_path, "--join-timeout", "5"), port, n, i) for n, i in ((2, 0), (3, 1))]
    (_, err0), (_, err1) = finish(procs[0]), finish(procs[1])
    assert [p.returncode for p in procs] == [2, 2], err0 + err1
    assert_one_error_line(err1, "--num-processes 3 here, 2 on process 0")

    port = free_port()
    procs = [start(["experiments.cnn"], cnn_args(tmp_path, "--join-timeout", "3"), port, n, i) for n, i in ((3, 0), (2, 1))]
    for proc in procs:
        _, err = finish(proc)
        assert proc.returncode == 2, err
        assert_one_error_line(err, "the same --coordinator and --num-processes")


@pytest.mark.slow
def test_a_process_with_other_data_stops_the_run(tmp_path):
    (tmp_path / "other").mkdir()
    np.savez(tmp_path / "other" / "tiny.npz", **tiny_splits(n_train=32, seed=1))
    tiny_npz(tmp_path)
    port = free_port()
    procs = [start(["experiments.cnn"], ["--data", str(path / "tiny.npz"), "--lr", "0.05", "--quiet", "--out",
                                         str(tmp_path / "out")], port, 2, i)
             for i, path in enumerate([tmp_path, tmp_path / "other"])]
    (_, err0), (_, err1) = finish(procs[0]), finish(procs[1])
    assert [p.returncode for p in procs] == [2, 2], err0 + err1
    assert_one_error_line(err0, "process 1 of this run started with other settings than process 0 (the data)")
    assert_one_error_line(err1, "other data here than on process 0")


@pytest.mark.slow
def test_a_process_that_stops_mid_training_stops_the_others_with_one_line(tmp_path):
    """Process 1 interrupted after process 0 logged an epoch: process 0 says so in one line with
    status 1 (no traceback, no abort), in far less than the coordination service's heartbeat
    timeout. Only process 0 logs (the implementation line included)."""
    args = ["--data", str(tiny_npz(tmp_path)), "--lr", "0.05", "--epochs", "1000", "--out", str(tmp_path / "out")]
    port = free_port()
    stderr = [open(tmp_path / f"stderr{i}.txt", "w+") for i in (0, 1)]
    procs = [start(["experiments.cnn"], args, port, 2, i, stderr=stderr[i]) for i in (0, 1)]
    try:
        deadline = time.monotonic() + 180
        for line in procs[0].stdout:  # up to process 0's first epoch line
            if "epoch  1/1000" in line or time.monotonic() > deadline:
                break
        assert procs[1].poll() is None and procs[0].poll() is None, [f.read() for f in stderr]
        procs[1].send_signal(signal.SIGINT)
        out1, _ = finish(procs[1], timeout=30)
        finish(procs[0], timeout=90)  # within the heartbeat timeout: it saw the lost peer
    finally:
        for proc in procs:
            proc.kill()
    err0, err1 = [(f.seek(0), f.read())[1] for f in stderr]
    assert procs[1].returncode == 130 and "interrupted" in err1
    assert procs[0].returncode == 1, err0
    assert_one_error_line(err0, "another process of this run stopped: ", "rerun every process with the same command")
    assert "implementation" not in out1 and "epoch" not in out1
