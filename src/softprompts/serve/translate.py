"""What a request body asks of the engine: token ids and artifacts, checked against the context rule.

A completions or chat body becomes a ``Generation``: its prompts split at their placement markers (a ``<|virtual|>``
marker places the soft prompt there; chat renders the conversation with the model's chat template and the adapter's
placement, ``data/chat.py``), the artifact each prompt runs with, and ``n`` engine requests per prompt. A prompt sent
as token ids is used as it is (checked against the vocabulary; the soft prompt goes before it). A classify body
becomes one ``ScoreRequest`` per text over the adapter's label targets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool

from softprompts.data.chat import ChatFormat
from softprompts.errors import SoftpromptsError
from softprompts.model.artifacts import Artifact
from softprompts.model.generation import GenerationRequest, GenerationResult, Sampling
from softprompts.model.placement import beyond_start, read_lead
from softprompts.serve.engine import PromptLogprobsRequest, ScoreRequest
from softprompts.serve.registry import Entry
from softprompts.serve.schemas import ChatBody, ClassifyBody, GenerationFields
from softprompts.serve.state import ServerState
from softprompts.serve.text import StopStrings, classify_prompts
from softprompts.tasks import split_prompt, turn_stop_ids


@dataclass(frozen=True)
class Generation:
    """``body.n`` choices of every prompt: choice ``j`` of prompt ``p`` is index ``p * n + j`` (``rows[index]``)
    and samples with ``seed + j``. ``echo``: each choice's text starts with its prompt (with the prompt's token
    logprobs when ``logprobs`` is set)."""

    body: GenerationFields
    texts: list[str]
    split: list[tuple[tuple[int, ...], list[int]]]  # (lead, prompt ids) of each text
    artifacts: list[Artifact | None]
    max_tokens: int
    stop_ids: frozenset[int] | None
    logprobs: int | None
    echo: bool
    stops: StopStrings
    stop_check: Callable[[list[int]], bool] | None
    rows: list[tuple[int, int]]  # (prompt, choice) of each index

    @property
    def prompt_tokens(self) -> int:
        """What usage counts as the prompt: every prompt's tokens, the lead's too."""
        return sum(len(lead) + len(ids) for lead, ids in self.split)

    @property
    def echoed(self) -> list[str]:
        """The text each choice starts with: its prompt with ``echo``, else ""."""
        return [self.texts[p] if self.echo else "" for p, _ in self.rows]

    @property
    def scores_prompt(self) -> bool:
        """Whether the prompts' own token logprobs come back (``echo`` with ``logprobs``)."""
        return self.echo and self.logprobs is not None

    def request(self, index: int, on_token=None) -> GenerationRequest:
        """Choice ``index``'s engine request (``on_token``: called with each token as it is chosen)."""
        p, j = self.rows[index]
        body = self.body
        sampling = Sampling(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                            seed=body.seed + j if body.seed is not None else None)
        return GenerationRequest(prompt_ids=self.split[p][1], artifact=self.artifacts[p],
                                 max_new_tokens=self.max_tokens, sampling=sampling, stop_ids=self.stop_ids,
                                 stop_check=self.stop_check, on_token=on_token, logprobs=self.logprobs,
                                 min_new_tokens=body.min_tokens)

    def prompt_requests(self) -> list[PromptLogprobsRequest]:
        """The requests for the prompts' token logprobs (none unless ``scores_prompt``)."""
        if not self.scores_prompt:
            return []
        return [PromptLogprobsRequest(ids, artifact, self.logprobs)
                for (_, ids), artifact in zip(self.split, self.artifacts, strict=True)]

    def nothing_generated(self) -> list[GenerationResult]:
        """Every choice's result when ``max_tokens`` is 0 (the prompt is only echoed or scored)."""
        return [GenerationResult(tokens=[], finish_reason="length", prompt_tokens=len(self.split[p][1]))
                for p, _ in self.rows]


