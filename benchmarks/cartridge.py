"""A cartridge against the corpus in the prompt and against no context, side by side in one run.

Corpus and questions: ``benchmarks/data/cartridge`` by default (an invented island: facts no model can know), or
any directory holding ``corpus.md`` and ``questions.jsonl`` (``--corpus DIR``: ``ops-handbook``, ``chronicle``,
``pump-manual`` beside it), or ``--corpus FILE --questions FILE``. Three ways to answer the same questions with the
same frozen model (SmolLM2-135M-Instruct by default):

    no context   the question alone                                        (softprompts eval, no adapter)
    in context   the whole corpus as a system turn, then the question      (the teacher's own form)
    cartridge    the trained cartridge, then the question alone            (softprompts train --corpus; eval)

Quality: the log-perplexity of the gold answers (``ln`` of eval's perplexity over the answer tokens and the
end-of-turn token) and exact match / contains of greedy answers. The in-context gain is ``logppl(none) -
logppl(in context)``; the cartridge recovers ``(logppl(none) - logppl(cartridge)) / gain`` of it. Questions that
carry a ``kind`` (fact, number, name, relation, inference) are also scored kind by kind (``by_kind``: each kind's
questions alone, the same three ways: answer log-perplexity and its own recovered gain). Cost: KV bytes (the
corpus's positions vs the cartridge's), time to first token and ms per further token at batch 1
(``compare/latency.measure_latency``), and decoding throughput for 16 questions at once (``decode_batch``, 32 new
tokens each, no early stop).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/cartridge.py [--corpus DIR] [--virtual-tokens 128]
        [--conversations 256] [--steps 200] [--seed N] [--train-args "--teacher-top-k 20"] [--out runs/cartridge]

Prints a markdown table (docs/RESULTS.md "Cartridges") and writes ``results.json`` and ``results-RUN.json`` in
``--out`` (RUN: the cartridge's directory name, which holds the corpus, P, conversations, steps, seed and a hash of
``--train-args``; a cartridge already trained under that name is reused). ``--summarize`` prints one table of every
``results-*.json`` in ``--out``: runs on several corpora and seeds side by side.

``--sweep 64:2e-2,128:5e-3,...``: cartridges of those sizes and learning rates, every one distilled from the first
one's self-study conversations (``--self-study-data``), scored for quality only: how the defaults were chosen.

``--compose``: instead, cut the corpus in two halves at its middle heading, train one cartridge of P/2 tokens on
each (the same self-study budget per half), compose them (``softprompts compose``) and score the composition next to
each half alone on all the questions: does a composed pair stand in for the whole?
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import shlex
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

DATA = Path(__file__).parent / "data" / "cartridge"
WAYS = ("no context", "in context", "cartridge")


@dataclass(frozen=True)
class Corpus:
    """The text a cartridge stands in for and the questions that score it.

    ``questions``: chat rows ``{"messages": [user question, assistant gold answer], "kind": optional str}``;
    ``name``: the corpus's directory name (``island`` for the default), used in run names.
    """

    name: str
    text: Path
    questions: Path

    @property
    def default(self) -> bool:
        return (self.text.resolve() == (DATA / "corpus.md").resolve()
                and self.questions.resolve() == (DATA / "questions.jsonl").resolve())

    def rows(self) -> list[dict]:
        return [json.loads(line) for line in self.questions.read_text().splitlines() if line.strip()]

    def kinds(self) -> dict[str, int]:
        """Questions per kind in file order; empty when no row carries a ``kind``."""
        return dict(Counter(row["kind"] for row in self.rows() if "kind" in row))


def resolve_corpus(parser: argparse.ArgumentParser, corpus: str | None, questions: str | None) -> Corpus:
    """``--corpus DIR`` (its corpus.md and questions.jsonl), ``--corpus FILE --questions FILE``, or the island."""
    path = Path(corpus) if corpus else DATA
    if path.is_dir():
        text, name = path / "corpus.md", ("island" if path.resolve() == DATA.resolve() else path.name)
        found = Path(questions) if questions else path / "questions.jsonl"
    elif path.is_file():
        if not questions:
            parser.error(f"--corpus {path} is a file: give its questions with --questions FILE (or --corpus DIR)")
        folder = path.parent.resolve()
        name = path.stem if path.stem != "corpus" else "island" if folder == DATA.resolve() else folder.name
        text, found = path, Path(questions)
    else:
        parser.error(f"--corpus {path}: no such file or directory")
    for need in (text, found):
        if not need.is_file():
            parser.error(f"{need} not found: --corpus DIR needs corpus.md and questions.jsonl in DIR")
    chosen = Corpus(name, text, found)
    for number, row in enumerate(chosen.rows(), 1):
        roles = [m.get("role") for m in row.get("messages", [])]
        if roles != ["user", "assistant"]:
            parser.error(f"{found} line {number}: want messages [user question, assistant answer], got roles {roles}")
    return chosen


def cli(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("softprompts")), *args]


def run(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"failed: {' '.join(command)}\n{done.stderr[-3000:]}")
    return done.stdout


def quality(rows: Path, adapter: Path | None, max_tokens: int) -> dict:
    which = ["--adapter", str(adapter)] if adapter else ["--task", "generate"]
    out = run(cli("eval", *which, "--data", str(rows), "--max-new-tokens", str(max_tokens), "--json"))
    metrics = json.loads(out.strip().splitlines()[-1])
    return {"log_ppl": math.log(metrics["perplexity"]), "exact_match": metrics["exact_match"],
            "contains": metrics["contains"], "chrf": metrics["chrf"], "n": metrics.get("n")}


def recovered(none: dict, full: dict, cartridge: dict) -> float:
    """``(logppl(none) - logppl(cartridge)) / (logppl(none) - logppl(in context))``: the share of the gain kept."""
    gain = none["log_ppl"] - full["log_ppl"]
    return (none["log_ppl"] - cartridge["log_ppl"]) / gain if gain else math.nan


@dataclass(frozen=True)
class QuestionSets:
    """The question files one run scores: every question, and each kind's alone; each bare and with the corpus as a
    system turn (``in_context``). ``plain[""]`` / ``in_context[""]``: all questions."""

    plain: dict[str, Path]
    in_context: dict[str, Path]


def question_sets(corpus: Corpus, out: Path) -> QuestionSets:
    from softprompts.training.self_study import CONTEXT_INSTRUCTION

    folder = out / f"questions-{corpus.name}"
    folder.mkdir(parents=True, exist_ok=True)
    system = {"role": "system", "content": f"{CONTEXT_INSTRUCTION}\n\n{corpus.text.read_text().strip()}"}
    rows = corpus.rows()
    plain, in_context = {}, {}
    for kind in ["", *corpus.kinds()]:
        chosen = [row for row in rows if not kind or row.get("kind") == kind]
        stem = kind or "all"
        plain[kind] = folder / f"{stem}.jsonl"
        plain[kind].write_text("".join(json.dumps(row) + "\n" for row in chosen))
        in_context[kind] = folder / f"{stem}_in_context.jsonl"
        in_context[kind].write_text("".join(json.dumps({**row, "messages": [system, *row["messages"]]}) + "\n"
                                            for row in chosen))
    return QuestionSets(plain, in_context)


def score(sets: QuestionSets, adapter: Path | None, in_context: bool, max_tokens: int) -> dict:
    """One way's metrics on all questions (``""``), and the answer log-perplexity of each kind's questions alone.

    A kind's answers are teacher-forced only (``--max-new-tokens 1``: the perplexity does not depend on decoding, and
    greedy decoding of every question again would double the run's evaluation time)."""
    files = sets.in_context if in_context else sets.plain
    scored = {"": quality(files[""], adapter, max_tokens)}
    for kind, path in files.items():
        if kind:
            row = quality(path, adapter, 1)
            scored[kind] = {"log_ppl": row["log_ppl"], "n": row["n"]}
    return scored


