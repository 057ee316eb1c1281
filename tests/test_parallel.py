"""Data parallelism on JAX's runtime: global batches, several devices in one process, and several
processes joined by jax.distributed (two CPU processes on 127.0.0.1, gloo collectives)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

from common.parallel import batch_sharding, data_mesh, global_batch, in_process_collectives, local_rows, to_host
from experiments._checkpoint import Checkpoints
from tests.conftest import ROOT
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


@pytest.mark.parametrize("batch_norm", [False, True], ids=["baseline", "batch norm"])
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
    state, _ = checkpoints.restore(trainer.abstract_state())
    checkpoints.close()
    return state.params


@pytest.mark.slow
def test_cnn_cli_two_processes_match_one_and_resume_in_one(tmp_path):
    from cnn.train import Trainer

    np.savez(tmp_path / "tiny.npz", **tiny_splits(n_train=32))
    common = ["--data", str(tmp_path / "tiny.npz"), "--lr", "0.05", "--quiet"]
    run_processes(1, ["experiments.cnn"], [*common, "--epochs", "3", "--out", str(tmp_path / "one")])
    two = run_processes(2, ["experiments.cnn"], [*common, "--epochs", "2", "--out", str(tmp_path / "two")])
    assert '"val_acc"' in two[0].stdout and '"val_acc"' not in two[1].stdout  # only process 0 prints the result
    # the two-process checkpoint, resumed by one process for its last epoch
    run_processes(1, ["experiments.cnn"], [*common, "--epochs", "3", "--out", str(tmp_path / "two")])
    assert_histories_close(history(tmp_path / "one", "0.05"), history(tmp_path / "two", "0.05"))
    trainer = Trainer(False, 0.05, 8)
    chex.assert_trees_all_close(final_params(tmp_path / "two" / "lr_0.05" / "ckpt", trainer),
                                final_params(tmp_path / "one" / "lr_0.05" / "ckpt", trainer), rtol=1e-4, atol=1e-6)
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


def test_parallel_flags_are_checked(tmp_path):
    from experiments import cnn as cnn_cli

    with pytest.raises(SystemExit) as exc:
        cnn_cli.main(["--coordinator", "127.0.0.1:1", "--out", str(tmp_path)])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        cnn_cli.main(["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"])
