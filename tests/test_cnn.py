"""CNN models, trainer, data layer and CLI on tiny generated data."""

from __future__ import annotations

import json
import os
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common.training import MoreEpochs, OtherRun
from flax import nnx

from cnn import CNN, CLASS_NAMES, IMPLS, DataError, Trainer, count_params, load, load_kaggle, load_npz
from cnn.xla_cpu.pool import max_pool_2x2
from cnn.train import nll_loss
from experiments import cnn as cnn_cli
from tests.conftest import assert_plot, kill_at_saves_then_finish, run_cli, run_killed_at_save, slow


def tiny_splits(n_train=48, n_val=16, n_test=16, seed=0):
    """Images whose brightness encodes the class: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        labels = rng.integers(0, 6, n)
        images = rng.integers(0, 20, (n, 48, 48, 3)) + (labels * 45)[:, None, None, None]
        out[f"{name}_images"], out[f"{name}_labels"] = images.astype(np.uint8), labels.astype(np.int64)
    return out


def selection(metrics: dict) -> tuple:
    """What a metrics.json selected, without where it lives or how long it took."""
    selected = metrics["selected"]
    return selected["run"], selected["epoch"], {k: v for k, v in selected["val"].items() if k != "seconds"}


@pytest.fixture
def tiny_npz(tmp_path):
    path = tmp_path / "tiny.npz"
    np.savez(path, **tiny_splits())
    return path


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch_norm, expected", [(False, 5_340_742), (True, 755_718)])
def test_parameter_counts_and_log_probabilities(batch_norm, expected, impl):
    model = CNN(batch_norm, rngs=nnx.Rngs(0), impl=impl)
    assert count_params(model) == expected
    model.eval()
    out = model(jnp.asarray(np.random.default_rng(0).random((3, 48, 48, 3)), jnp.float32))
    assert out.shape == (3, 6)
    np.testing.assert_allclose(jnp.exp(out).sum(axis=1), 1.0, rtol=1e-5)
    assert bool(jnp.all(out <= 0))


def test_hopfield_pooling_replaces_global_average_pooling():
    average, hopfield = CNN(True, rngs=nnx.Rngs(0)), CNN(True, rngs=nnx.Rngs(0), pool="hopfield")
    assert count_params(hopfield) == 822_150
    assert "query" in nnx.to_pure_dict(nnx.state(hopfield, nnx.Param))["pool"]  # the learned state pattern
    # the layers both models share start from the same values (the pooling is made last)
    shared = nnx.to_pure_dict(nnx.state(average, nnx.Param))
    chex.assert_trees_all_equal(shared, {k: v for k, v in nnx.to_pure_dict(nnx.state(hopfield, nnx.Param)).items() if k != "pool"})
    hopfield.eval()
    x = jnp.asarray(np.random.default_rng(0).random((2, 48, 48, 3)), jnp.float32)
    assert hopfield(x).shape == (2, 6)
    with pytest.raises(ValueError, match="needs batch_norm=True"):
        CNN(False, rngs=nnx.Rngs(0), pool="hopfield")


@pytest.mark.parametrize("impl", IMPLS)
def test_batch_norm_switch(impl):
    plain, normed = CNN(False, rngs=nnx.Rngs(0), impl=impl), CNN(True, rngs=nnx.Rngs(0), impl=impl)
    assert jax.tree.leaves(nnx.state(plain, nnx.BatchStat)) == []
    stats = nnx.state(normed, nnx.BatchStat)
    # running mean and variance for 3 conv blocks (32, 64, 128) and the MLP (1024)
    assert sorted(int(x.size) for x in jax.tree.leaves(stats)) == sorted([32, 32, 64, 64, 128, 128, 1024, 1024])
    # baseline flattens 6*6*128 features, the variant averages to 128
    assert plain.fc1.kernel.shape == (4608, 1024) and normed.fc1.kernel.shape == (128, 1024)


@pytest.mark.parametrize("impl", [slow("reference"), "xla_cpu"])
def test_train_mode_uses_dropout_and_batch_statistics(impl):
    model = CNN(True, rngs=nnx.Rngs(0), impl=impl)
    x = jnp.asarray(np.random.default_rng(1).random((4, 48, 48, 3)), jnp.float32)
    model.train()
    a = model(x, rngs=nnx.Rngs(dropout=1))
    b = model(x, rngs=nnx.Rngs(dropout=2))
    assert not np.allclose(a, b)  # different dropout masks
    model.eval()
    np.testing.assert_array_equal(model(x), model(x))  # eval is deterministic


def float64(tree):
    return jax.tree.map(lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


@pytest.mark.parametrize("batch_norm, pool", [(False, "average"), (True, "average"), slow(True, "hopfield")],
                         ids=["baseline", "BN", "BN, Hopfield pooling"])
def test_both_impls_have_the_same_parameters_outputs_and_gradients(x64, batch_norm, pool):
    """reference and xla_cpu: the same parameter tree and initial values; the same log-probabilities
    in eval mode; in train mode with dropout off, the same loss, gradients (jitted) and updated
    running statistics (float64)."""
    models = {impl: CNN(batch_norm, rngs=nnx.Rngs(0), impl=impl, pool=pool) for impl in IMPLS}
    chex.assert_trees_all_equal(*(nnx.state(m, nnx.Param) for m in models.values()))
    rng = np.random.default_rng(0)
    x, y = jnp.asarray(rng.random((4, 48, 48, 3))), jnp.asarray(rng.integers(0, 6, 4))
    results = {}
    for impl, model in models.items():
        model.eval()
        graph, state = nnx.split(model)
        eval_out = nnx.merge(graph, float64(state))(x)
        model.train()
        model.set_attributes(rate=0.0)
        graph, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)

        def loss(params, stats):
            trained = nnx.merge(graph, params, stats, copy=True)
            return nll_loss(trained(x), y), nnx.state(trained, nnx.BatchStat)

        results[impl] = (eval_out, jax.jit(jax.value_and_grad(loss, has_aux=True))(float64(params), float64(stats)))
    chex.assert_trees_all_close(results["reference"], results["xla_cpu"], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("impl", ["reference", slow("xla_cpu")])
def test_a_checkpoint_of_one_impl_restores_into_the_other(tmp_path, impl):
    """A state saved by the other impl's trainer restores into this one's, same eval accuracy and loss."""
    from common.checkpoint import Checkpoints

    other = next(i for i in IMPLS if i != impl)
    data = tiny_splits(n_train=16)
    images, labels = data["train_images"], data["train_labels"].astype(np.int32)
    saver, loader = Trainer(True, 0.02, 8, impl=other), Trainer(True, 0.02, 8, seed=1, impl=impl)
    state, _ = saver.train_epoch(saver.init_state(), saver.put(images), saver.put(labels), 0)
    checkpoints = Checkpoints(tmp_path / "ckpt")
    checkpoints.save(0, state, {})
    restored, _ = checkpoints.restore(loader.abstract_state(), 0)
    checkpoints.close()
    a = saver.evaluate(state, saver.put(images), saver.put(labels))
    b = loader.evaluate(restored, loader.put(images), loader.put(labels))
    assert b["acc"] == a["acc"] and b["loss"] == pytest.approx(a["loss"], rel=1e-5)


@pytest.mark.slow
def test_cnn_does_not_import_p2g():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "import sys, cnn, cnn.xla_cpu, cnn.train; "
                          "print(sorted({m.split('.')[0] for m in sys.modules} & {'p2g', 'hopfield', 'experiments'}))"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_dense_product_matches_its_autodiff_gradient_and_nnx_linear(x64):
    from cnn.xla_cpu.dense import dot_general, matmul

    rng = np.random.default_rng(0)
    x, kernel, weights = (jnp.asarray(rng.standard_normal(shape)) for shape in ((5, 7), (7, 3), (5, 3)))
    ours = lambda x, k: jnp.sum(weights * matmul(x, k))  # a cotangent with no symmetry to hide a transpose
    reference = lambda x, k: jnp.sum(weights * (x @ k))
    np.testing.assert_allclose(ours(x, kernel), reference(x, kernel), rtol=1e-12)
    expected = jax.grad(reference, argnums=(0, 1))(x, kernel)
    for computed in (jax.grad(ours, argnums=(0, 1))(x, kernel), jax.jit(jax.grad(ours, argnums=(0, 1)))(x, kernel)):
        for a, b in zip(computed, expected):  # eager, and as compiled, barriers included
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    # as nnx.Linear's dot_general: same parameters, same function
    layer = nnx.Linear(7, 3, dot_general=dot_general, rngs=nnx.Rngs(0), param_dtype=jnp.float64)
    plain = nnx.Linear(7, 3, rngs=nnx.Rngs(0), param_dtype=jnp.float64)
    np.testing.assert_array_equal(layer.kernel[...], plain.kernel[...])
    np.testing.assert_allclose(layer(x), plain(x), rtol=1e-12)


def test_max_pool_matches_reduce_window_values_and_gradients(x64):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 6, 3)))  # ties have probability 0
    reference = lambda x: nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2))
    np.testing.assert_array_equal(max_pool_2x2(x), reference(x))
    weights = jnp.asarray(np.random.default_rng(1).standard_normal((2, 4, 3, 3)))
    grad = lambda pool: jax.grad(lambda x: jnp.sum(weights * pool(x)))(x)
    np.testing.assert_array_equal(grad(max_pool_2x2), grad(reference))
    assert int(jnp.sum(grad(max_pool_2x2) != 0)) == 2 * 4 * 3 * 3  # one winner per window


def test_max_pool_gives_a_tied_window_gradient_to_its_first_maximum():
    windows = np.array([[1, 1, 1, 1], [0, 2, 2, 2], [0, 1, 3, 3], [0, 1, 2, 4], [5, 0, 5, 0]], np.float32)
    x = jnp.asarray(windows.reshape(5, 2, 2).transpose(1, 0, 2).reshape(1, 2, 10, 1))  # the windows side by side
    np.testing.assert_array_equal(max_pool_2x2(x).ravel(), windows.max(axis=1))
    grad = jax.grad(lambda x: jnp.sum(jnp.arange(1.0, 6.0) * max_pool_2x2(x)[0, 0, :, 0]))(x)
    routed = np.asarray(grad).reshape(2, 5, 2).transpose(1, 0, 2).reshape(5, 4)
    winners = [0, 1, 2, 3, 0]  # row-major first maximum of each window
    np.testing.assert_array_equal(routed, np.eye(4)[winners] * np.arange(1.0, 6.0)[:, None])


def _composed_norm_relu_pool(y, bias, scale, beta, eps):
    """The reference for cnn.norm_pool: flax's training-mode statistics, relu and the pool, by autodiff."""
    x = y + bias
    mean = x.mean((0, 1, 2))
    var = jnp.maximum((x * x).mean((0, 1, 2)) - mean * mean, 0.0)
    z = (x - mean) * jax.lax.rsqrt(var + eps) * scale + beta
    return max_pool_2x2(jax.nn.relu(z)), mean, var


