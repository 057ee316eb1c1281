"""--dtype bfloat16: mixed precision in both parts and both implementations (common.precision)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common.training import OtherRun
from flax import nnx

from cnn import CNN
from cnn.train import Trainer as CNNTrainer, nll_loss, pixels
from common.precision import at_least_float32, compute_dtype
from experiments import cnn as cnn_cli
from experiments import p2g as p2g_cli
from experiments.configs import CNNConfig
from p2g import Seq2Seq, Trainer as P2GTrainer, Vocab, encode_pairs
from p2g.model import summed_nll
from tests.conftest import run_cli, slow
from tests.test_cnn import feeds_batch_norm, tiny_npz, tiny_splits  # noqa: F401 (tiny_npz: a fixture)
from tests.test_p2g import data_dir, random_batch, synthetic_pairs  # noqa: F401 (data_dir: a fixture)

MATMULS = ("conv_general_dilated", "dot_general")


def matmul_dtypes(fn, *args) -> set[str]:
    """The operand dtypes of every convolution and dot product in the jaxpr of ``fn(*args)``,
    nested jaxprs (scans, loops, custom gradients, jitted calls) included."""
    found = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in MATMULS:
                found.update(str(v.aval.dtype) for v in eqn.invars)
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    if hasattr(sub, "eqns"):
                        walk(sub)
                    elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                        walk(sub.jaxpr)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def float_dtypes(tree) -> set[str]:
    return {str(x.dtype) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


def test_dtype_names():
    assert compute_dtype("float32") is None and compute_dtype("bfloat16") == jnp.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'float16'"):
        compute_dtype("float16")
    assert at_least_float32(jnp.ones(2, jnp.bfloat16)).dtype == jnp.float32
    assert at_least_float32(jnp.ones(2, jnp.float32)).dtype == jnp.float32


def assert_bfloat16_near_float32(results: dict, products: dict, loss_rtol: float, min_cosine: float) -> None:
    """``results[dtype] = (outputs, loss, gradients)`` of the float32 and bfloat16 models, and
    ``products[dtype]`` the dtypes their products read: every product in its model's dtype, outputs
    within 0.01, losses within ``loss_rtol`` of float32's, gradients at cosine above ``min_cosine``."""
    assert products == {"float32": {"float32"}, "bfloat16": {"bfloat16"}}
    (out32, loss32, g32), (out16, loss16, g16) = results["float32"], results["bfloat16"]
    np.testing.assert_allclose(out16, out32, atol=0.01)
    assert abs(float(loss16) - float(loss32)) < loss_rtol * float(loss32)
    flat = lambda g: jnp.concatenate([a.ravel() for a in jax.tree.leaves(g)])
    cosine = jnp.dot(flat(g16), flat(g32)) / (jnp.linalg.norm(flat(g16)) * jnp.linalg.norm(flat(g32)))
    assert float(cosine) > min_cosine, float(cosine)


# -- CNN -------------------------------------------------------------------------------------

def cnn_pair(impl):
    """The BN CNN in float32 and in bfloat16 with the same parameters, and a batch."""
    models = {dtype: CNN(True, rngs=nnx.Rngs(0), impl=impl, dtype=compute_dtype(dtype)) for dtype in ("float32", "bfloat16")}
    data = tiny_splits(n_train=8)  # images that differ (uniform noise averages out to alike features)
    return models, pixels(jnp.asarray(data["train_images"])), jnp.asarray(data["train_labels"])


