"""The shared step loop (common.training): K steps a dispatch over training data held on the
devices, the same numbers as one step a dispatch, no recompilation after the first epoch, no
implicit transfer in an epoch, and the profiler trace."""

from __future__ import annotations

import json
import logging

import chex
import jax
import numpy as np
import pytest

from cnn import SweepTrainer, Trainer as CNNTrainer
from common.training import Trace, blocks, steps_per_call
from p2g import Trainer as P2GTrainer, Vocab, encode_pairs
from tests.conftest import slow
from tests.test_cnn import tiny_splits
from tests.test_p2g import synthetic_pairs, PHONE
from p2g import Pair


def cnn_data(n=40):
    data = tiny_splits(n_train=n)
    return data["train_images"], data["train_labels"]


def p2g_data(n=96, long_words=0):
    """Synthetic pairs (all of widths (8, 8)), with ``long_words`` of them made long enough for
    widths (16, 16): batches of two width classes."""
    pairs = synthetic_pairs(n, seed=1)
    for i in range(long_words):
        word = (pairs[i].spelling * 3)[:12]
        pairs[i] = Pair(tuple(PHONE[c] for c in word), word)
    src_vocab, tgt_vocab = Vocab.build(p.phonemes for p in pairs), Vocab.build(p.spelling for p in pairs)
    return encode_pairs(pairs, src_vocab, tgt_vocab), len(src_vocab), len(tgt_vocab)


def p2g_trainer(vocabs, K, impl="reference", dropout=0.3, bucket=16):
    return P2GTrainer(*vocabs, hidden=16, dropout=dropout, attention=True, batch_size=16, lr=0.01, impl=impl,
                      bucket=bucket, steps_per_call=K)


def train(trainer, epochs, *data):
    state, losses = trainer.init_state(), []
    for epoch in range(epochs):
        state, loss = trainer.train_epoch(state, *data, epoch)
        losses.append(loss)
    return state, losses


def test_blocks_and_the_default_steps_per_call():
    indices = np.arange(14).reshape(7, 2)
    cut = list(blocks(indices, 3))
    assert [len(b) for b in cut] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(cut), indices)
    with pytest.raises(ValueError, match="at least 1"):
        next(blocks(indices, 0))
    assert steps_per_call(None, 7, "gpu", 1) == 7 and steps_per_call(None, 7, "cpu", 2) == 2
    assert steps_per_call(100, 7, "cpu", 1) == 7 and steps_per_call(3, 7, "tpu", 1) == 3


@pytest.mark.parametrize("impl, batch_norm", [("xla_cpu", False), slow("xla_cpu", True)])
def test_cnn_k_steps_a_call_train_as_one(impl, batch_norm):
    """3 batches an epoch in blocks of 2 (2 + 1): the same losses and parameters as 1 a call, to
    float32 rounding (the scanned step may fuse differently); the second epoch compiles nothing
    and makes no implicit transfer (one trainer: its one-step program serves the last block).
    The BN variant's trajectory amplifies rounding (its head normalises 8 nearly alike examples)
    within a few steps, so it is compared after the first epoch at a small learning rate:
    parameters to 3e-4 of each
    leaf's largest entry (conv biases feeding a BatchNorm, whose gradient is rounding noise, left
    out, as in tests/test_cnn.py), its running statistics (means of activations near 0) to 1e-2."""
    images, labels = cnn_data(24)
    trainer = CNNTrainer(batch_norm, lr=0.002 if batch_norm else 0.02, batch_size=8, seed=0, impl=impl,
                         steps_per_call=1)
    one, after_one = trainer.init_state(), []
    for epoch in range(2):
        one, loss = trainer.train_epoch(one, images, labels, epoch)
        after_one.append((one, loss))
    trainer.steps_per_call = 2
    two, first = trainer.train_epoch(trainer.init_state(), images, labels, 0)
    after_two, result = [(two, first)], []
    with jax.transfer_guard("disallow"):
        compiled = compiles_during(lambda: result.append(trainer.train_epoch(two, images, labels, 1)))
    assert compiled == []
    after_two.append(result[0])
    assert int(after_one[1][0].step) == int(after_two[1][0].step) == 6
    epoch = 0 if batch_norm else 1
    (one, loss_one), (two, loss_two) = after_one[epoch], after_two[epoch]
    assert loss_two == pytest.approx(loss_one, rel=1e-4)
    from tests.test_cnn import feeds_batch_norm

    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(one.params)[0], jax.tree.leaves(two.params)):
        if not feeds_batch_norm(jax.tree_util.keystr(path)):
            a, b = np.asarray(a), np.asarray(b)
            np.testing.assert_allclose(b, a, rtol=0, atol=3e-4 * np.abs(a).max() + 1e-7, err_msg=jax.tree_util.keystr(path))
    for a, b in zip(jax.tree.leaves(one.stats), jax.tree.leaves(two.stats)):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-2 * np.abs(a).max() + 1e-7)