def test_fused_batch_norm_relu_pool_matches_autodiff_of_the_composed_layers(x64):
    from cnn.xla_cpu.norm_pool import batch_norm_relu_pool

    rng = np.random.default_rng(0)
    y = jnp.asarray(rng.standard_normal((3, 8, 6, 5)) + 0.7)
    bias, scale, beta = (jnp.asarray(rng.standard_normal(5)) for _ in range(3))  # scale of both signs
    cotangents = tuple(jnp.asarray(rng.standard_normal(s)) for s in ((3, 4, 3, 5), (5,), (5,)))
    ours, ours_vjp = jax.vjp(lambda *a: batch_norm_relu_pool(*a, 1e-5), y, bias, scale, beta)
    ref, ref_vjp = jax.vjp(lambda *a: _composed_norm_relu_pool(*a, 1e-5), y, bias, scale, beta)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    assert float(jnp.mean(ours[0] > 0)) > 0.3  # the ReLU passes some windows and stops others
    for a, b in zip(ours_vjp(cotangents), ref_vjp(cotangents)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    jitted = jax.jit(lambda *a: jax.vjp(lambda *p: batch_norm_relu_pool(*p, 1e-5), *a)[1](cotangents))
    for a, b in zip(jitted(y, bias, scale, beta), ref_vjp(cotangents)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_bn_conv_block_in_training_mode_matches_nnx_batch_norm(x64):
    """The fused training path of the xla_cpu ConvBlock against nnx.Conv -> nnx.BatchNorm -> relu
    -> pool: same output, running statistics and gradients (input and every parameter)."""
    from cnn.xla_cpu import ConvBlock

    block = ConvBlock(3, 4, batch_norm=True, rngs=nnx.Rngs(0))
    block.train()
    block.conv.bias[...] = jnp.asarray(np.random.default_rng(2).standard_normal(4))
    block = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64) if a.dtype == jnp.float32 else a, block)
    reference = nnx.clone(block)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 6, 8, 3)))
    weights = jnp.asarray(np.random.default_rng(3).standard_normal((2, 3, 4, 4)))

    def loss(module, x, fused):
        out = module(x, nnx.Rngs(dropout=5)) if fused else module.dropout(
            max_pool_2x2(nnx.relu(module.norm(module.conv(x)))), rngs=nnx.Rngs(dropout=5))
        return jnp.sum(weights * out)

    grads = [nnx.grad(loss, argnums=(0, 1))(m, x, fused) for m, fused in ((block, True), (reference, False))]
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    for a, b in zip(jax.tree.leaves(nnx.state(block, nnx.BatchStat)), jax.tree.leaves(nnx.state(reference, nnx.BatchStat))):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    assert not np.allclose(block.norm.mean[...], 0.0)  # the statistics were updated
    np.testing.assert_allclose(loss(block, x, True), loss(nnx.clone(reference), x, False), rtol=1e-12)