@pytest.mark.parametrize("impl", [slow("reference"), "xla_cpu"])
def test_bfloat16_cnn_computes_in_bfloat16_close_to_float32(impl):
    """Same parameters (float32 both): eval-mode log-probabilities, and train-mode loss and
    gradient (jitted, as training runs it; its direction, BatchNorm over 8 images amplifying
    bfloat16's rounding, the conv biases that BatchNorm cancels left out: their gradients are
    rounding noise), within bfloat16's precision of the float32 model's; every convolution and dense
    product, forward and backward, reads bfloat16 in the one and float32 in the other."""
    models, x, y = cnn_pair(impl)
    results, products = {}, {}
    for dtype, model in models.items():
        assert float_dtypes(nnx.state(model)) == {"float32"}  # parameters and BatchNorm statistics
        model.eval()
        log_probs = model(x)
        assert log_probs.dtype == jnp.float32
        model.train()
        graph, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)

        def loss(params, stats):
            m = nnx.merge(graph, params, stats, copy=True)
            return nll_loss(m(x, rngs=nnx.Rngs(dropout=0)), y), nnx.state(m, nnx.BatchStat)

        (value, new_stats), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, stats)
        assert value.dtype == jnp.float32 and float_dtypes((grads, new_stats)) == {"float32"}
        products[dtype] = matmul_dtypes(jax.grad(lambda p: loss(p, stats)[0]), params)
        grads = {jax.tree_util.keystr(k): g for k, g in jax.tree_util.tree_leaves_with_path(grads)}
        results[dtype] = (log_probs, value, {k: g for k, g in grads.items() if not feeds_batch_norm(k)})
    assert_bfloat16_near_float32(results, products, loss_rtol=0.01, min_cosine=0.97)


def test_hopfield_pooling_refuses_a_dtype():
    with pytest.raises(ValueError, match="no bfloat16 path"):
        CNN(True, rngs=nnx.Rngs(0), pool="hopfield", dtype=jnp.bfloat16)


@pytest.mark.parametrize("impl", [slow("reference"), "xla_cpu"])
def test_bfloat16_cnn_training_keeps_its_state_in_float32_and_lowers_the_loss(impl):
    data = tiny_splits(n_train=32)
    trainer = CNNTrainer(True, lr=0.02, batch_size=8, seed=0, impl=impl, dtype="bfloat16")
    state = trainer.init_state()
    images, labels = trainer.put(data["train_images"]), trainer.put(data["train_labels"].astype(np.int32))
    before = trainer.evaluate(state, images, labels)["loss"]
    for epoch in range(4):
        state, loss = trainer.train_epoch(state, images, labels, epoch)
    assert float_dtypes(state) == {"float32"}  # parameters, BatchNorm statistics, optimiser state
    after = trainer.evaluate(state, images, labels)["loss"]
    assert np.isfinite(loss) and after < before - 0.2, (before, after)


def test_float32_leaves_a_cnn_run_identity_as_it_was():
    fingerprints = {"train": "t", "val": "v"}
    assert "dtype" not in cnn_cli.run_config(CNNConfig(), 0.01, fingerprints)
    assert cnn_cli.run_config(CNNConfig(dtype="bfloat16"), 0.01, fingerprints)["dtype"] == "bfloat16"


# -- P2G -------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", [slow("reference"), "xla_cpu"])
def test_bfloat16_seq2seq_computes_in_bfloat16_close_to_float32(impl):
    """Same parameters: eval-mode logits (float32 both), and train-mode loss and gradient, within
    bfloat16's precision of the float32 model's; every product (embeddings, LSTMs, attention,
    generator), forward and backward, reads bfloat16 in the one and float32 in the other."""
    src, src_len, tgt_in, tgt_out = random_batch(np.random.default_rng(2))
    results, products = {}, {}
    for dtype in ("float32", "bfloat16"):
        model = Seq2Seq(12, 10, hidden=16, dropout=0.0, attention=True, rngs=nnx.Rngs(4), impl=impl,
                        dtype=compute_dtype(dtype))
        model.eval()
        logits = model(src, src_len, tgt_in)
        assert logits.dtype == jnp.float32
        model.train()
        graph, params = nnx.split(model, nnx.Param)
        assert float_dtypes(params) == {"float32"}
        loss = lambda p: summed_nll(nnx.merge(graph, p)(src, src_len, tgt_in, nnx.Rngs(dropout=0)), tgt_out)
        value, grads = jax.jit(jax.value_and_grad(loss))(params)
        assert value.dtype == jnp.float32 and float_dtypes(grads) == {"float32"}
        products[dtype] = matmul_dtypes(jax.grad(loss), params)
        results[dtype] = (jnp.where((tgt_out != 0)[..., None], logits, 0.0), value, grads)
    assert_bfloat16_near_float32(results, products, loss_rtol=0.002, min_cosine=0.999)


def test_hopfield_attention_refuses_a_dtype():
    with pytest.raises(ValueError, match="no bfloat16 path"):
        Seq2Seq(12, 10, hidden=16, attention="hopfield", rngs=nnx.Rngs(0), dtype=jnp.bfloat16)