@pytest.mark.slow
def test_vmapped_sweep_with_k_steps_a_call_trains_as_with_one():
    images, labels = cnn_data()
    lrs = (0.05, 0.01)

    def sweep(K):
        trainer = SweepTrainer([CNNTrainer(False, lr, 8, steps_per_call=K) for lr in lrs])
        state = trainer.stack([member.init_state() for member in trainer.members])
        for epoch in range(2):
            state, losses = trainer.train_epoch(state, images, labels, epoch)
        return state, losses

    one, losses_one = sweep(1)
    three, losses_three = sweep(3)
    assert np.shape(losses_three) == (2,)
    np.testing.assert_allclose(losses_three, losses_one, rtol=1e-5)
    chex.assert_trees_all_close(three.params, one.params, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["xla_cpu", "reference"])
def test_p2g_k_steps_a_call_train_as_one(impl):
    """6 batches an epoch in blocks of 4 (4 + 2), dropout on: words of one width class, so a
    block pads no batch beyond its own widths and every mask is K = 1's."""
    data, *vocabs = p2g_data()
    one, losses_one = train(p2g_trainer(vocabs, 1, impl), 2, data)
    four, losses_four = train(p2g_trainer(vocabs, 4, impl), 2, data)
    assert int(one.step) == int(four.step) == 12
    np.testing.assert_allclose(losses_four, losses_one, rtol=1e-5)
    chex.assert_trees_all_close(four.params, one.params, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["xla_cpu", "reference"])
def test_p2g_blocks_padded_to_their_longest_words_train_as_one_without_dropout(impl):
    """Two width classes: a block pads its batches to its longest words, which without dropout
    changes nothing but rounding (padding is masked out of the model and the loss)."""
    data, *vocabs = p2g_data(long_words=20)
    from p2g.train import batch_widths

    widths = [batch_widths(data, b) for b in p2g_trainer(vocabs, 1).epoch_batches(data, 0)]
    assert (8, 8) in widths and (16, 16) in widths
    one, losses_one = train(p2g_trainer(vocabs, 1, impl, dropout=0.0), 2, data)
    four, losses_four = train(p2g_trainer(vocabs, 4, impl, dropout=0.0), 2, data)
    np.testing.assert_allclose(losses_four, losses_one, rtol=1e-5)
    # Adam scales each update to about lr (0.01): a gradient summed in another order moves a
    # parameter whose gradient is near 0 by a little; a different dropout mask moves it by lr
    chex.assert_trees_all_close(four.params, one.params, rtol=1e-4, atol=2e-5)


class Compiles(logging.Handler):
    """The jit compilations ``jax.log_compiles`` reports while it is attached."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        message = record.getMessage()
        if message.startswith("Compiling"):
            self.messages.append(message)


def compiles_during(work) -> list[str]:
    handler, root = Compiles(), logging.getLogger("jax")
    root.addHandler(handler)
    try:
        with jax.log_compiles(True):
            work()
    finally:
        root.removeHandler(handler)
    return handler.messages


@pytest.mark.slow
@pytest.mark.parametrize("part", ["cnn", "p2g"])
def test_no_compilation_after_the_first_epoch_and_no_implicit_transfer(part):
    """Epoch 0 compiles the block programs (the full one and the last, shorter one); epochs 1 and
    2 compile nothing, and run under ``jax.transfer_guard("disallow")``: the data was placed once,
    and each call's indices are placed explicitly."""
    if part == "cnn":
        trainer, data = CNNTrainer(False, lr=0.02, batch_size=8, impl="xla_cpu", steps_per_call=2), cnn_data(24)
    else:
        data, *vocabs = p2g_data()
        trainer, data = p2g_trainer(vocabs, 4, "xla_cpu"), (data,)
    state = [trainer.init_state()]

    def epoch(number):
        state[0], loss = trainer.train_epoch(state[0], *data, number)
        assert np.isfinite(loss)

    assert any("block" in m for m in compiles_during(lambda: epoch(0)))
    with jax.transfer_guard("disallow"):
        assert compiles_during(lambda: (epoch(1), epoch(2))) == []