def feeds_batch_norm(name: str) -> bool:
    """Whether the parameter at path ``name`` is a conv bias of the BN variant's blocks: its true
    gradient is 0 (the norm removes any shift), so what it receives is rounding noise."""
    return "blocks" in name and "conv" in name and "bias" in name


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
def test_jitted_bn_model_gradient_matches_central_differences(x64, impl):
    """In float64 the jitted gradient of the BN model, leaf by leaf, must give the loss's
    directional derivative along a random direction (central differences, step 1e-7; they
    agreed to 1e-9 absolute, 3e-7 relative on the first kernel). A max-pool whose gradient routed
    through ``x == max(x)`` failed this: inside the jitted program the first two blocks' kernel
    gradients came out about 20% off (here -0.81 against 1.15 along the first kernel's direction)."""
    model = CNN(True, rngs=nnx.Rngs(0), impl=impl)
    model.train()
    graph, params, rest = nnx.split(model, nnx.Param, ...)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
    # the running BatchNorm statistics too, so that the train-mode update stays in float64
    rest = jax.tree.map(lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, rest)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (8, 48, 48, 3)) / 255.0)
    labels = jnp.asarray(rng.integers(0, 6, 8))

    @jax.jit
    def loss(params):
        log_probs = nnx.merge(graph, params, rest, copy=True)(images, rngs=nnx.Rngs(dropout=0))
        return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))

    grads = jax.jit(jax.grad(loss))(params)
    flat, treedef = jax.tree.flatten(params)
    names = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    for i, (name, g) in enumerate(zip(names, jax.tree.leaves(grads))):
        if feeds_batch_norm(name):
            continue
        direction = rng.standard_normal(flat[i].shape)
        shifted = lambda eps: jax.tree.unflatten(treedef, [leaf + eps * direction if j == i else leaf for j, leaf in enumerate(flat)])
        numeric = (float(loss(shifted(1e-7))) - float(loss(shifted(-1e-7)))) / 2e-7
        analytic = float(jnp.sum(g * direction))
        assert analytic == pytest.approx(numeric, rel=1e-4, abs=1e-6), name


def test_nll_loss_value():
    log_probs = jnp.log(jnp.array([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]))
    assert float(nll_loss(log_probs, jnp.array([0, 2]))) == pytest.approx(-(np.log(0.5) + np.log(0.8)) / 2)


@pytest.mark.parametrize("batch_norm, impl", [slow(False, "reference"), (False, "xla_cpu"), slow(True, "reference"),
                                             (True, "xla_cpu")])
def test_few_steps_lower_the_loss(batch_norm, impl):
    data = tiny_splits(n_train=32)
    trainer = Trainer(batch_norm, lr=0.02, batch_size=8, seed=0, impl=impl)
    state = trainer.init_state()
    images, labels = trainer.put(data["train_images"]), trainer.put(data["train_labels"].astype(np.int32))
    before = trainer.evaluate(state, images, labels)["loss"]
    for epoch in range(4):
        state, _ = trainer.train_epoch(state, images, labels, epoch)
    after = trainer.evaluate(state, images, labels)["loss"]
    assert after < before - 0.2, (before, after)


def test_epoch_batches_cover_every_example_and_depend_on_seed_and_epoch():
    trainer = Trainer(False, lr=0.01, batch_size=8, seed=3)
    batches = trainer.epoch_batches(21, epoch=0)
    assert batches.shape == (3, 8)
    assert set(batches.ravel()) == set(range(21))
    np.testing.assert_array_equal(batches, trainer.epoch_batches(21, epoch=0))
    assert not np.array_equal(batches, trainer.epoch_batches(21, epoch=1))


