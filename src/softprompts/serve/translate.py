"""A request's plan (``plan.py``) as the default engine runs it: engine requests with token ids and the placed
artifacts, nothing else.

A ``Generation`` is a ``RequestPlan`` with the artifact each prompt runs with (resolved by the caller from the
registry's cache, ``Registry.placed``: the one step that may compute, so the routes run it in a thread): ``n``
``GenerationRequest``s per prompt, the prompts' own token logprobs for ``echo`` with ``logprobs``, and the empty
results of ``max_tokens: 0``. A classify plan becomes one ``ScoreRequest`` per text over the adapter's label targets.
"""

from __future__ import annotations

from dataclasses import dataclass

from softprompts.model.artifacts import Artifact
from softprompts.model.generation import GenerationRequest, GenerationResult
from softprompts.serve.engine import PromptLogprobsRequest, ScoreRequest
from softprompts.serve.plan import RequestPlan, ScorePlan
from softprompts.serve.schemas import GenerationFields
from softprompts.serve.text import StopStrings


@dataclass(frozen=True)
class Generation:
    """``plan`` with ``artifacts[p]``, what prompt ``p`` runs with; ``tokenizer``: the base's (stop strings are
    matched on text)."""

    plan: RequestPlan
    artifacts: list[Artifact | None]
    tokenizer: object

    @property
    def body(self) -> GenerationFields:
        return self.plan.body

    @property
    def max_tokens(self) -> int:
        return self.plan.max_tokens

    @property
    def stops(self) -> StopStrings:
        return self.plan.stops

    @property
    def rows(self) -> list[tuple[int, int]]:
        """``(prompt, choice)`` of each index."""
        return self.plan.rows

    @property
    def split(self) -> list[tuple[tuple[int, ...], list[int]]]:
        """``(lead, prompt ids)`` of each prompt."""
        return [(p.lead, p.ids) for p in self.plan.prompts]

    @property
    def prompt_tokens(self) -> int:
        return self.plan.prompt_tokens

    @property
    def echoed(self) -> list[str]:
        """The text each choice starts with: its prompt with ``echo``, else ""."""
        return [self.plan.prompts[p].text if self.plan.echo else "" for p, _ in self.rows]

    def request(self, index: int, on_token=None) -> GenerationRequest:
        """Choice ``index``'s engine request (``on_token``: called with each token as it is chosen)."""
        p, j = self.rows[index]
        plan = self.plan
        return GenerationRequest(prompt_ids=plan.prompts[p].ids, artifact=self.artifacts[p],
                                 max_new_tokens=plan.max_tokens, sampling=plan.sampling(j), stop_ids=plan.stop_ids,
                                 stop_check=plan.stops.check(self.tokenizer), on_token=on_token,
                                 logprobs=plan.logprobs, min_new_tokens=plan.body.min_tokens)

    def prompt_requests(self) -> list[PromptLogprobsRequest]:
        """The requests for the prompts' token logprobs (none unless the plan scores the prompt)."""
        if not self.plan.scores_prompt:
            return []
        return [PromptLogprobsRequest(p.ids, artifact, self.plan.logprobs)
                for p, artifact in zip(self.plan.prompts, self.artifacts, strict=True)]

    def nothing_generated(self) -> list[GenerationResult]:
        """Every choice's result when ``max_tokens`` is 0 (the prompt is only echoed or scored)."""
        return [GenerationResult(tokens=[], finish_reason="length", prompt_tokens=len(self.plan.prompts[p].ids))
                for p, _ in self.rows]


def score_requests(plan: ScorePlan, artifacts: list[Artifact | None]) -> list[ScoreRequest]:
    """One ``ScoreRequest`` per text of a classify plan, with its prompt's artifact."""
    return [ScoreRequest(prompt_ids=p.ids, candidates=plan.candidates, artifact=artifact)
            for p, artifact in zip(plan.prompts, artifacts, strict=True)]


__all__ = ["Generation", "score_requests"]