def by_kind(rows: dict[str, dict]) -> dict[str, dict]:
    """Per kind: the three ways' metrics and the cartridge's recovered gain on that kind's questions."""
    kinds = [kind for kind in rows["no context"] if kind]
    return {kind: {**{way: rows[way][kind] for way in WAYS},
                   "recovered_gain": recovered(*(rows[way][kind] for way in WAYS))} for kind in kinds}


def serving_cost(adapter: Path | None, corpus_text: str, questions: list[str], batch: int = 16) -> dict:
    """TTFT and ms/token at batch 1 (median of 5), and tokens/s decoding ``batch`` questions at once."""
    import softprompts as sp
    from softprompts.compare.latency import kv_bytes_per_position, measure_latency
    from softprompts.model.decode_loop import decode_batch
    from softprompts.model.generation import GenerationRequest
    from softprompts.training.self_study import CONTEXT_INSTRUCTION, ContextFormat

    base = sp.load_base()
    fmt = ContextFormat(base.tokenizer)
    artifact = sp.load_adapter(adapter, base).artifact if adapter else None
    if artifact is None:  # the corpus in the prompt: system turn + question, as the teacher reads it
        system = {"role": "system", "content": f"{CONTEXT_INSTRUCTION}\n\n{corpus_text}"}
        prompts = [base.tokenize(fmt.chat.prompt_text([system, {"role": "user", "content": q}])) for q in questions]
        extra_positions = 0
    else:
        prompts = [base.tokenize(fmt.student_prompt(q)) for q in questions]
        artifact = base.serving_artifact(artifact)
        extra_positions = artifact.length
    latency = measure_latency(base, prompts[0], artifact, new_tokens=16, repeats=5)
    requests = [GenerationRequest(p, artifact, 32, stop_ids=frozenset()) for p in prompts[:batch]]
    decode_batch(base, requests[:2])  # warm-up
    started = time.perf_counter()
    results = decode_batch(base, requests)
    seconds = time.perf_counter() - started
    positions = len(prompts[0]) + extra_positions
    return {"ttft_ms": latency.ttft_ms, "per_token_ms": latency.per_token_ms, "prompt_tokens": len(prompts[0]),
            "context_positions": positions, "kv_mib_per_request": positions * kv_bytes_per_position(base) / 2**20,
            "batch_tokens_per_s": sum(len(r.tokens) for r in results) / seconds}


