"""A request's plan: what to run for one completions, chat or classify body, made by one synchronous function from
the base (tokenizer, vocabulary, context rule), the adapter's registry record (``Entry``; ``None``: the base model)
and the parsed body. Both serving engines execute it: the default engine (``translate.py``: engine requests with the
placed artifacts from the registry's cache) and vLLM's front (``interop/vllm_requests.py``: prompt embeddings or
placeholders + a KV file). The rules of a request are written here once:

    split    a text prompt is cut at its ``<|virtual|>`` marker into ``(lead, ids)`` (``tasks.split_prompt``, BOS
             first where the base adds one); token ids are used as sent (each must be in the vocabulary); a chat
             body is rendered with the model's chat template and the adapter's placement and system message
    place    the artifact placed after the lead has ``k + P`` virtual positions (``placement.placed_length``; a KV
             prefix after text is refused, after BOS alone the KV prefix stands for the sequence's start and the
             lead is not read: ``read_lead``)
    fit      every prompt with its virtual positions and ``max_tokens`` (classify: its longest label) within the
             context (``FrozenBase.check_fits``)

Nothing here runs the model, waits or touches a cache: what a prompt runs with is named by its ``ArtifactKey``
(adapter name, version, lead), which the engine resolves (``Registry.placed``). Errors come in the order they
always did: every prompt split, then placed, then fitted (classify: each text split, placed and fitted in turn).
"""

from __future__ import annotations

from dataclasses import dataclass

from softprompts.data.chat import ChatFormat
from softprompts.errors import SoftpromptsError
from softprompts.model.artifacts import Artifact
from softprompts.model.generation import Sampling
from softprompts.model.placement import beyond_start, placed_length, read_lead
from softprompts.serve.registry import ArtifactKey, Entry
from softprompts.serve.schemas import ChatBody, ClassifyBody, CompletionBody, GenerationFields
from softprompts.serve.text import StopStrings, classify_prompts
from softprompts.task_spec import ChatSpec
from softprompts.tasks import split_prompt, turn_stop_ids


@dataclass(frozen=True)
class PromptPlan:
    """One prompt: its text (token ids decoded; what ``echo`` repeats), the ``lead`` read before the virtual
    positions, the ``ids`` after them, and ``virtual``: the placed artifact's positions (``k + P``)."""

    text: str
    lead: tuple[int, ...]
    ids: list[int]
    virtual: int
    key: ArtifactKey


@dataclass(frozen=True)
class RequestPlan:
    """What a completions or chat body runs: ``body.n`` choices of every prompt; choice ``j`` of prompt ``p`` is
    index ``p * n + j`` (``rows[index]``) and samples with ``seed + j``. ``stop_ids``: the tokens that end an answer
    (``None``: the model's end of sequence; empty with ``ignore_eos``); ``echo``: each choice's text starts with its
    prompt (with the prompt's token logprobs when ``logprobs`` is set)."""

    body: GenerationFields
    adapter: Entry | None
    prompts: list[PromptPlan]
    max_tokens: int
    stop_ids: frozenset[int] | None
    logprobs: int | None
    echo: bool
    stops: StopStrings
    chat: bool

    @property
    def rows(self) -> list[tuple[int, int]]:
        """``(prompt, choice)`` of each index."""
        return [(p, j) for p in range(len(self.prompts)) for j in range(self.body.n)]

    @property
    def prompt_tokens(self) -> int:
        """What usage counts as the prompt: every prompt's tokens, the lead's too."""
        return sum(len(p.lead) + len(p.ids) for p in self.prompts)

    @property
    def scores_prompt(self) -> bool:
        """Whether the prompts' own token logprobs come back (``echo`` with ``logprobs``)."""
        return self.echo and self.logprobs is not None

    def sampling(self, choice: int) -> Sampling:
        """How choice ``choice`` of a prompt samples (its seed: the body's + ``choice``)."""
        body = self.body
        return Sampling(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                        seed=body.seed + choice if body.seed is not None else None)


@dataclass(frozen=True)
class ScorePlan:
    """A classify body: each text's prompt scored on every label's target tokens (``candidates``)."""

    labels: list[str]
    prompts: list[PromptPlan]
    candidates: list[list[int]]


def chat_format_of(base, entry: Entry | None) -> ChatFormat:
    """How a conversation is rendered for ``entry``: its chat task's placement and system message, else the model's
    chat template with the virtual tokens first."""
    task = entry.task if entry is not None else None
    chat = task.chat if task is not None and task.chat is not None else ChatSpec()
    return chat.format(base.tokenizer, "generate")