@pytest.mark.parametrize("impl", [slow("reference"), "xla_cpu"])
def test_bfloat16_p2g_training_keeps_its_state_in_float32_and_lowers_the_loss(impl):
    pairs = synthetic_pairs(128, seed=1)
    src_vocab, tgt_vocab = Vocab.build(p.phonemes for p in pairs), Vocab.build(p.spelling for p in pairs)
    data = encode_pairs(pairs, src_vocab, tgt_vocab)
    trainer = P2GTrainer(len(src_vocab), len(tgt_vocab), hidden=32, attention=True, batch_size=32, lr=0.01, impl=impl,
                         dtype="bfloat16")
    state = trainer.init_state()
    before = trainer.loss(state, data)
    for epoch in range(12):
        state, _ = trainer.train_epoch(state, data, epoch)
    assert float_dtypes(state) == {"float32"}  # parameters and Adam's moments
    assert trainer.loss(state, data) < 0.6 * before
    assert len(trainer.decode(state, data, tgt_vocab)) == len(data)


# -- the command lines -----------------------------------------------------------------------

@pytest.mark.slow
def test_cnn_cli_trains_and_evaluates_in_bfloat16_and_will_not_resume_in_float32(tiny_npz, tmp_path, capsys):  # noqa: F811
    common = ["--data", str(tiny_npz), "--batch-norm", "--batch-size", "8", "--out", str(tmp_path / "bf16")]
    assert cnn_cli.main([*common, "--epochs", "2", "--dtype", "bfloat16", "--quiet"]) == 0
    metrics = json.loads((tmp_path / "bf16" / "metrics.json").read_text())
    assert metrics["config"]["dtype"] == "bfloat16" and metrics["runs"]["0.01"]["config"]["dtype"] == "bfloat16"
    assert all(np.isfinite(e["train_loss"]) for e in metrics["runs"]["0.01"]["history"])
    capsys.readouterr()
    assert cnn_cli.main(["--evaluate", str(tmp_path / "bf16"), "--data", str(tiny_npz)]) == 0
    out = capsys.readouterr().out
    assert "computing in bfloat16" in out
    assert json.loads(out.strip().splitlines()[-1])["test_acc"] == metrics["test"]["acc"]
    with pytest.raises(OtherRun, match=r"other settings .*dtype: 'bfloat16' there, None now"):
        cnn_cli.main([*common, "--epochs", "3", "--quiet"])
    proc = run_cli("experiments.cnn", "--batch-norm", "--pool", "hopfield", "--dtype", "bfloat16", "--data", str(tiny_npz))
    assert proc.returncode == 2 and "does not cover the Hopfield pooling" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 3 and "Traceback" not in proc.stderr  # usage + the error


@pytest.mark.slow
def test_p2g_cli_trains_and_tests_in_bfloat16_and_will_not_resume_in_float32(data_dir, tmp_path, capsys):  # noqa: F811
    common = ["train", "--attn", "--data-dir", str(data_dir), "--hidden", "32", "--batch-size", "32", "--quiet",
              "--out", str(tmp_path / "bf16")]
    assert p2g_cli.main([*common, "--epochs", "2", "--dtype", "bfloat16"]) == 0
    metrics = json.loads((tmp_path / "bf16" / "metrics.json").read_text())
    assert metrics["runs"]["0.003"]["config"]["dtype"] == "bfloat16"
    capsys.readouterr()
    assert p2g_cli.main(["test", "--checkpoint", str(tmp_path / "bf16"), "--data-dir", str(data_dir)]) == 0
    out = capsys.readouterr().out
    assert "computing in bfloat16" in out
    assert json.loads(out.strip().splitlines()[-1])["cer"] == metrics["test"]["cer"]
    with pytest.raises(OtherRun, match=r"other settings or data \(dtype: 'bfloat16' there, None now\)"):
        p2g_cli.main([*common, "--epochs", "3"])
    proc = run_cli("experiments.p2g", "train", "--attn", "hopfield", "--dtype", "bfloat16")
    assert proc.returncode == 2 and "does not cover the Hopfield attention" in proc.stderr and "Traceback" not in proc.stderr