def parse_args() -> tuple[argparse.Namespace, Corpus]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default=None, metavar="DIR|FILE",
                        help="a directory with corpus.md and questions.jsonl, or a text file with --questions "
                             "(default: the island, benchmarks/data/cartridge)")
    parser.add_argument("--questions", default=None, metavar="FILE",
                        help="chat rows: [user question, assistant answer], optional 'kind' (default: the corpus's)")
    parser.add_argument("--virtual-tokens", type=int, default=128)
    parser.add_argument("--conversations", type=int, default=256)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", default=None)
    parser.add_argument("--seed", type=int, default=None, help="train's --seed (default: train's own default)")
    parser.add_argument("--train-args", default="", metavar="FLAGS",
                        help='further flags for softprompts train, e.g. "--chunk-tokens 256 --teacher-top-k 20"')
    parser.add_argument("--max-tokens", type=int, default=24, help="new tokens of a greedy answer")
    parser.add_argument("--out", default="runs/cartridge")
    parser.add_argument("--compose", action="store_true", help="two half-corpus cartridges, composed")
    parser.add_argument("--sweep", default=None, metavar="P:LR,...",
                        help="cartridges of these sizes and learning rates on one set of conversations (quality only)")
    parser.add_argument("--summarize", action="store_true", help="one table of every results-*.json in --out")
    parser.add_argument("--serving", default=None, help=argparse.SUPPRESS)  # internal: one way's serving cost
    args = parser.parse_args()
    return args, resolve_corpus(parser, args.corpus, args.questions)


