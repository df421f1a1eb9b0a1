"""Self-study (Eyuboglu et al. 2025): the model writes conversations about its corpus, with a chunk in its context.

For every conversation ``i`` (``SelfStudyConfig.conversations`` of them) a chunk ``c_i`` of the corpus and a seed
kind are drawn (seeded); the teacher context is the chunk as a system turn (``ContextFormat.context_text``)::

    question_i = base.generate(context(c_i) + user: SEED_PROMPTS[kind_i])        (phase 1; "recite" skips it)
    answer_i   = base.generate(context(c_i) + user: question_i)                  (phase 2)

Both phases run through our own batched decode loop (``model.decode_loop.decode_batch``), the chunk's KV computed once
per chunk (``base.text_to_kv``) and given to its rows as a KV prefix (exactly the chunk in the prompt), sampling
seeded per row. The conversations are plain ``messages`` rows (what a user would send: no chunk in them) plus the
generated answer's token ids, the chunk and the kind; they are written as JSONL (``save`` / ``load``) so a run can
be inspected and resumed without generating again.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from softprompts.data.chat import ChatFormat
from softprompts.data.corpus import Chunk
from softprompts.errors import DataError, SoftpromptsError
from softprompts.files import atomic_text
from softprompts.model.decode_loop import decode_batch
from softprompts.model.generation import GenerationRequest, Sampling
from softprompts.tasks import turn_stop_ids
from softprompts.training.config import SelfStudyConfig

CONTEXT_INSTRUCTION = "Use the document below to answer questions about it."
# What user A is asked to write, by kind: the paper's seed kinds (question, summary, quote, reasoning, explanation)
# and "recite", a fixed request to repeat the chunk, which distills its literal content.
SEED_PROMPTS = {
    "question": "Write one specific question about a fact in the document. Write only the question.",
    "fact": "Ask about a name, a number or a date given in the document. Write only the question.",
    "summary": "Ask for a short summary of one part of the document. Write only the request.",
    "quote": "Ask for the exact sentence of the document that states one specific fact. Write only the request.",
    "reasoning": "Write a question whose answer needs two facts from the document. Write only the question.",
    "explain": "Ask to explain one thing the document describes. Write only the request.",
    "recite": None,
}
RECITE_QUESTION = "What does the document say? Repeat it word for word."


class ContextFormat:
    """How a chunk sits in the teacher's context and how the same conversation reads without it, both through the
    model's chat template (turns must render one after another: the chunk's system turn is a prefix of the whole)."""

    def __init__(self, tokenizer) -> None:
        self.chat = ChatFormat(tokenizer, "start", None, "generate")  # refuses a tokenizer without a chat template

    def context_text(self, chunk: str) -> str:
        """The chunk as the teacher reads it: a system turn with ``CONTEXT_INSTRUCTION``."""
        return self.chat.tokenizer.apply_chat_template(self._system(chunk), add_generation_prompt=False,
                                                       tokenize=False)

    def teacher_prompt(self, context: str, chunk: str, user: str) -> str:
        """What follows ``context`` (``context_text(chunk)``) for the user turn ``user``, up to the answer."""
        full = self.chat.tokenizer.apply_chat_template([*self._system(chunk), {"role": "user", "content": user}],
                                                       add_generation_prompt=True, tokenize=False)
        if not full.startswith(context):
            raise SoftpromptsError("this chat template does not render turns one after another (the system turn "
                                   "holding the document is not a prefix of the conversation), so the document "
                                   "cannot be cached as a prefix for self-study")
        return full[len(context):]

    def student_prompt(self, user: str) -> str:
        """The conversation as a user sends it (no document): what the cartridge is trained in front of."""
        return self.chat.prompt_text([{"role": "user", "content": user}])

    @staticmethod
    def _system(chunk: str) -> list[dict]:
        return [{"role": "system", "content": f"{CONTEXT_INSTRUCTION}\n\n{chunk}"}]


class ChunkContexts:
    """The chunks as the teacher reads them, each computed once and shared by self-study and the teacher:
    ``text(c)`` (``ContextFormat.context_text``), ``kv(c)`` (its KV prefix, exactly the chunk in the prompt) and
    ``prompt_ids(c, user)`` (what follows it for a user turn)."""

    def __init__(self, base, chunks: list[Chunk], fmt: ContextFormat) -> None:
        self.base, self.chunks, self.fmt = base, chunks, fmt
        self.texts = [fmt.context_text(c.text) for c in chunks]
        self._kv: dict[int, object] = {}

    def kv(self, index: int):
        if index not in self._kv:
            self._kv[index] = self.base.text_to_kv(self.base.tokenize(self.texts[index]))
        return self._kv[index]

    def prompt_ids(self, index: int, user: str) -> list[int]:
        return self.base.tokenize(self.fmt.teacher_prompt(self.texts[index], self.chunks[index].text, user))


@dataclass(frozen=True)
class Conversation:
    """One self-study conversation: ``question`` (the user turn), ``answer`` and its token ids as generated (with
    the stop token that ended it, when one did), the chunk it was generated from and its seed kind."""

    question: str
    answer: str
    answer_ids: list[int]
    chunk: int
    kind: str

    def to_row(self, corpus_sha256: str, recipe: dict) -> dict:
        return {"messages": [{"role": "user", "content": self.question},
                             {"role": "assistant", "content": self.answer}],
                "answer_ids": self.answer_ids, "chunk": self.chunk, "kind": self.kind,
                "corpus_sha256": corpus_sha256, "recipe": recipe}


def plan(chunks: list[Chunk], config: SelfStudyConfig) -> list[tuple[int, str]]:
    """``(chunk index, kind)`` per conversation: every chunk in turn (a seeded shuffle per round), kinds drawn."""
    rng = random.Random(config.seed)
    order: list[int] = []
    while len(order) < config.conversations:
        round_ = list(range(len(chunks)))
        rng.shuffle(round_)
        order += round_
    kinds = list(SEED_PROMPTS)
    return [(c, rng.choice(kinds)) for c in order[: config.conversations]]


def generate_conversations(base, chunks: list[Chunk], fmt: ContextFormat, config: SelfStudyConfig,
                           progress: bool = True, contexts: ChunkContexts | None = None) -> list[Conversation]:
    """Both phases of self-study over ``plan(chunks, config)`` (module docstring); ``contexts``: the chunks' contexts
    and KV when the caller shares them with the teacher."""
    problems = config.errors()
    if problems:
        raise SoftpromptsError("; ".join(problems))
    contexts = contexts or ChunkContexts(base, chunks, fmt)
    stops = turn_stop_ids(base, fmt.chat)
    rows = plan(chunks, config)
    asks = [RECITE_QUESTION if SEED_PROMPTS[kind] is None else SEED_PROMPTS[kind] for _, kind in rows]

    def run(users: list[str], indices: list[int], max_new: int, phase: int, desc: str) -> dict[int, list]:
        done = {}
        bar = tqdm(total=len(indices), desc=desc, disable=not progress, leave=False)
        for start in range(0, len(indices), config.batch_size):
            batch = indices[start : start + config.batch_size]
            requests = [GenerationRequest(
                contexts.prompt_ids(rows[i][0], users[i]), contexts.kv(rows[i][0]), max_new,
                Sampling(temperature=config.temperature, seed=config.seed * 1_000_003 + 2 * i + phase), stops)
                for i in batch]
            for i, result in zip(batch, decode_batch(base, requests), strict=True):
                done[i] = result.tokens + ([result.stop_token] if result.stop_token is not None else [])
            bar.update(len(batch))
        bar.close()
        return done

    asking = [i for i, (_, kind) in enumerate(rows) if SEED_PROMPTS[kind] is not None]
    generated = run(asks, asking, config.question_tokens, 0, "self-study: questions")
    questions = list(asks)
    for i, ids in generated.items():
        questions[i] = clean_question(base.tokenizer.decode(ids, skip_special_tokens=True)) or RECITE_QUESTION
    answers = run(questions, list(range(len(rows))), config.answer_tokens, 1, "self-study: answers")
    return [Conversation(questions[i], base.tokenizer.decode(answers[i], skip_special_tokens=True).strip(),
                         answers[i], rows[i][0], rows[i][1]) for i in range(len(rows))]


def clean_question(text: str) -> str:
    """The generated user turn: its first non-empty line, without surrounding quotes."""
    for line in text.strip().splitlines():
        line = line.strip().strip('"').strip()
        if line:
            return line
    return ""


def rows_text(conversations: list[Conversation], corpus_sha256: str, config: SelfStudyConfig) -> str:
    """The conversations as JSONL: one ``messages`` row each, with what they were generated from."""
    recipe = config.recipe()
    return "".join(json.dumps(c.to_row(corpus_sha256, recipe)) + "\n" for c in conversations)


def save(path: Path, conversations: list[Conversation], corpus_sha256: str, config: SelfStudyConfig) -> None:
    """``rows_text`` written atomically."""
    atomic_text(path, rows_text(conversations, corpus_sha256, config))


def load(path: Path, corpus_sha256: str, config: SelfStudyConfig, num_chunks: int) -> list[Conversation]:
    """Conversations saved by ``save`` for this corpus and recipe; a ``DataError`` naming what differs otherwise."""
    conversations = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        try:
            row = json.loads(line)
            messages = row["messages"]
            conversation = Conversation(messages[0]["content"], messages[1]["content"], list(row["answer_ids"]),
                                        int(row["chunk"]), row["kind"])
        except (ValueError, KeyError, IndexError, TypeError):
            raise DataError(f"{path}, line {number}: not a self-study conversation written by softprompts") from None
        if row.get("corpus_sha256") != corpus_sha256:
            raise DataError(f"{path} was generated from another corpus; pass the same --corpus files, or let "
                            "self-study run again (another output directory)")
        if row.get("recipe") != config.recipe():
            raise DataError(f"{path} was generated with other self-study options ({row.get('recipe')}); pass the "
                            "same options, or let self-study run again")
        if not 0 <= conversation.chunk < num_chunks or not conversation.answer_ids:
            raise DataError(f"{path}, line {number}: chunk {conversation.chunk} or its answer does not fit this "
                            "corpus")
        conversations.append(conversation)
    if len(conversations) != config.conversations:
        raise DataError(f"{path} holds {len(conversations)} conversations, the options ask for {config.conversations}")
    return conversations


__all__ = ["CONTEXT_INSTRUCTION", "ChunkContexts", "ContextFormat", "Conversation", "SEED_PROMPTS", "SelfStudyConfig",
           "clean_question", "generate_conversations", "load", "plan", "rows_text", "save"]
