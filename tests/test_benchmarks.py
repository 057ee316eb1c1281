"""The PyTorch references compute what our models compute, and the benchmark runner's output."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cnn import CNN, count_params
from p2g.data import EOS, PAD
from p2g.decode import decode
from p2g.model import Seq2Seq

pytestmark = pytest.mark.slow  # benchmark code: run with --runslow

torch = pytest.importorskip("torch")
from benchmarks import run as bench_run  # noqa: E402
from benchmarks import torch_ref  # noqa: E402


@pytest.mark.parametrize("batch_norm", [False, True])
def test_torch_cnn_has_our_parameter_count(batch_norm):
    assert torch_ref.trainable(torch_ref.TorchCNN(batch_norm)) == count_params(CNN(batch_norm, nnx.Rngs(0)))


def random_batch(seed=0, B=6, S=9, T=7, src_vocab=20, tgt_vocab=15):
    rng = np.random.default_rng(seed)
    lengths = np.array([9, 3, 5, 1, 7, 2])[:B]
    src = rng.integers(4, src_vocab, (B, S))
    src[np.arange(S)[None] >= lengths[:, None]] = PAD
    return src, lengths, rng.integers(3, tgt_vocab, (B, T))


@pytest.mark.parametrize("attention", [False, True])
def test_torch_seq2seq_with_our_weights_computes_our_function(attention):
    model = Seq2Seq(20, 15, 16, 0.3, attention, rngs=nnx.Rngs(0))
    model.eval()
    reference = torch_ref.TorchSeq2Seq(20, 15, 16, 0.3, attention)
    torch_ref.load_flax_p2g(reference, nnx.to_pure_dict(nnx.state(model, nnx.Param))).eval()
    src, lengths, tgt = random_batch()
    ours = np.asarray(model(jnp.asarray(src), jnp.asarray(lengths), jnp.asarray(tgt)))
    with torch.no_grad():
        theirs = reference(*(torch.as_tensor(a) for a in (src, lengths, tgt))).numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    params = sum(int(np.size(p)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert torch_ref.trainable(reference) == params


def test_torch_decoders_agree_with_ours():
    model = Seq2Seq(20, 15, 16, 0.0, True, rngs=nnx.Rngs(1))
    model.eval()
    reference = torch_ref.load_flax_p2g(torch_ref.TorchSeq2Seq(20, 15, 16, 0.0, True), nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    src, lengths, _ = random_batch(seed=3)
    ours = np.asarray(decode(model, jnp.asarray(src), jnp.asarray(lengths), max_len=12).tokens)
    batched = torch_ref.decode_batched(reference, torch.as_tensor(src), torch.as_tensor(lengths), 12).numpy()
    per_word = torch_ref.greedy_per_word(reference, torch.as_tensor(src), torch.as_tensor(lengths), 12)
    np.testing.assert_array_equal(ours[:, : batched.shape[1]], batched)
    assert not ours[:, batched.shape[1]:].any()  # both stopped: PAD beyond torch's last step
    for row, word in zip(ours, per_word):
        row = list(row)
        assert word == (row[: row.index(EOS)] if EOS in row else row)


@pytest.mark.slow
def test_runner_prints_a_table_and_a_final_json_line(capsys):
    assert bench_run.main(["--quick", "--only", "hopfield"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert set(summary) == {"matmul_f32_256", "hopfield_retrieval_256q"}
    for row in summary.values():
        assert set(row) == {"ours", "torch", "ratio"} and row["ours"] > 0 and row["torch"] > 0
    table = [line for line in lines if line.startswith("hopfield_retrieval_256q")]
    assert len(table) == 1 and "queries/s" in table[0]
    with pytest.raises(SystemExit) as exit_info:
        bench_run.main(["--rounds", "0"])
    assert exit_info.value.code == 2 and "must be at least 1" in capsys.readouterr().err


@pytest.mark.slow
def test_gpu_check_quick_runs_the_protocols_through_the_command_lines(capsys):
    from benchmarks import gpu_check

    assert gpu_check.main(["--quick", "--impls", "xla_cpu", "--dtypes", "bfloat16"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["device"].startswith("cpu") and summary["quick"] is True
    assert set(summary["runs"]) == {"cnn_xla_cpu_bfloat16", "p2g_xla_cpu_bfloat16"}
    cnn, p2g = summary["runs"]["cnn_xla_cpu_bfloat16"], summary["runs"]["p2g_xla_cpu_bfloat16"]
    assert cnn["epochs"] == p2g["epochs"] == 1 and 0 <= cnn["test_acc"] <= 1 and 0 <= p2g["val_cer"]
    assert cnn["wall_s"] > cnn["train_s"] > 0
