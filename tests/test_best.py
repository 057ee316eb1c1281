"""The ingredients beyond the homework protocol (augmentation, optimisers and schedules, label
smoothing, wider and stacked layers) and the named configurations that combine them."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from cnn.augment import augment, random_crop, random_flip
from cnn.model import CNN, count_params
from cnn.train import nll_loss
from common.optim import Optimizer, multiplier
from common.training import OtherRun
from experiments import cnn as cnn_cli
from experiments import p2g as p2g_cli
from experiments._cli import ArgumentParser
from experiments.configs import CNNConfig, ConfigError, P2GConfig, add_flags, beyond_homework, from_args, use_named
from p2g.model import Seq2Seq, bidirectional, layers, summed_nll
from tests.test_cnn import tiny_npz  # noqa: F401 - a fixture
from tests.test_p2g import data_dir  # noqa: F401 - a fixture


def images(B=16, H=8, W=8, seed=0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (B, H, W, 3)), jnp.uint8)


def test_random_flip_mirrors_some_images_and_leaves_the_others():
    x = images(64)
    y = random_flip(jax.random.key(0), x)
    mirrored = np.array([bool(jnp.all(y[i] == x[i, :, ::-1])) for i in range(64)])
    kept = np.array([bool(jnp.all(y[i] == x[i])) for i in range(64)])
    assert np.all(mirrored | kept) and 16 < mirrored.sum() < 48
    assert jnp.array_equal(y, random_flip(jax.random.key(0), x))  # a function of the key
    assert not jnp.array_equal(y, random_flip(jax.random.key(1), x))


def test_random_crop_is_a_shift_of_the_edge_padded_image_by_at_most_the_pad():
    x, pad = images(32), 2
    y = random_crop(jax.random.key(3), x, pad)
    assert y.shape == x.shape and y.dtype == jnp.uint8
    padded = np.pad(np.asarray(x), ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
    shifts = set()
    for i in range(32):
        found = [(r, c) for r in range(2 * pad + 1) for c in range(2 * pad + 1)
                 if np.array_equal(np.asarray(y[i]), padded[i, r:r + 8, c:c + 8])]
        assert found, f"image {i} is not a window of its padded image"
        shifts.add(found[0])
    assert len(shifts) > 5  # offsets are drawn per image


def test_augment_names_its_kinds():
    x = images(4)
    assert augment(jax.random.key(0), x, "none") is x
    assert jnp.array_equal(augment(jax.random.key(0), x, "flip"), random_flip(jax.random.split(jax.random.key(0))[0], x))
    with pytest.raises(ValueError, match="unknown augmentation 'rotate'"):
        augment(jax.random.key(0), x, "rotate")


def params_and_grads(seed=0):
    rng = np.random.default_rng(seed)
    params = {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "bias": jnp.asarray(rng.normal(size=4), jnp.float32)}
    grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params) for _ in range(6)]
    return params, grads


def run(tx, params, grads):
    state, out = tx.init(params), []
    for g in grads:
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
        out.append(params)
    return out


@pytest.mark.parametrize("name, homework", [("sgd", optax.inject_hyperparams(optax.sgd)(learning_rate=0.01)),
                                            ("adam", optax.inject_hyperparams(optax.adam)(learning_rate=0.01))])
def test_the_default_optimizers_are_the_homework_transformations(name, homework):
    params, grads = params_and_grads()
    tx = Optimizer(name)(0.01)
    assert jax.tree.structure(tx.init(params)) == jax.tree.structure(homework.init(params))  # old checkpoints restore
    for a, b in zip(run(tx, params, grads), run(homework, params, grads)):
        jax.tree.map(lambda u, v: np.testing.assert_array_equal(u, v), a, b)


def test_cosine_schedule_warms_up_linearly_and_decays_to_zero():
    s = multiplier("cosine", total_steps=110, warmup_steps=10)
    np.testing.assert_allclose([s(0), s(5), s(10), s(60), s(110)], [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)
    assert multiplier("constant", 100) is None
    np.testing.assert_allclose([multiplier("constant", 100, 4)(t) for t in (0, 2, 4, 50)], [0, 0.5, 1, 1])
    with pytest.raises(ValueError, match="does not fit"):
        multiplier("cosine", 10, 10)


def test_scheduled_nesterov_sgd_is_optax_sgd_at_the_scheduled_rate():
    params, grads = params_and_grads(1)
    ours = Optimizer("sgd", 0.9, True, schedule="cosine", total_steps=6, warmup_steps=2)(0.1)
    s = multiplier("cosine", 6, 2)
    reference = optax.sgd(lambda t: 0.1 * s(t), momentum=0.9, nesterov=True)
    for a, b in zip(run(ours, params, grads), run(reference, params, grads)):
        jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7), a, b)


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_weight_decay_shrinks_kernels_only(name):
    params, _ = params_and_grads(2)
    zero = jax.tree.map(jnp.zeros_like, params)
    tx = Optimizer(name, weight_decay=0.1)(0.5)
    updates, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_allclose(updates["kernel"], -0.5 * 0.1 * params["kernel"], rtol=1e-6)  # L2 (SGD) or AdamW
    np.testing.assert_array_equal(updates["bias"], 0.0)
    with pytest.raises(ValueError, match="momentum and nesterov are SGD's"):
        Optimizer("adam", momentum=0.9)


def test_label_smoothing_mixes_the_nll_with_the_mean_over_classes(x64):
    rng = np.random.default_rng(0)
    log_probs = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(5, 6))))
    labels = jnp.asarray(rng.integers(0, 6, 5))
    nll = -jnp.mean(log_probs[jnp.arange(5), labels])
    uniform = -jnp.mean(log_probs)  # mean over examples and classes
    np.testing.assert_allclose(nll_loss(log_probs, labels, 0.1), 0.9 * nll + 0.1 * uniform, rtol=1e-12)
    assert nll_loss(log_probs, labels) == nll_loss(log_probs, labels, 0.0)
    # P2G: the same over non-PAD positions only (PAD = 0)
    logits = jnp.asarray(rng.normal(size=(2, 3, 7)))
    targets = jnp.asarray([[3, 4, 0], [5, 0, 0]])
    lp = jax.nn.log_softmax(logits)
    real = [(0, 0), (0, 1), (1, 0)]
    want = sum(-0.8 * lp[b, t, targets[b, t]] - 0.2 * jnp.mean(lp[b, t]) for b, t in real)
    np.testing.assert_allclose(summed_nll(logits, targets, 0.2), want, rtol=1e-12)


def output_shape(model, *args) -> tuple:
    """The shape of ``model(*args)``, traced without compiling."""
    graph, state = nnx.split(model)
    return jax.eval_shape(lambda state, *args: nnx.merge(graph, state)(*args), state, *args).shape


def test_a_wider_cnn_multiplies_the_channels():
    model = CNN(True, nnx.Rngs(0), width=2)
    model.eval()
    assert [block.conv.out_features for block in model.blocks] == [64, 128, 256]
    assert model.fc1.in_features == 256 and count_params(model) == 1_164_806
    assert output_shape(model, jnp.zeros((2, 48, 48, 3))) == (2, 6)
    with pytest.raises(ValueError, match="width must be a positive integer"):
        CNN(True, nnx.Rngs(0), width=0)


def test_a_stacked_encoder_adds_one_bilstm_a_layer_and_keeps_the_homework_tree():
    one = Seq2Seq(12, 10, hidden=16, attention=True, rngs=nnx.Rngs(0))
    two = Seq2Seq(12, 10, hidden=16, attention=True, rngs=nnx.Rngs(0), encoder_layers=2)
    size = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
    extra = bidirectional(layers("reference"), 16, nnx.Rngs(0))
    assert one.encoder.stacked is None  # homework checkpoints keep their tree
    assert size(two) - size(one) == size(extra)
    two.eval()
    src = jnp.asarray([[3, 4, 5, 0], [6, 7, 0, 0]])
    assert output_shape(two, src, jnp.asarray([3, 2]), jnp.asarray([[1, 4, 5], [1, 6, 0]])) == (2, 3, 10)
    with pytest.raises(ValueError, match="encoder_layers must be a positive integer"):
        Seq2Seq(12, 10, hidden=16, rngs=nnx.Rngs(0), encoder_layers=0)


def parse(config_type, argv):
    parser = ArgumentParser(prog="test")
    add_flags(parser, config_type)
    use_named(parser, config_type, argv)
    return from_args(parser, config_type, parser.parse_args(argv))


def test_a_named_configuration_sets_defaults_that_flags_override():
    best = parse(CNNConfig, ["--config", "best"])
    assert (best.batch_norm, best.batch_size, best.lr, best.augment, best.schedule) == (True, 32, (0.05,), "flip-crop", "cosine")
    assert str(best.workdir) == "runs/cnn-best"
    changed = parse(CNNConfig, ["--config=best", "--epochs", "5", "--lr", "0.1", "0.2", "--no-batch-norm", "--augment", "none"])
    assert (changed.epochs, changed.lr, changed.batch_norm, changed.augment, changed.momentum) == (5, (0.1, 0.2), False, "none", 0.9)
    homework = parse(CNNConfig, [])
    assert homework == CNNConfig() and beyond_homework(homework) == {}  # homework runs keep their identity
    assert beyond_homework(best) == {name: getattr(best, name) for name in CNNConfig.BEYOND if name != "width"} | {"epochs": 100}
    p2g = parse(P2GConfig, ["--config", "best", "--hidden", "64"])
    assert (p2g.hidden, p2g.encoder_layers, p2g.beam, p2g.attn) == (64, 2, 5, "bahdanau")
    assert parse(P2GConfig, ["--config", "best", "--beam", "0", "--length-penalty", "0"]).beam == 0  # greedy


@pytest.mark.parametrize("config_type, argv, message", [
    (CNNConfig, ["--nesterov"], "--nesterov is a kind of momentum"),
    (CNNConfig, ["--warmup-epochs", "3", "--epochs", "3"], "--warmup-epochs 3 must be fewer than --epochs 3"),
    (P2GConfig, ["--length-penalty", "1"], "--length-penalty ranks the hypotheses of beam search"),
])
def test_rules_of_the_new_fields_are_config_errors(config_type, argv, message):
    parser = ArgumentParser(prog="test")
    add_flags(parser, config_type)
    args = parser.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_type)}
    with pytest.raises(ConfigError, match=message):
        config_type(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def test_an_unknown_configuration_or_an_abbreviated_flag_is_a_one_line_error(capsys):
    for argv, message in ((["--config", "fastest"], "invalid choice: 'fastest'"),
                          (["--config"], "argument --config: expected one argument"),
                          (["--conf", "best"], "unrecognized arguments: --conf best")):
        with pytest.raises(SystemExit) as exit_:
            parse(CNNConfig, argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_cnn_best_configuration_trains_resumes_and_evaluates(tiny_npz, tmp_path, capsys):  # noqa: F811
    common = ["--config", "best", "--data", str(tiny_npz), "--batch-size", "8", "--warmup-epochs", "1", "--quiet"]
    assert cnn_cli.main([*common, "--epochs", "3", "--out", str(tmp_path / "a")]) == 0
    # stopped after 2 of 3 epochs: the run is refused with another schedule length, then resumed
    assert cnn_cli.main([*common, "--epochs", "2", "--out", str(tmp_path / "b")]) == 0
    with pytest.raises(OtherRun, match="epochs: 2 there, 3 now"):
        cnn_cli.main([*common, "--epochs", "3", "--out", str(tmp_path / "b")])
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert a["config"]["config"] == "best" and a["runs"]["0.05"]["config"]["augment"] == "flip-crop"
    assert a["params"] == 755_718 and len(a["runs"]["0.05"]["history"]) == 3
    capsys.readouterr()
    assert cnn_cli.main(["--evaluate", str(tmp_path / "a"), "--data", str(tiny_npz)]) == 0  # momentum state restores
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["test_acc"] == a["test"]["acc"]


@pytest.mark.slow
def test_p2g_best_configuration_tests_with_the_beam_it_names(data_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    assert p2g_cli.main(["train", "--config", "best", "--data-dir", str(data_dir), "--hidden", "16", "--epochs", "3",
                         "--warmup-epochs", "1", "--batch-size", "32", "--out", str(out), "--quiet"]) == 0
    trained = json.loads((out / "metrics.json").read_text())
    assert trained["test"]["decoding"] == "beam 5, length penalty 1"
    assert trained["runs"]["0.003"]["config"]["encoder_layers"] == 2
    capsys.readouterr()
    assert p2g_cli.main(["test", "--checkpoint", str(out), "--data-dir", str(data_dir)]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert "decoding as the model was trained to be tested: beam 5, length penalty 1" in captured.out
    assert result["beam"]["width"] == 5 and result["beam"]["cer"] == trained["test"]["cer"]
    assert p2g_cli.main(["test", "--checkpoint", str(out), "--data-dir", str(data_dir), "--split", "valid"]) == 0
    valid = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    history = trained["runs"]["0.003"]["history"]
    assert valid["cer"] == history[trained["selected"]["epoch"] - 1]["val_cer"]  # greedy on valid, as in training