def test_a_trace_is_written_after_the_first_block(tmp_path):
    images, labels = cnn_data(16)
    trainer = CNNTrainer(False, lr=0.02, batch_size=8, impl="xla_cpu", steps_per_call=1)
    trainer.trace = Trace(str(tmp_path / "profile"), epoch=1, skip=1, steps=1)
    state, _ = trainer.train_epoch(trainer.init_state(), images, labels, 0)
    assert not (tmp_path / "profile").exists()  # not this epoch
    progress = []
    trainer.train_epoch(state, images, labels, 1, progress.append)
    assert progress == [1, 1]
    traces = list((tmp_path / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0


def test_a_trace_after_compilation_is_of_the_second_epoch_or_the_only_one(tmp_path):
    assert Trace.after_compilation(tmp_path, 0, 5) == Trace(str(tmp_path), 1, 0)
    assert Trace.after_compilation(tmp_path, 4, 5) == Trace(str(tmp_path), 4, 1)


def test_p2g_steps_per_call_is_part_of_the_identity_only_where_it_changes_dropout():
    """A P2G block of K > 1 pads its batches to its longest words, and dropout's masks are drawn for
    that shape: with dropout, K is part of the run's identity (a resume with another K refused)."""
    from experiments.configs import P2GConfig
    from experiments.p2g import _padded_blocks

    assert _padded_blocks(P2GConfig(steps_per_call=3), 640) == {"steps_per_call": 3}
    assert _padded_blocks(P2GConfig(steps_per_call=3, dropout=0.0), 640) == {}
    assert _padded_blocks(P2GConfig(), 640) == {}  # a CPU's default K is 1
    assert _padded_blocks(P2GConfig(steps_per_call=30), 640) == {"steps_per_call": 10}  # at most the epoch's steps


@pytest.mark.slow
@pytest.mark.parametrize("part", ["cnn", "p2g"])
def test_cli_steps_per_call_resumes_and_profiles(part, tmp_path):
    """--steps-per-call is not part of the run's identity: a run trained one step a call resumes
    with 3 a call (the CNN's numbers those of an uninterrupted run), and --profile writes a trace."""
    from tests.conftest import run_cli

    if part == "cnn":
        data = tmp_path / "tiny.npz"
        np.savez(data, **tiny_splits())
        module, args = ["experiments.cnn"], ["--data", str(data), "--batch-size", "8", "--quiet"]
    else:
        pairs = synthetic_pairs(120, seed=0)
        for name, part_pairs in (("train", pairs[:80]), ("valid", pairs[80:])):
            (tmp_path / f"{name}.tsv").write_text("".join(f"{' '.join(p.phonemes)}\t{p.spelling}\n" for p in part_pairs))
        module, args = ["experiments.p2g", "train"], ["--data-dir", str(tmp_path), "--hidden", "16", "--batch-size", "16",
                                                      "--dropout", "0", "--quiet"]  # dropout makes K P2G's identity
    whole = run_cli(*module, *args, "--epochs", "3", "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    first = run_cli(*module, *args, "--epochs", "1", "--out", str(tmp_path / "resumed"), "--steps-per-call", "1")
    assert first.returncode == 0, first.stderr
    rest = run_cli(*module, *args, "--epochs", "3", "--out", str(tmp_path / "resumed"), "--steps-per-call", "3",
                   "--profile", str(tmp_path / "profile"))
    assert rest.returncode == 0, rest.stderr
    assert list((tmp_path / "profile").rglob("*.xplane.pb"))
    a, b = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("whole", "resumed"))
    assert "steps_per_call" not in a["config"] and "profile" not in b["config"]
    history = lambda m: [e for run in m["runs"].values() for e in run["history"]]
    for x, y in zip(history(a), history(b), strict=True):
        for key in x.keys() - {"seconds"}:
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), key


@pytest.mark.slow
def test_overhead_benchmark_prints_its_figures(capsys):
    from benchmarks import overhead

    assert overhead.main(["--quick", "--epochs", "1"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(summary) == {"cnn", "p2g"}
    for figures in summary.values():
        assert set(figures) == {"k1_us", "default_us", "default_k", "epoch_us", "host_path_us"}
        assert isinstance(figures["default_k"], int) and figures["default_k"] >= 1
        for key, value in figures.items():
            assert np.isfinite(value) and value > 0, key
