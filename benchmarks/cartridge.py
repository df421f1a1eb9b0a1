"""A cartridge against the corpus in the prompt and against no context, side by side in one run.

Corpus and questions: ``benchmarks/data/cartridge`` (an invented island: facts no model can know). Three ways to
answer the same 40 questions with the same frozen model (SmolLM2-135M-Instruct by default):

    no context   the question alone                                        (softprompts eval, no adapter)
    in context   the whole corpus as a system turn, then the question      (the teacher's own form)
    cartridge    the trained cartridge, then the question alone            (softprompts train --corpus; eval)

Quality: the log-perplexity of the gold answers (``ln`` of eval's perplexity over the answer tokens and the
end-of-turn token) and exact match / contains of greedy answers. The in-context gain is ``logppl(none) -
logppl(in context)``; the cartridge recovers ``(logppl(none) - logppl(cartridge)) / gain`` of it. Cost: KV bytes
(the corpus's positions vs the cartridge's), time to first token and ms per further token at batch 1
(``compare/latency.measure_latency``), and decoding throughput for 16 questions at once (``decode_batch``, 32 new
tokens each, no early stop).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/cartridge.py [--virtual-tokens 128] [--conversations 256]
        [--steps 200] [--out runs/cartridge]

Prints a markdown table (docs/RESULTS.md "Cartridges") and writes ``results.json`` in ``--out``.

``--sweep 64:2e-2,128:5e-3,...``: cartridges of those sizes and learning rates, every one distilled from the first
one's self-study conversations (``--self-study-data``), scored for quality only: how the defaults were chosen.

``--compose``: instead, cut the corpus in two halves at its middle heading, train one cartridge of P/2 tokens on
each (the same self-study budget per half), compose them (``softprompts compose``) and score the composition next to
each half alone on all the questions: does a composed pair stand in for the whole?
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

DATA = Path(__file__).parent / "data" / "cartridge"


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
            "contains": metrics["contains"], "chrf": metrics["chrf"]}


def serving_cost(adapter: Path | None, corpus_text: str, questions: list[str], batch: int = 16) -> dict:
    """TTFT and ms/token at batch 1 (median of 5), and tokens/s decoding ``batch`` questions at once."""
    import softprompts as sp
    from softprompts.compare.latency import kv_bytes_per_position, measure_latency
    from softprompts.model.decode import decode_batch
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--virtual-tokens", type=int, default=128)
    parser.add_argument("--conversations", type=int, default=256)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", default=None)
    parser.add_argument("--max-tokens", type=int, default=24, help="new tokens of a greedy answer")
    parser.add_argument("--out", default="runs/cartridge")
    parser.add_argument("--compose", action="store_true", help="two half-corpus cartridges, composed")
    parser.add_argument("--sweep", default=None, metavar="P:LR,...",
                        help="cartridges of these sizes and learning rates on one set of conversations (quality only)")
    parser.add_argument("--serving", default=None, help=argparse.SUPPRESS)  # internal: one way's serving cost
    args = parser.parse_args()
    out = Path(args.out)
    corpus = DATA / "corpus.md"
    questions = [json.loads(line) for line in (DATA / "questions.jsonl").read_text().splitlines() if line]
    if args.serving is not None:
        cost = serving_cost(Path(args.serving) if args.serving else None, corpus.read_text().strip(),
                            [q["messages"][0]["content"] for q in questions])
        print(json.dumps(cost))
        return
    out.mkdir(parents=True, exist_ok=True)
    if args.compose:
        return composed(args, out, corpus)
    if args.sweep:
        return sweep(args, out, corpus)
    from softprompts.training.self_study import CONTEXT_INSTRUCTION

    in_context = out / "questions_in_context.jsonl"
    system = {"role": "system", "content": f"{CONTEXT_INSTRUCTION}\n\n{corpus.read_text().strip()}"}
    in_context.write_text("".join(json.dumps({"messages": [system, *q["messages"]]}) + "\n" for q in questions))
    adapter = out / f"cartridge-p{args.virtual_tokens}-c{args.conversations}-s{args.steps}"
    started = time.perf_counter()
    train(corpus, adapter, args, args.virtual_tokens, args.conversations)
    print(f"{adapter} ready after {time.perf_counter() - started:.0f} s", file=sys.stderr)
    record = json.loads((adapter / "training.json").read_text())
    summary = json.loads((adapter / "cartridge.json").read_text())
    rows = {
        "no context": quality(DATA / "questions.jsonl", None, args.max_tokens),
        "in context": quality(in_context, None, args.max_tokens),
        "cartridge": quality(DATA / "questions.jsonl", adapter, args.max_tokens),
    }
    costs = {"in context": json.loads(run([sys.executable, __file__, "--serving", ""]).strip().splitlines()[-1]),
             "cartridge": json.loads(run([sys.executable, __file__, "--serving", str(adapter)]).strip()
                                     .splitlines()[-1])}
    gain = rows["no context"]["log_ppl"] - rows["in context"]["log_ppl"]
    recovered = (rows["no context"]["log_ppl"] - rows["cartridge"]["log_ppl"]) / gain if gain else math.nan
    results = {"args": vars(args), "quality": rows, "cost": costs, "recovered_gain": recovered,
               "kv_bytes": summary["kv_bytes"], "corpus_tokens": summary["corpus_tokens"],
               "train_seconds": record["timings"]["train_seconds"]}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(table(results))


def train(corpus: Path, adapter: Path, args, virtual: int, conversations: int, lr: str | None = None,
          reuse: Path | None = None) -> None:
    """``softprompts train --corpus`` unless ``adapter`` exists; ``reuse``: an earlier run's conversations."""
    lr = lr or args.lr
    if not adapter.is_dir():
        run(cli("train", "--corpus", str(corpus), "--virtual-tokens", str(virtual), "--conversations",
                str(conversations), "--steps", str(args.steps), *(["--lr", lr] if lr else []),
                *(["--self-study-data", str(reuse)] if reuse else []), "--out", str(adapter), "--resume",
                "--no-progress"))


