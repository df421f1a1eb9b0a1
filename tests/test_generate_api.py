"""``sp.generate`` answers what ``softprompts generate`` answers for the same TEXT (one code path,
``workflow.generate``): through the adapter's template, or its chat placement with the answer ending at the end of
the assistant's turn; ``raw=True`` as ``--raw``. A tiny Llama whose turns end with ``<|end|>``, not its end of
sequence, and whose head writes ``<|end|>`` a few tokens into the chat adapter's answer."""

from __future__ import annotations

import pytest
import torch
from chat_end import END, end_base
from tiny import perturbed

import softprompts as sp
from softprompts.cli import main
from softprompts.data.chat import ChatFormat
from softprompts.errors import SoftpromptsError
from softprompts.model.decode_loop import generate_ids
from softprompts.model.generation import eos_ids
from softprompts.tasks import TaskSpec, split_prompt

NEW = 12
SYSTEM = "Be brief."
TASKS = {
    "template": {"task": "generate", "prompt": "Review: {text}\nSentiment:", "target": " {label}"},
    "user-start": TaskSpec.for_chat("generate", None, "user-start", SYSTEM).to_json(),
    "after-system": TaskSpec.for_chat("generate", None, "after-system", SYSTEM).to_json(),
    "no template": {"task": "generate"},  # what the README's Python example records
}
TEXTS = {"template": "nice day", "user-start": "say one", "after-system": "say one", "no template": "nice day"}


def chat_ids(base, placement: str, text: str) -> tuple[tuple[int, ...], list[int]]:
    prompt = ChatFormat(base.tokenizer, placement, SYSTEM).render_prompt({"messages": [{"role": "user",
                                                                                        "content": text}]})
    return split_prompt(base, prompt)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A saved base and one saved adapter per ``TASKS`` entry. The head's ``<|end|>`` row is 1.5 times the row of
    the third token the user-start adapter writes, so its answer meets ``<|end|>`` within ``NEW`` tokens."""
    root = tmp_path_factory.mktemp("generate-api")
    made = end_base()
    method = perturbed(made, "prompt", 3, "abc")
    lead, ids = chat_ids(made, "user-start", TEXTS["user-start"])
    free = generate_ids(made, [ids], made.served(method.materialize(), lead), NEW, stop_ids=set())[0]
    end = made.tokenizer.convert_tokens_to_ids(END)
    with torch.no_grad():
        head = made.model.get_output_embeddings().weight
        head[end] = 1.5 * head[free[2]]
    made.model.save_pretrained(root / "model")
    made.tokenizer.save_pretrained(root / "model")
    base = sp.load_base(str(root / "model"))
    for name, task in TASKS.items():
        sp.save_adapter(sp.Adapter.from_method(method, base, task=task), root / name.replace(" ", "-"))
    return root, base, end


def cli(capsys, *args) -> str:
    assert main(["generate", "--max-new-tokens", str(NEW), *[str(a) for a in args]]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


@pytest.mark.parametrize("name", list(TASKS))
def test_the_python_face_answers_what_the_cli_answers(env, capsys, name):
    root, base, _ = env
    path, text = root / name.replace(" ", "-"), TEXTS[name]
    adapter = sp.load_adapter(path, base)
    assert cli(capsys, "--adapter", path, text) == sp.generate(base, text, adapter, max_new_tokens=NEW) + "\n"
    assert cli(capsys, "--adapter", path, "--raw", text) == sp.generate(base, [text], adapter, max_new_tokens=NEW,
                                                                        raw=True)[0] + "\n"
    assert cli(capsys, "--adapter", path, "--chat", "--placement", "user-start", text) == sp.generate(
        base, text, adapter, max_new_tokens=NEW, chat=True, placement="user-start") + "\n"


@pytest.mark.parametrize("placement", ["user-start", "after-system"])
def test_a_chat_adapter_places_its_soft_prompt_and_stops_at_the_end_of_turn(env, placement):
    root, base, end = env
    adapter = sp.load_adapter(root / placement, base)
    lead, ids = chat_ids(base, placement, "say one")
    assert lead  # the soft prompt sits after text, not at position 0
    free = generate_ids(base, [ids], base.served(adapter, lead), NEW, stop_ids=eos_ids(base))[0]
    answer = sp.generate(base, "say one", adapter, max_new_tokens=NEW)
    if end in free:  # the turn ends: the answer is what comes before <|end|>
        assert answer == base.tokenizer.decode(free[: free.index(end)], skip_special_tokens=True)
    else:
        assert answer == base.tokenizer.decode(free, skip_special_tokens=True)
    if placement == "user-start":  # the fixture's head makes this answer end its turn early
        assert end in free and free.index(end) < NEW - 1


def test_the_text_as_is_and_option_errors(env):
    root, base, _ = env
    adapter = sp.load_adapter(root / "template", base)
    prompt = "Review: nice day\nSentiment:"
    assert sp.generate(base, "nice day", adapter, max_new_tokens=4) == sp.generate(base, prompt, adapter.artifact,
                                                                                   max_new_tokens=4)
    assert sp.generate(base, prompt, adapter, max_new_tokens=4, raw=True) == sp.generate(
        base, prompt, adapter.artifact, max_new_tokens=4)
    with pytest.raises(SoftpromptsError, match="--raw sends TEXT as is"):
        sp.generate(base, "x", adapter, raw=True, chat=True)
    assert sp.generate(base, "x", adapter, max_new_tokens=0) == ""
    with pytest.raises(SoftpromptsError, match="not valid"):
        sp.generate(base, "{nope", adapter)


def test_another_template_over_a_task_recorded_without_a_target():
    """``--template`` / ``template=`` renders TEXT for an adapter whose record has a prompt but no target (a partial
    record, ``{"task": "generate", "prompt": ...}``): the target plays no part in rendering TEXT."""
    from softprompts.workflow import Rendering

    rendering = Rendering(template="Say {x}:")
    spec = rendering.spec(TaskSpec.from_record({"task": "generate", "prompt": "Q: {q}\nA:"}))
    assert rendering.prompt(spec, "hi", None) == "Say hi:"
