"""One chat stop rule (``tasks.turn_stop_ids``) for evaluation and the CLI, the server and self-study: the
model's end of sequence and the special token that closes the assistant's turn, also when the template writes text
before that token (a multi-token end of turn stops where it completes, never on its first token)."""

from __future__ import annotations

import pytest
import torch
from chat_end import END, end_base

from softprompts.data.chat import ChatFormat
from softprompts.data.corpus import Chunk
from softprompts.evaluate import generate_texts, stop_tokens
from softprompts.model.decode_loop import generate_ids
from softprompts.model.generation import eos_ids
from softprompts.serve.plan import render_chat
from softprompts.serve.schemas import ChatBody
from softprompts.tasks import TaskSpec, split_prompt
from softprompts.training import SelfStudyConfig, self_study


@pytest.mark.parametrize("before", ["", "\\n"], ids=["one token", "newline then the token"])
def test_evaluate_and_serving_stop_on_the_same_tokens(before):
    base = end_base(before)
    end = base.tokenizer.convert_tokens_to_ids(END)
    want = frozenset(eos_ids(base) | {end})
    assert end not in eos_ids(base) and len(base.tokenize(ChatFormat(base.tokenizer).end_of_turn)) == 1 + (before != "")
    assert frozenset(stop_tokens(base, TaskSpec.for_chat("generate", None))) == want
    body = ChatBody.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert render_chat(base, ChatFormat(base.tokenizer, "user-start"), body)[1] == want


@pytest.mark.parametrize("before", ["", "\\n"], ids=["one token", "newline then the token"])
def test_self_study_stops_on_the_same_tokens(before, monkeypatch):
    base = end_base(before)
    want = frozenset(eos_ids(base) | {base.tokenizer.convert_tokens_to_ids(END)})
    requests = []
    decode = self_study.decode_batch
    monkeypatch.setattr(self_study, "decode_batch", lambda b, rows: requests.extend(rows) or decode(b, rows))
    study = SelfStudyConfig(conversations=3, chunk_tokens=32, question_tokens=3, answer_tokens=3, batch_size=2)
    self_study.generate_conversations(base, [Chunk("The capital of Kervaunt is Pellidrune.", "k.md", 0)],
                                      self_study.ContextFormat(base.tokenizer), study, progress=False)
    assert requests and {r.stop_ids for r in requests} == {want}


def test_a_multi_token_end_of_turn_ends_the_answer_where_it_completes():
    """``" <|end|>"``: the answer runs on through a space (its first token) and ends at ``<|end|>``."""
    base = end_base(" ")
    end, space = base.tokenizer.convert_tokens_to_ids(END), base.tokenize(" ")[0]
    spec = TaskSpec.for_chat("generate", None)
    prompt = spec.prompt_format(base.tokenizer).render_prompt({"messages": [{"role": "user", "content": "hi"}]})
    _, ids = split_prompt(base, prompt)
    head = base.model.get_output_embeddings().weight
    with torch.no_grad():
        head[end] = 0  # no <|end|> yet
    free = generate_ids(base, [ids], None, 8, stop_ids=set())[0]
    assert space in free
    later = [t for t in free[free.index(space) + 1 :] if t not in free[: free.index(space) + 1]]
    with torch.no_grad():  # the head writes <|end|> where it wrote a token first seen after the space
        head[end] = 1.001 * head[later[0]]
    free = generate_ids(base, [ids], None, 8, stop_ids=set())[0]
    assert space in free and end in free and free.index(space) < free.index(end) < len(free) - 1
    expected = base.tokenizer.decode(free[: free.index(end)], skip_special_tokens=True)
    assert generate_texts(base, None, [prompt], spec, 8) == [expected] and " " in expected