def sweep(args, out: Path, corpus: Path) -> None:
    """Cartridges of several sizes and learning rates on ONE set of self-study conversations (the first run's, reused
    by the others), scored against no context and the corpus in context."""
    from softprompts.training.self_study import CONTEXT_INSTRUCTION

    in_context = out / "questions_in_context.jsonl"
    system = {"role": "system", "content": f"{CONTEXT_INSTRUCTION}\n\n{corpus.read_text().strip()}"}
    questions = [json.loads(line) for line in (DATA / "questions.jsonl").read_text().splitlines() if line]
    in_context.write_text("".join(json.dumps({"messages": [system, *q["messages"]]}) + "\n" for q in questions))
    none, full = (quality(DATA / "questions.jsonl", None, args.max_tokens), quality(in_context, None, args.max_tokens))
    gain = none["log_ppl"] - full["log_ppl"]
    lines = [f"no context: log-ppl {none['log_ppl']:.3f}, contains {none['contains']:.1f}; corpus in context: "
             f"{full['log_ppl']:.3f}, {full['contains']:.1f}", "",
             "| P | lr | x corpus KV | answer log-ppl | recovered | contains | chrF |", "|---|---|---|---|---|---|---|"]
    earlier = sorted(out.glob(f"cartridge-p*-c{args.conversations}-s*/self_study.jsonl"))
    reuse, rows = (earlier[0] if earlier else None), []
    for point in args.sweep.split(","):
        virtual, lr = point.split(":")
        adapter = out / f"cartridge-p{virtual}-c{args.conversations}-s{args.steps}-lr{lr}"
        train(corpus, adapter, args, int(virtual), args.conversations, lr, reuse)
        reuse = reuse or adapter / "self_study.jsonl"
        row = quality(DATA / "questions.jsonl", adapter, args.max_tokens)
        kv = json.loads((adapter / "cartridge.json").read_text())["kv_bytes"]
        rows.append({"virtual_tokens": int(virtual), "lr": float(lr), **row})
        lines.append(f"| {virtual} | {lr} | {kv['cartridge'] / kv['corpus_in_context']:.2f} | {row['log_ppl']:.3f} | "
                     f"{100 * (none['log_ppl'] - row['log_ppl']) / gain:.0f}% | {row['contains']:.1f} | "
                     f"{row['chrf']:.1f} |")
        print(lines[-1], flush=True)
    (out / "sweep_results.json").write_text(json.dumps({"args": vars(args), "none": none, "in_context": full,
                                                        "rows": rows}, indent=2))
    print("\n".join(lines))


def composed(args, out: Path, corpus: Path) -> None:
    """Two cartridges of P/2 tokens, one per half of the corpus, alone and composed, on every question."""
    lines = corpus.read_text().strip().splitlines()
    headings = [i for i, line in enumerate(lines) if line.startswith("## ")]
    middle = headings[len(headings) // 2]
    halves = {"first half": "\n".join(lines[:middle]), "second half": "\n".join(lines[middle:])}
    adapters = {}
    for name, text in halves.items():
        path = out / f"{name.replace(' ', '-')}.md"
        path.write_text(text + "\n")
        adapters[name] = out / f"cartridge-{name.replace(' ', '-')}-p{args.virtual_tokens // 2}-s{args.steps}"
        train(path, adapters[name], args, args.virtual_tokens // 2, args.conversations // 2)
    both = out / f"composed-p{args.virtual_tokens}-s{args.steps}"
    if not both.is_dir():
        run(cli("compose", *map(str, adapters.values()), "--out", str(both)))
    questions = DATA / "questions.jsonl"
    rows = {"no context": quality(questions, None, args.max_tokens),
            **{name: quality(questions, path, args.max_tokens) for name, path in adapters.items()},
            "composed": quality(questions, both, args.max_tokens)}
    (out / "compose_results.json").write_text(json.dumps({"args": vars(args), "quality": rows}, indent=2))
    print("| cartridge | answer log-ppl | contains | chrF |\n|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['log_ppl']:.3f} | {row['contains']:.1f} | {row['chrf']:.1f} |")


def table(results: dict) -> str:
    args, rows, costs = results["args"], results["quality"], results["cost"]
    kv = results["kv_bytes"]
    lines = [f"corpus {results['corpus_tokens']} tokens; cartridge {args['virtual_tokens']} virtual tokens "
             f"({kv['cartridge'] / kv['corpus_in_context']:.2f}x the corpus's KV), {args['conversations']} "
             f"self-study conversations, {args['steps']} steps ({results['train_seconds']:.0f} s of distillation)",
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
    return "\n".join(lines)


if __name__ == "__main__":
    main()