def test_data_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_npz(tmp_path / "missing.npz")
    data = tiny_splits()
    bad = dict(data)
    del bad["val_labels"]
    np.savez(tmp_path / "keys.npz", **bad)
    with pytest.raises(DataError, match="missing val_labels"):
        load_npz(tmp_path / "keys.npz")
    bad = dict(data, train_images=data["train_images"].transpose(0, 3, 1, 2))  # NCHW
    np.savez(tmp_path / "shape.npz", **bad)
    with pytest.raises(DataError, match=r"expected \(n, 48, 48, 3\)"):
        load_npz(tmp_path / "shape.npz")
    bad = dict(data, test_labels=data["test_labels"] + 6)
    np.savez(tmp_path / "labels.npz", **bad)
    with pytest.raises(DataError, match="expected 0..5"):
        load_npz(tmp_path / "labels.npz")
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(DataError, match="not a readable"):
        load_npz(tmp_path / "junk.npz")
    test_only = {k: v for k, v in data.items() if k.startswith("test_")}
    np.savez(tmp_path / "test_only.npz", **test_only)
    assert load_npz(tmp_path / "test_only.npz", required=("test",)).train is None


def test_pixels_are_converted_only_where_nothing_is_lost(tmp_path):
    data = tiny_splits()
    scaled = dict(data, train_images=data["train_images"].astype(np.float32) / 255.0)  # floats in [0, 1]
    np.savez(tmp_path / "unit.npz", **scaled)
    with pytest.raises(DataError, match=r"not whole pixel values 0..255.*multiply by 255"):
        load_npz(tmp_path / "unit.npz")
    exact = dict(data, train_images=data["train_images"].astype(np.float64), val_images=data["val_images"].astype(np.int64))
    np.savez(tmp_path / "exact.npz", **exact)
    loaded = load_npz(tmp_path / "exact.npz")
    np.testing.assert_array_equal(loaded.train.images, data["train_images"])
    assert loaded.train.images.dtype == loaded.val.images.dtype == np.uint8