def main() -> None:
    args, corpus = parse_args()
    out = Path(args.out)
    if args.serving is not None:
        cost = serving_cost(Path(args.serving) if args.serving else None, corpus.text.read_text().strip(),
                            [q["messages"][0]["content"] for q in corpus.rows()])
        print(json.dumps(cost))
        return
    if args.summarize:
        return print(summary_table(out))
    out.mkdir(parents=True, exist_ok=True)
    if args.compose:
        return composed(args, out, corpus)
    if args.sweep:
        return sweep(args, out, corpus)
    sets = question_sets(corpus, out)
    adapter = out / run_name(corpus, args, args.virtual_tokens, args.conversations)
    started = time.perf_counter()
    train(corpus.text, adapter, args, args.virtual_tokens, args.conversations)
    print(f"{adapter} ready after {time.perf_counter() - started:.0f} s", file=sys.stderr)
    record = json.loads((adapter / "training.json").read_text())
    summary = json.loads((adapter / "cartridge.json").read_text())
    scored = {"no context": score(sets, None, False, args.max_tokens), "in context": score(sets, None, True,
              args.max_tokens), "cartridge": score(sets, adapter, False, args.max_tokens)}
    rows = {way: scored[way][""] for way in WAYS}
    where = ["--corpus", str(corpus.text), "--questions", str(corpus.questions), "--serving"]
    costs = {way: json.loads(run([sys.executable, __file__, *where, path]).strip().splitlines()[-1])
             for way, path in (("in context", ""), ("cartridge", str(adapter)))}
    results = {"args": vars(args), "run": adapter.name,
               "corpus": {"name": corpus.name, "text": str(corpus.text), "questions": str(corpus.questions),
                          "kinds": corpus.kinds()},
               "quality": rows, "cost": costs, "recovered_gain": recovered(*rows.values()),
               "by_kind": by_kind(scored), "kv_bytes": summary["kv_bytes"], "corpus_tokens": summary["corpus_tokens"],
               "train_seconds": record["timings"]["train_seconds"]}
    for path in (out / "results.json", out / f"results-{adapter.name}.json"):
        path.write_text(json.dumps(results, indent=2))
    print(table(results))


def run_name(corpus: Corpus, args, virtual: int, conversations: int, lr: str | None = None) -> str:
    """The cartridge's directory name: ``cartridge[-CORPUS]-pP-cC-sS[-lrLR][-seedN][-xHASH]``, HASH of
    ``--train-args``; the island's runs keep their old names (``cartridge-p128-c256-s200``)."""
    return (f"{run_prefix(corpus)}-p{virtual}-c{conversations}-s{args.steps}" + (f"-lr{lr}" if lr else "")
            + run_suffix(args))


def run_prefix(corpus: Corpus) -> str:
    return "cartridge" + ("" if corpus.default else f"-{corpus.name}")


def run_suffix(args) -> str:
    """What else makes a run's conversations differ: its seed and its further train flags."""
    seed = f"-seed{args.seed}" if args.seed is not None else ""
    return seed + ("-x" + hashlib.sha256(args.train_args.encode()).hexdigest()[:8] if args.train_args else "")


def train(corpus: Path, adapter: Path, args, virtual: int, conversations: int, lr: str | None = None,
          reuse: Path | None = None) -> None:
    """``softprompts train --corpus`` unless ``adapter`` exists; ``reuse``: an earlier run's conversations."""
    lr = lr or args.lr
    if not adapter.is_dir():
        run(cli("train", "--corpus", str(corpus), "--virtual-tokens", str(virtual), "--conversations",
                str(conversations), "--steps", str(args.steps), *(["--lr", lr] if lr else []),
                *(["--seed", str(args.seed)] if args.seed is not None else []), *shlex.split(args.train_args),
                *(["--self-study-data", str(reuse)] if reuse else []), "--out", str(adapter), "--resume",
                "--no-progress"))