def render_chat(base, chat: ChatFormat, body: ChatBody) -> tuple[str, frozenset[int]]:
    """The conversation rendered with the model's chat template and ``chat``'s placement, and the tokens that end
    the answer (``tasks.turn_stop_ids``: end of sequence and the token that closes the template's turn)."""
    prompt = chat.render_prompt({"messages": [m.rendered() for m in body.messages]})
    return prompt, turn_stop_ids(base, chat)


def split_request_prompt(base, prompt: str | list[int], where: str) -> tuple[tuple[int, ...], list[int]]:
    """``(lead, prompt ids)`` of one prompt: a text split at its placement marker, or token ids as they are (each
    must be in the vocabulary; ``where`` names the prompt in the error)."""
    if isinstance(prompt, str):
        return split_prompt(base, prompt)
    base.check_token_ids(prompt, where)
    return (), list(prompt)


def _placed(base, entry: Entry | None, text: str, lead: tuple[int, ...], ids: list[int]) -> PromptPlan:
    """A split prompt with its artifact placed: the lead the row reads (a KV prefix stands in for BOS) and the
    virtual positions (``PlacementError`` for a KV prefix after text)."""
    source: Artifact | None = entry.source if entry is not None else None
    lead = read_lead(base, source, lead)
    return PromptPlan(text, lead, ids, placed_length(base, source, lead), ArtifactKey.of(entry, lead))


def plan_generation(base, entry: Entry | None, body: CompletionBody | ChatBody) -> RequestPlan:
    """The plan of a completions body (prompts as texts or token ids) or a chat body (the conversation rendered for
    ``entry``; it ends at the model's end of sequence or the template's end of turn) with ``entry``'s adapter. Every
    prompt must fit the context with its virtual tokens and ``max_tokens``. ``ignore_eos``: no stop token ends an
    answer; ``min_tokens``: none does before that many."""
    if isinstance(body, ChatBody):
        prompt, stop_ids = render_chat(base, chat_format_of(base, entry), body)
        prompts: list[str | list[int]] = [prompt]
        max_tokens, logprobs, echo = body.limit, ((body.top_logprobs or 0) if body.logprobs else None), False
    else:
        prompts, stop_ids = body.prompts, None
        max_tokens, logprobs, echo = body.max_tokens, body.logprobs, body.echo
    split = [split_request_prompt(base, prompt, "prompt" if len(prompts) == 1 else f"prompt[{p}]")
             for p, prompt in enumerate(prompts)]
    texts = [p if isinstance(p, str) else base.tokenizer.decode(p) for p in prompts]
    planned = [_placed(base, entry, text, lead, ids) for text, (lead, ids) in zip(texts, split, strict=True)]
    for p in planned:
        base.check_fits(len(p.ids), p.virtual, max_tokens)
    if echo and logprobs is not None and any(beyond_start(base, p.lead) for p in planned):
        raise SoftpromptsError("echo with logprobs scores the prompt's tokens after the virtual tokens; a prompt "
                               "with a <|virtual|> marker has tokens before them: send it without the marker")
    return RequestPlan(body=body, adapter=entry, prompts=planned, max_tokens=max_tokens,
                       stop_ids=frozenset() if body.ignore_eos else stop_ids, logprobs=logprobs, echo=echo,
                       stops=StopStrings.of(body.stop, body.min_tokens), chat=isinstance(body, ChatBody))


def plan_scores(base, entry: Entry, body: ClassifyBody) -> ScorePlan:
    """The plan of a classify body: each text rendered with the adapter's task (a chat adapter's: as the user's
    message), split, placed and fitted with the longest label's tokens."""
    task = entry.task
    labels, prompts, targets = classify_prompts(task, body.texts, body.labels, entry.name,
                                                chat_format_of(base, entry) if task and task.chat else None)
    candidates = [base.tokenizer(t, add_special_tokens=False)["input_ids"] for t in targets]
    longest = max(len(c) for c in candidates)
    planned = []
    for prompt in prompts:
        p = _placed(base, entry, prompt, *split_prompt(base, prompt))
        base.check_fits(len(p.ids), p.virtual, longest, "label tokens")
        planned.append(p)
    return ScorePlan(labels, planned, candidates)


__all__ = ["PromptPlan", "RequestPlan", "ScorePlan", "chat_format_of", "plan_generation",
           "plan_scores", "render_chat", "split_request_prompt"]