def test_unreadable_arrays_are_one_line_errors(tmp_path):
    data = tiny_splits()
    np.savez(tmp_path / "objects.npz", **dict(data, val_labels=np.array([None] * 16, dtype=object)))
    with pytest.raises(DataError, match="the val arrays cannot be read"):
        load_npz(tmp_path / "objects.npz")
    np.savez(tmp_path / "good.npz", **data)
    raw = bytearray((tmp_path / "good.npz").read_bytes())
    start = raw.index(b"train_images.npy") + 200  # inside that array's stored bytes
    raw[start : start + 64] = bytes(64)
    (tmp_path / "crc.npz").write_bytes(bytes(raw))
    with pytest.raises(DataError, match="cannot be read"):
        load_npz(tmp_path / "crc.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="found 0 .npz files"):
        load(f"tfds:{tmp_path / 'empty'}", tfds_dir=tmp_path / "tfds")


def test_duplicates_are_counted_within_and_across_splits_and_named_by_file(tmp_path):
    from cnn.data import DEFAULT_NPZ, find_duplicates

    assert DEFAULT_NPZ.name == "intel_landscapes_48.npz"
    data = tiny_splits(n_train=20, n_val=6, n_test=6, seed=3)
    data["val_images"][0] = data["train_images"][4]  # across splits, same label
    data["val_labels"][0] = data["train_labels"][4]
    data["test_images"][1] = data["train_images"][7]  # across splits, another label
    data["test_labels"][1] = (data["train_labels"][7] + 1) % 6
    data["train_images"][9] = data["train_images"][8]  # within train, three copies, one conflicting
    data["train_images"][10] = data["train_images"][8]
    data["train_labels"][9] = data["train_labels"][8]
    data["train_labels"][10] = (data["train_labels"][8] + 2) % 6
    for name in ("train", "val", "test"):
        data[f"{name}_files"] = np.array([f"{name}/{i}.jpg" for i in range(len(data[f"{name}_labels"]))])
    np.savez(tmp_path / "dups.npz", **data)
    found = find_duplicates(load_npz(tmp_path / "dups.npz"))
    assert (found.groups, found.images, found.across_splits, found.conflicting) == (3, 7, 2, 2)
    assert found.examples[0].startswith("train/7.jpg (train, ") and "= test/1.jpg (test, " in found.examples[0]
    assert "groups of identical images" in found.summary()
    clean = tiny_splits(seed=4)
    np.savez(tmp_path / "clean.npz", **clean)
    assert find_duplicates(load_npz(tmp_path / "clean.npz")).summary() is None


@pytest.mark.slow
def test_kaggle_folders(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, per_class in (("seg_train", 10), ("seg_test", 2)):
        for name in CLASS_NAMES:
            folder = tmp_path / split / split / name  # Kaggle's doubled folder
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (150, 150, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    splits = load_kaggle(tmp_path, val_fraction=0.2, seed=0)
    assert splits.train.images.shape == (48, 48, 48, 3) and splits.train.images.dtype == np.uint8
    assert np.bincount(splits.val.labels).tolist() == [2] * 6  # stratified
    assert len(splits.test) == 12
    # extensions in any case, hidden files and others skipped and counted
    forest = tmp_path / "seg_train" / "seg_train" / "forest"
    for name in ("upper.JPG", "mixed.Jpeg", "shot.png"):
        Image.fromarray(rng.integers(0, 255, (150, 150, 3), dtype=np.uint8)).save(forest / name, format="PNG" if name.endswith("png") else "JPEG")
    (forest / ".DS_Store").write_bytes(b"junk")
    (forest / "notes.txt").write_text("junk")
    lines = []
    splits = load_kaggle(tmp_path, val_fraction=0.2, seed=0, log=lines.append)
    assert len(splits.train) + len(splits.val) == 63
    assert lines[0].endswith("read 63 images (1 .JPG, 1 .Jpeg, 60 .jpg, 1 .png); skipped 1 hidden, 1 .txt"), lines
    shutil.rmtree(tmp_path / "seg_test")  # --evaluate on such a folder: one line
    with pytest.raises(DataError, match="no test split"):
        load(tmp_path, required=("test",))


@pytest.mark.slow
def test_cli_trains_resumes_identically_and_evaluates(tiny_npz, tmp_path, capsys):
    common = ["--data", str(tiny_npz), "--lr", "0.05", "0.01", "--batch-size", "8", "--quiet"]
    assert cnn_cli.main([*common, "--epochs", "3", "--out", str(tmp_path / "a")]) == 0
    # interrupted after 2 epochs, then the same command with --epochs 3
    assert cnn_cli.main([*common, "--epochs", "2", "--out", str(tmp_path / "b")]) == 0
    assert cnn_cli.main([*common, "--epochs", "3", "--out", str(tmp_path / "b")]) == 0
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())
    for lr in ("0.05", "0.01"):
        strip = lambda h: [(e["train_loss"], e["val_acc"], e["val_loss"]) for e in h]
        assert strip(a["runs"][lr]["history"]) == strip(b["runs"][lr]["history"])
    assert selection(a) == selection(b) and a["test"] == b["test"]
    assert a["params"] == 5_340_742 and a["model"] == "baseline"
    assert set(a) == {"part", "config", "model", "params", "devices", "processes", "runs", "selected", "test", "wall_s"}
    assert a["config"]["impl"] == "xla_cpu"  # --impl auto on a CPU
    for name in ("training_loss.png", "val_accuracy.png", "confusion_matrix.png"):
        assert_plot(tmp_path / "a" / name)
    assert len(a["runs"]["0.05"]["history"]) == 3
    # reruns that cannot resume this folder: one line each, before any array is read
    with pytest.raises(MoreEpochs, match="3 epochs, more than the 2 asked"):
        cnn_cli.main([*common, "--epochs", "2", "--out", str(tmp_path / "a")])
    with pytest.raises(OtherRun, match="other settings .*batch_norm: False"):
        cnn_cli.main([*common, "--epochs", "3", "--batch-norm", "--out", str(tmp_path / "a")])
    capsys.readouterr()
    # a rerun with part of the sweep says what its metrics.json leaves out
    assert cnn_cli.main(["--data", str(tiny_npz), "--lr", "0.01", "--batch-size", "8", "--quiet", "--epochs", "3",
                         "--out", str(tmp_path / "a")]) == 0
    assert "also holds lr_0.05 from another command" in capsys.readouterr().err

    capsys.readouterr()
    # --evaluate on a file holding only the test split reads the selected checkpoint: the same
    # accuracy as the training run's own test figure
    test_only = tmp_path / "test_only.npz"
    with np.load(tiny_npz) as data:
        np.savez(test_only, test_images=data["test_images"], test_labels=data["test_labels"])
    assert cnn_cli.main(["--evaluate", str(tmp_path / "a"), "--data", str(test_only)]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["test_acc"] == json.loads((tmp_path / "a" / "metrics.json").read_text())["test"]["acc"]


@pytest.mark.slow
def test_checkpoints_of_the_wrong_kind_or_damaged_are_one_line_errors(tiny_npz, tmp_path):
    from common.checkpoint import Checkpoints

    fake = Checkpoints(tmp_path / "p2g" / "ckpt")
    fake.save(0, {"w": np.zeros(3, np.float32)}, {"config": {"src_vocab": ["<pad>"]}, "history": []}, 0.5)
    fake.close()
    proc = run_cli("experiments.cnn", "--evaluate", str(tmp_path / "p2g"), "--data", str(tiny_npz))
    assert proc.returncode == 2 and "not a CNN checkpoint" in proc.stderr and "Traceback" not in proc.stderr
    cnn_run = tmp_path / "cnn"
    assert cnn_cli.main(["--data", str(tiny_npz), "--epochs", "2", "--quiet", "--out", str(cnn_run)]) == 0
    proc = run_cli("experiments.p2g", "test", "--checkpoint", str(cnn_run / "lr_0.01"))
    assert proc.returncode == 2 and "not a P2G checkpoint" in proc.stderr and "Traceback" not in proc.stderr
    # damage every stored array of the run's checkpoints
    for array_file in (cnn_run / "lr_0.01" / "ckpt").rglob("*"):
        if array_file.is_file() and "meta" not in str(array_file) and array_file.stat().st_size > 1000:
            array_file.write_bytes(array_file.read_bytes()[:100])
    proc = run_cli("experiments.cnn", "--evaluate", str(cnn_run / "lr_0.01"), "--data", str(tiny_npz))
    assert proc.returncode == 2 and "cannot be read" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.slow
def test_cli_trains_the_hopfield_pooling_variant(tiny_npz, tmp_path):
    out = tmp_path / "h"
    assert cnn_cli.main(["--data", str(tiny_npz), "--batch-norm", "--pool", "hopfield", "--epochs", "2", "--quiet",
                         "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == "batch_norm_hopfield_pool" and metrics["params"] == 822_150
    assert metrics["runs"]["0.01"]["config"]["pool"] == "hopfield"
    assert cnn_cli.main(["--evaluate", str(out), "--data", str(tiny_npz), "--quiet"]) == 0
    proc = run_cli("experiments.cnn", "--pool", "hopfield", "--data", str(tiny_npz))
    assert proc.returncode == 2 and "add --batch-norm" in proc.stderr


@pytest.mark.slow
def test_cli_trains_the_reference_impl_and_will_not_resume_it_with_the_other(tiny_npz, tmp_path):
    common = ["--data", str(tiny_npz), "--batch-norm", "--batch-size", "8", "--quiet", "--out", str(tmp_path)]
    assert cnn_cli.main([*common, "--epochs", "1", "--impl", "reference"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["config"]["impl"] == "reference" and metrics["runs"]["0.01"]["config"]["impl"] == "reference"
    assert metrics["params"] == 755_718
    with pytest.raises(OtherRun, match="impl: 'reference'"):
        cnn_cli.main([*common, "--epochs", "2", "--impl", "xla_cpu"])


KILLS = ((2, "before"), (1, "while"), (1, "after"), (2, "after"), (3, "before"), (1, "before"))


@pytest.mark.slow
def test_runs_killed_at_checkpoint_saves_resume_to_the_uninterrupted_metrics(tiny_npz, tmp_path):
    """SIGKILL at save after save (before, while and after writing), each time rerunning the same command: the last rerun ends with the metrics
    of a run that was never interrupted. Likewise after a save that fails for a full disk."""
    common = ["--data", str(tiny_npz), "--batch-size", "8", "--epochs", "4", "--quiet"]
    # in a process of its own, as the killed runs: the XLA:CPU settings apply only at a process's start
    assert run_cli("experiments.cnn", *common, "--out", str(tmp_path / "clean")).returncode == 0
    kill_at_saves_then_finish(KILLS, "experiments.cnn", *common, "--out", str(tmp_path / "killed"))
    # a disk that fills up at the third save: one line, exit 2; the same command then finishes
    proc = run_killed_at_save(3, "disk-full", "experiments.cnn", *common, "--out", str(tmp_path / "full"))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: No space left on device: {tmp_path / 'full' / 'lr_0.01' / 'ckpt'}"], proc.stderr
    assert run_cli("experiments.cnn", *common, "--out", str(tmp_path / "full")).returncode == 0
    clean, killed, full = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("clean", "killed", "full"))
    for run in (clean, killed, full):
        for record in run["runs"]["0.01"]["history"]:
            del record["seconds"]
    assert killed["runs"] == clean["runs"] and selection(killed) == selection(clean) and killed["test"] == clean["test"]
    assert full["runs"] == clean["runs"] and selection(full) == selection(clean) and full["test"] == clean["test"]


@pytest.mark.slow
def test_divergence_is_reported_and_the_sweep_goes_on(tiny_npz, tmp_path, capsys):
    assert cnn_cli.main(["--data", str(tiny_npz), "--lr", "1e6", "0.01", "--epochs", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "diverged" in out
    metrics = json.loads((tmp_path / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert metrics["runs"]["1e+06"]["diverged"] is True
    from experiments._plots import diverged_at  # what the plots mark with an x and in the legend

    assert diverged_at(metrics["runs"]["1e+06"]["history"]) is not None
    assert diverged_at(metrics["runs"]["0.01"]["history"]) is None
    assert metrics["selected"]["run"] == "0.01"


@pytest.mark.slow
def test_vmapped_sweep_follows_the_sequential_runs(tiny_npz, tmp_path):
    """--vmap-sweep trains the same models as one run per lr; a diverging member is reported and
    carried along without disturbing the others; an interrupted vmapped sweep resumes."""
    common = ["--data", str(tiny_npz), "--lr", "1e6", "0.05", "0.01", "--epochs", "2", "--quiet"]
    assert cnn_cli.main([*common, "--out", str(tmp_path / "seq")]) == 0
    assert cnn_cli.main([*common, "--epochs", "1", "--vmap-sweep", "--out", str(tmp_path / "vmap")]) == 0
    assert cnn_cli.main([*common, "--vmap-sweep", "--out", str(tmp_path / "vmap")]) == 0
    seq = json.loads((tmp_path / "seq" / "metrics.json").read_text())
    vmap = json.loads((tmp_path / "vmap" / "metrics.json").read_text())
    assert seq["runs"]["1e+06"]["diverged"] and vmap["runs"]["1e+06"]["diverged"]
    for lr in ("0.05", "0.01"):
        a, b = seq["runs"][lr]["history"], vmap["runs"][lr]["history"]
        assert len(a) == len(b) == 2
        np.testing.assert_allclose([e["train_loss"] for e in a], [e["train_loss"] for e in b], rtol=1e-4)
        np.testing.assert_allclose([e["val_loss"] for e in a], [e["val_loss"] for e in b], rtol=1e-4)
    assert seq["selected"]["run"] == vmap["selected"]["run"]


@pytest.mark.slow
def test_vmapped_step_of_the_bn_variant_matches_its_members():
    """One vmapped SGD step per member equals that member's own step: each member's parameter
    update (new - initial) agrees with its own to 1e-4 of the leaf's largest update (plus the
    rounding of the parameters themselves). The vmapped and the plain program may sum in
    different orders; float32 gradients of this step are within 1.4e-5 (the shipped XLA flags)
    to 3.4e-5 (XLA's defaults) of a float64 reference, relative to the leaf's largest entry, so
    1e-4 leaves room for rounding and none for a member trained with another's learning rate.
    Conv biases feeding a BatchNorm (:func:`feeds_batch_norm`) are left out."""
    from cnn import SweepTrainer

    data = tiny_splits(n_train=16)
    lrs = (1e6, 0.05, 0.01)
    sweep = SweepTrainer([Trainer(True, lr, 8) for lr in lrs])
    state = sweep.stack([member.init_state() for member in sweep.members])
    batch = {"images": data["train_images"][:8], "labels": data["train_labels"][:8].astype(np.int32)}
    state, losses = sweep._train_step(state, batch, np.int32(0))
    for i, lr in enumerate(lrs):
        trainer = Trainer(True, lr, 8)
        start = trainer.init_state()
        initial = [np.array(leaf) for leaf in jax.tree.leaves(start.params)]  # copied: the step donates start
        alone, loss = trainer._train_step(start, batch, np.int32(0))
        assert float(losses[i]) == pytest.approx(float(loss), rel=1e-6)
        ours = jax.tree_util.tree_flatten_with_path(sweep.member(state, i).params)[0]
        for (path, a), b, before in zip(ours, jax.tree.leaves(alone.params), initial):
            name = jax.tree_util.keystr(path)
            if feeds_batch_norm(name):
                continue
            update_a, update_b = np.asarray(a) - before, np.asarray(b) - before
            assert np.abs(update_b).max() > 0, name
            ulps = 4 * np.finfo(np.float32).eps * np.abs(before).max()  # new - initial is rounded to the parameter's ulp
            np.testing.assert_allclose(update_a, update_b, rtol=0, atol=1e-4 * np.abs(update_b).max() + ulps, err_msg=name)
        for a, b in zip(jax.tree.leaves(sweep.member(state, i).stats), jax.tree.leaves(alone.stats)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("command", [["experiments.cnn"], ["experiments.p2g", "train"], ["experiments.p2g", "test"],
                                     ["experiments.hopfield", "verify"], ["experiments.hopfield", "retrieve"]])
@pytest.mark.slow
def test_help_gives_every_option_a_line_and_the_homework_defaults(command):
    import re

    proc = run_cli(*command, "--help")
    assert proc.returncode == 0
    options = proc.stdout.split("options:")[1]
    entries = re.split(r"\n  (?=-)", options.strip())
    for entry in entries:
        assert len(entry.split(None, 2)) > 2 or "\n" in entry, f"no help line: {entry!r}"
    if command == ["experiments.cnn"]:
        for default in ("default: 40", "default: 8", "default: [0.01]", "intel_landscapes_48.npz"):
            assert default in " ".join(options.split()), default
    if command[-1] == "train":
        for default in ("default: 20", "default: 0.003", "default: 0.3", "default: 128", "default: 64"):
            assert default in " ".join(options.split()), default


def test_a_batch_larger_than_the_training_set_is_refused_before_anything_is_written(tiny_npz, tmp_path):
    with pytest.raises(cnn_cli.UserError, match="--batch-size 100 is more than the 48 training images"):
        cnn_cli.main(["--data", str(tiny_npz), "--batch-size", "100", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_ctrl_c_is_one_line_and_mentions_resuming_only_with_checkpoints(capsys, monkeypatch):
    from experiments import _cli

    monkeypatch.setitem(_cli._interrupted, "message", "interrupted")  # as a fresh process starts

    def interrupted(argv):
        raise KeyboardInterrupt

    def interrupted_after_checkpoints(argv):
        _cli.resumable_from("runs/x")
        raise KeyboardInterrupt

    for main, expected in ((interrupted, "interrupted\n"),
                           (interrupted_after_checkpoints,
                            "interrupted: rerun the same command to resume from the checkpoints in runs/x\n")):
        with pytest.raises(SystemExit) as exit_info:
            _cli.run(main, [])
        assert exit_info.value.code == 130 and capsys.readouterr().err == expected


@pytest.mark.slow
def test_cli_errors_are_one_line(tmp_path):
    for args, expected in (
        (["--data", str(tmp_path / "none.npz"), "--epochs", "1"], "no such file"),
        (["--lr", "-1"], "--lr"),
        (["--evaluate", str(tmp_path / "nothing")], "no such checkpoint"),
    ):
        proc = run_cli("experiments.cnn", *args)
        assert proc.returncode == 2, proc.stderr
        lines = [line for line in proc.stderr.splitlines() if "WARNING" not in line and line.strip()]
        assert len(lines) == 1 and expected in lines[0], proc.stderr


@pytest.mark.slow
def test_two_cpu_host_devices_leave_the_cnn_on_one(tiny_npz, tmp_path):
    """With two XLA:CPU host devices present (experiments.p2g creates them), the CNN still trains
    on one device, with the one-device losses: sharding its batch would sync the gradients
    through XLA:CPU's in-process all-reduce, which deadlocked on two cores."""
    import subprocess
    import sys

    results = {}
    for devices in (1, 2):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        out = tmp_path / f"d{devices}"
        code = (
            "import jax, json; from experiments import cnn; from cnn.train import default_devices; "
            "assert jax.local_device_count() == %d and len(default_devices()) == 1; "
            "cnn.main(['--data', %r, '--lr', '0.05', '--epochs', '2', '--out', %r, '--quiet'])"
        ) % (devices, str(tiny_npz), str(out))
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        results[devices] = json.loads((out / "metrics.json").read_text())["runs"]["0.05"]["history"]
    for one, two in zip(results[1], results[2]):
        assert one["train_loss"] == pytest.approx(two["train_loss"], rel=1e-6)
        assert one["val_loss"] == pytest.approx(two["val_loss"], rel=1e-6)


@pytest.mark.slow
def test_tfds_builder_matches_the_direct_reader(tmp_path):
    """The TFDS builder (manual dir: one .npz) yields the same arrays, without TensorFlow."""
    import sys

    from cnn.data import load

    manual = tmp_path / "manual"
    manual.mkdir()
    np.savez(manual / "scenes.npz", **tiny_splits(seed=2))
    via_tfds = load(f"tfds:{manual}", tfds_dir=tmp_path / "prepared")
    direct = load_npz(manual / "scenes.npz")
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(via_tfds, name).images, getattr(direct, name).images)
        np.testing.assert_array_equal(getattr(via_tfds, name).labels, getattr(direct, name).labels)
    assert "tensorflow" not in sys.modules
    # a changed source is prepared again, not read stale
    np.savez(manual / "scenes.npz", **tiny_splits(seed=3))
    again = load(f"tfds:{manual}", tfds_dir=tmp_path / "prepared")
    np.testing.assert_array_equal(again.train.labels, load_npz(manual / "scenes.npz").train.labels)
    (manual / "other.npz").write_bytes((manual / "scenes.npz").read_bytes())
    with pytest.raises(DataError, match="exactly one .npz"):
        load(f"tfds:{manual}", tfds_dir=tmp_path / "prepared")


def test_tuned_xla_flags_respect_the_users(monkeypatch):
    from common.xla_cpu import CPU_FLAGS, tune_cpu

    ours = "--xla_cpu_experimental_ynn_fusion_type"
    users = f"{ours}=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
    monkeypatch.setenv("XLA_FLAGS", f"{users} --xla_force_host_platform_device_count=2")
    added = tune_cpu()
    flags = os.environ["XLA_FLAGS"].split()
    assert users in flags and [f for f in flags if f.startswith(ours)] == [users]
    assert added == [f"{k}={v}" for k, v in CPU_FLAGS.items() if k != ours]
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    assert tune_cpu() == [f"{k}={v}" for k, v in CPU_FLAGS.items()]
    assert os.environ["XLA_FLAGS"].split()[0] == "--xla_force_host_platform_device_count=2"
    assert tune_cpu() == []  # idempotent
    monkeypatch.setenv("HW2_XLA_DEFAULTS", "1")
    monkeypatch.setenv("XLA_FLAGS", "")
    assert tune_cpu() == [] and os.environ["XLA_FLAGS"] == ""


def test_batch_norm_training_needs_two_examples_a_step_over_all_devices(tiny_npz, tmp_path, capsys):
    """One example a step: the head's BatchNorm would normalise it to its bias (no gradient below).
    Statistics are over the global batch, so one example on each of two devices trains."""
    from cnn import BatchNormBatchError
    from common.batching import epoch_key, step_key
    from common.parallel import global_batch

    data = tiny_splits(4, 2, 2)
    batch = {"images": data["train_images"], "labels": data["train_labels"].astype(np.int32)}
    one = Trainer(True, 0.01, 1, devices=jax.devices()[:1])
    with pytest.raises(BatchNormBatchError) as err:
        one.train_step(one.init_state(), {k: v[:1] for k, v in batch.items()}, jnp.int32(0))
    assert err.value.batch_size == 1
    # evaluation uses the running statistics: a batch of one is fine
    result = one.evaluate(one.init_state(), one.put(batch["images"][:1]), one.put(batch["labels"][:1]), batch=1)
    assert result["preds"].shape == (1,)
    two = Trainer(True, 0.01, 2, devices=jax.devices()[:2])
    state = two.init_state()
    split = global_batch(two.batch_sharding, {k: v[:2] for k, v in batch.items()})
    key = step_key(epoch_key(0, 0), state.step)
    grads = jax.jit(jax.grad(lambda p: two._loss(p, state.stats, split, key)[0]))(state.params)
    assert float(jnp.max(jnp.abs(grads["blocks"][0]["conv"]["kernel"][...]))) > 1e-3
    with pytest.raises(SystemExit) as exit_info:
        cnn_cli.main(["--data", str(tiny_npz), "--batch-norm", "--batch-size", "1", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "--batch-size 1 with --batch-norm" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def write_png16(path, pixels: np.ndarray) -> None:
    """A 16-bit PNG of ``pixels`` (H, W[, C]) uint16, C in 1..4 (Pillow cannot write 16-bit colour)."""
    import struct
    import zlib

    pixels = pixels.reshape(pixels.shape[:2] + (-1,))
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[pixels.shape[2]]
    raw = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", pixels.shape[1], pixels.shape[0], 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_every_image_mode_a_scene_folder_can_hold_loads_on_the_8_bit_scale(tmp_path):
    """PNG and JPEG files in each mode Pillow opens them in (1, L, LA, P, RGB, RGBA, I;16 with
    8- and 16-bit colour PNGs, CMYK JPEG) read as the 8-bit scene they hold: a 16-bit PNG is not
    clipped to white."""
    from PIL import Image

    from cnn.data import _read_folder

    y, x = np.mgrid[0:64, 0:64]
    scene = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).astype(np.uint8)  # mean about 126
    rgb, grey = Image.fromarray(scene), Image.fromarray(scene).convert("L")
    folder = tmp_path / "seg_train"
    for name in CLASS_NAMES:
        (folder / name).mkdir(parents=True)
    files = folder / "buildings"
    expected = {  # file -> the 8-bit image it holds
        "1.png": (rgb.convert("1"), rgb.convert("1")), "L.png": (grey, grey), "LA.png": (grey.convert("LA"), grey),
        "P.png": (rgb.quantize(64), rgb.quantize(64)), "RGB.png": (rgb, rgb), "RGBA.png": (rgb.convert("RGBA"), rgb),
        "I16.png": (Image.fromarray(np.asarray(grey).astype(np.uint16) * 257), grey),
        "L.jpg": (grey, grey), "RGB.jpg": (rgb, rgb), "CMYK.jpg": (rgb.convert("CMYK"), rgb),
    }
    for name, (img, _) in expected.items():
        img.save(files / name, quality=95) if name.endswith(".jpg") else img.save(files / name)
    wide = np.asarray(scene).astype(np.uint16) * 257
    write_png16(files / "grey16.png", np.asarray(grey).astype(np.uint16) * 257)
    write_png16(files / "LA16.png", np.stack([np.asarray(grey).astype(np.uint16) * 257, np.full((64, 64), 65535, np.uint16)], -1))
    write_png16(files / "RGB16.png", wide)
    write_png16(files / "RGBA16.png", np.concatenate([wide, np.full((64, 64, 1), 65535, np.uint16)], -1))
    expected.update({"grey16.png": (None, grey), "LA16.png": (None, grey), "RGB16.png": (None, rgb),
                     "RGBA16.png": (None, rgb)})
    assert Image.open(files / "I16.png").mode == "I;16" and Image.open(files / "CMYK.jpg").mode == "CMYK"
    images, _, names = _read_folder(folder)
    for image, name in zip(images, names):
        name = name.rsplit("/", 1)[1]
        want = np.asarray(expected[name][1].convert("RGB").resize((48, 48), Image.Resampling.LANCZOS), np.float64)
        error = np.abs(image - want).mean()
        assert error < (4 if name.endswith(".jpg") else 0.5), (name, image.mean(), want.mean())
    assert len(names) == len(expected)


def test_pixels_of_unknown_scale_or_without_an_rgb_conversion_are_refused_naming_the_file():
    from PIL import Image

    from cnn.data import rgb8

    for mode in Image.MODES:
        img = Image.new(mode, (4, 4))
        if mode in ("I", "F", "La"):  # no known scale (I, F); no conversion to RGB (La, premultiplied)
            with pytest.raises(DataError, match=f"scene.tif: .*mode {mode}"):
                rgb8(img, "scene.tif")
        else:
            assert rgb8(img, "scene.tif").mode == "RGB", mode
    values = np.array([[0, 257 * 100, 65535]])
    for mode, dtype in (("I;16", "<u2"), ("I;16B", ">u2"), ("I;16L", "<u2"), ("I;16N", "=u2")):
        img = Image.frombytes(mode, (3, 1), values.astype(dtype).tobytes())
        assert np.asarray(rgb8(img, "x.png"))[0, :, 0].tolist() == [0, 100, 255], mode