def sweep(args, out: Path, corpus: Corpus) -> None:
    """Cartridges of several sizes and learning rates on ONE set of self-study conversations (the first run's, reused
    by the others), scored against no context and the corpus in context."""
    sets = question_sets(corpus, out)
    none, full = score(sets, None, False, args.max_tokens), score(sets, None, True, args.max_tokens)
    gain = none[""]["log_ppl"] - full[""]["log_ppl"]
    lines = [f"{corpus.name}: no context: log-ppl {none['']['log_ppl']:.3f}, contains {none['']['contains']:.1f}; "
             f"corpus in context: {full['']['log_ppl']:.3f}, {full['']['contains']:.1f}", "",
             "| P | lr | x corpus KV | answer log-ppl | recovered | contains | chrF |", "|---|---|---|---|---|---|---|"]
    same = re.compile(rf"{re.escape(run_prefix(corpus))}-p\d+-c{args.conversations}-s\d+(-lr[0-9.eE+-]+)?"
                      rf"{re.escape(run_suffix(args))}")
    earlier = sorted(path for path in out.glob("*/self_study.jsonl") if same.fullmatch(path.parent.name))
    reuse, rows = (earlier[0] if earlier else None), []
    for point in args.sweep.split(","):
        virtual, lr = point.split(":")
        adapter = out / run_name(corpus, args, int(virtual), args.conversations, lr)
        train(corpus.text, adapter, args, int(virtual), args.conversations, lr, reuse)
        reuse = reuse or adapter / "self_study.jsonl"
        scored = score(sets, adapter, False, args.max_tokens)
        row = scored[""]
        kv = json.loads((adapter / "cartridge.json").read_text())["kv_bytes"]
        rows.append({"virtual_tokens": int(virtual), "lr": float(lr), **row, "recovered_gain": recovered(
            none[""], full[""], row), "by_kind": {k: recovered(none[k], full[k], scored[k]) for k in scored if k}})
        lines.append(f"| {virtual} | {lr} | {kv['cartridge'] / kv['corpus_in_context']:.2f} | {row['log_ppl']:.3f} | "
                     f"{100 * (none['']['log_ppl'] - row['log_ppl']) / gain:.0f}% | {row['contains']:.1f} | "
                     f"{row['chrf']:.1f} |")
        print(lines[-1], flush=True)
    (out / f"sweep_results-{corpus.name}.json").write_text(json.dumps(
        {"args": vars(args), "corpus": corpus.name, "none": none, "in_context": full, "rows": rows}, indent=2))
    print("\n".join(lines))