def split_request_prompt(base, prompt: str | list[int], where: str) -> tuple[tuple[int, ...], list[int]]:
    """``(lead, prompt ids)`` of one prompt: a text split at its placement marker, or token ids as they are (each
    must be in the vocabulary; ``where`` names the prompt in the error)."""
    if isinstance(prompt, str):
        return split_prompt(base, prompt)
    base.check_token_ids(prompt, where)
    return (), list(prompt)


async def to_generation(state: ServerState, body: GenerationFields, entry: Entry | None,
                        prompts: list[str | list[int]], max_tokens: int, stop_ids: frozenset[int] | None = None,
                        logprobs: int | None = None, echo: bool = False) -> Generation:
    """The ``Generation`` of ``prompts`` (texts or token ids) with ``entry``'s adapter (``None``: the base model);
    every prompt must fit the context with its virtual tokens and ``max_tokens``. ``ignore_eos``: no stop token
    (the model's end of sequence, ``stop_ids``) ends an answer; ``min_tokens``: none does before that many."""
    source = entry.source if entry is not None else None
    split = [split_request_prompt(state.base, prompt, "prompt" if len(prompts) == 1 else f"prompt[{p}]")
             for p, prompt in enumerate(prompts)]
    split = [(read_lead(state.base, source, lead), ids) for lead, ids in split]  # a KV prefix holds BOS: not read
    artifacts = [await run_in_threadpool(state.artifact, entry, lead) for lead, _ in split]
    for (_, ids), artifact in zip(split, artifacts, strict=True):
        state.base.check_fits(len(ids), artifact.length if artifact is not None else 0, max_tokens)
    if echo and logprobs is not None and any(beyond_start(state.base, lead) for lead, _ in split):
        raise SoftpromptsError("echo with logprobs scores the prompt's tokens after the virtual tokens; a prompt "
                               "with a <|virtual|> marker has tokens before them: send it without the marker")
    stops = StopStrings.of(body.stop, body.min_tokens)
    texts = [p if isinstance(p, str) else state.base.tokenizer.decode(p) for p in prompts]
    rows = [(p, j) for p in range(len(prompts)) for j in range(body.n)]
    return Generation(body=body, texts=texts, split=split, artifacts=artifacts, max_tokens=max_tokens,
                      stop_ids=frozenset() if body.ignore_eos else stop_ids, logprobs=logprobs, echo=echo,
                      stops=stops, stop_check=stops.check(state.base.tokenizer), rows=rows)


def chat_prompt(state: ServerState, entry: Entry | None, body: ChatBody) -> tuple[str, frozenset[int]]:
    """``render_chat`` with ``entry``'s chat format."""
    return render_chat(state.base, state.chat_format(entry), body)


def render_chat(base, chat: ChatFormat, body: ChatBody) -> tuple[str, frozenset[int]]:
    """The conversation rendered with the model's chat template and ``chat``'s placement, and the tokens that end
    the answer (``tasks.turn_stop_ids``: end of sequence and the token that closes the template's turn)."""
    prompt = chat.render_prompt({"messages": [m.rendered() for m in body.messages]})
    return prompt, turn_stop_ids(base, chat)


async def score_requests(state: ServerState, entry: Entry, body: ClassifyBody) -> tuple[list[str], list[ScoreRequest]]:
    """``(labels, one ScoreRequest per text)``: each text's prompt scored on every label's target tokens."""
    task = entry.task
    labels, prompts, targets = classify_prompts(task, body.texts, body.labels, entry.name,
                                                state.chat_format(entry) if task and task.chat else None)
    candidates = [state.base.tokenizer(t, add_special_tokens=False)["input_ids"] for t in targets]
    requests = []
    for prompt in prompts:
        lead, ids = split_prompt(state.base, prompt)
        artifact = await run_in_threadpool(state.artifact, entry, lead)
        state.base.check_fits(len(ids), artifact.length, max(len(c) for c in candidates), "label tokens")
        requests.append(ScoreRequest(prompt_ids=ids, candidates=candidates, artifact=artifact))
    return labels, requests


__all__ = ["Generation", "chat_prompt", "render_chat", "score_requests", "split_request_prompt", "to_generation"]