def composed(args, out: Path, corpus: Corpus) -> None:
    """Two cartridges of P/2 tokens, one per half of the corpus, alone and composed, on every question."""
    lines = corpus.text.read_text().strip().splitlines()
    headings = [i for i, line in enumerate(lines) if line.startswith("## ")]
    middle = headings[len(headings) // 2]
    halves = {"first half": "\n".join(lines[:middle]), "second half": "\n".join(lines[middle:])}
    prefix = "" if corpus.default else f"{corpus.name}-"
    adapters = {}
    for name, text in halves.items():
        path = out / f"{prefix}{name.replace(' ', '-')}.md"
        path.write_text(text + "\n")
        adapters[name] = out / f"cartridge-{prefix}{name.replace(' ', '-')}-p{args.virtual_tokens // 2}-s{args.steps}"
        train(path, adapters[name], args, args.virtual_tokens // 2, args.conversations // 2)
    both = out / f"composed-{prefix}p{args.virtual_tokens}-s{args.steps}"
    if not both.is_dir():
        run(cli("compose", *map(str, adapters.values()), "--out", str(both)))
    questions = corpus.questions
    rows = {"no context": quality(questions, None, args.max_tokens),
            **{name: quality(questions, path, args.max_tokens) for name, path in adapters.items()},
            "composed": quality(questions, both, args.max_tokens)}
    (out / f"compose_results{'' if corpus.default else '-' + corpus.name}.json").write_text(
        json.dumps({"args": vars(args), "quality": rows}, indent=2))
    print("| cartridge | answer log-ppl | contains | chrF |\n|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['log_ppl']:.3f} | {row['contains']:.1f} | {row['chrf']:.1f} |")


def table(results: dict) -> str:
    args, rows, costs = results["args"], results["quality"], results["cost"]
    kv = results["kv_bytes"]
    lines = [f"corpus {results['corpus']['name']}, {results['corpus_tokens']} tokens; cartridge "
             f"{args['virtual_tokens']} virtual tokens ({kv['cartridge'] / kv['corpus_in_context']:.2f}x the corpus's "
             f"KV), {args['conversations']} self-study conversations, {args['steps']} steps "
             f"({results['train_seconds']:.0f} s of distillation)",
             "", "| context | answer log-ppl | exact match | contains | chrF | TTFT ms | ms/token | KV MiB/request | "
             "tokens/s (16 at once) |", "|" + "---|" * 9]
    for name, row in rows.items():
        cost = costs.get(name)
        timing = (f"{cost['ttft_ms']:.0f} | {cost['per_token_ms']:.1f} | {cost['kv_mib_per_request']:.1f} | "
                  f"{cost['batch_tokens_per_s']:.0f}") if cost else "- | - | - | -"
        lines.append(f"| {name} | {row['log_ppl']:.3f} | {row['exact_match']:.1f} | {row['contains']:.1f} | "
                     f"{row['chrf']:.1f} | {timing} |")
    lines.append("")
    lines.append(f"The cartridge recovers {100 * results['recovered_gain']:.0f}% of the in-context gain in answer "
                 "log-perplexity.")
    if results["by_kind"]:
        lines += ["", "| kind | questions | answer log-ppl: no context | in context | cartridge | recovered |",
                  "|" + "---|" * 6]
        for kind, row in results["by_kind"].items():
            lines.append(f"| {kind} | {results['corpus']['kinds'][kind]} | " + " | ".join(
                f"{row[way]['log_ppl']:.3f}" for way in WAYS) + f" | {100 * row['recovered_gain']:.0f}% |")
    return "\n".join(lines)


def summary_table(out: Path) -> str:
    """Every ``results-*.json`` in ``out`` as one row: corpus, settings, the three log-ppls, recovered overall and
    per kind."""
    runs = [json.loads(path.read_text()) for path in sorted(out.glob("results-*.json"))]
    if not runs:
        sys.exit(f"no results-*.json in {out}: run benchmarks/cartridge.py --out {out} first")
    kinds = list(dict.fromkeys(kind for r in runs for kind in r["by_kind"]))
    lines = ["| corpus | P | conv. | steps | seed | train args | log-ppl none / in context / cartridge | recovered | "
             + " | ".join(f"{kind}" for kind in kinds) + " |", "|" + "---|" * (8 + len(kinds))]
    for r in runs:
        a, q = r["args"], r["quality"]
        per = [f"{100 * r['by_kind'][k]['recovered_gain']:.0f}%" if k in r["by_kind"] else "-" for k in kinds]
        lines.append(f"| {r['corpus']['name']} | {a['virtual_tokens']} | {a['conversations']} | {a['steps']} | "
                     f"{a['seed'] if a['seed'] is not None else '-'} | {a['train_args'] or '-'} | "
                     + " / ".join(f"{q[w]['log_ppl']:.2f}" for w in WAYS)
                     + f" | {100 * r['recovered_gain']:.0f}% | " + " | ".join(per) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
