"""Everything a compare can refuse, refused before its first training step: a long compare never stops at its end
for a reason it knew at its start. Each pass lists every problem it finds in one ``SoftpromptsError``.

Without the model (``problems``; the command line asks ``option_problems`` even before chat rows load the model for
its chat template):

- the options (``CompareConfig.errors``), each method's name and options (its config validated as ``build_method``
  validates it), each run's training options (``TrainConfig.errors``, LoRA's with its own learning rate);
- ``--baseline peft``: the package installed (a method without a PEFT counterpart, ``peft_type = None``, runs ours
  only, and the report says so);
- ``--tune N``: Optuna installed, dev rows to choose on (after the carve), every combination of each method's
  searched choices a valid config (``tuning.tune_problems``);
- the training rows, and the few-shot baseline's rows (``fewshot_run.fewshot_problems``: something to score, dev rows
  to choose k on, chat rows' messages, ``--shots K`` within what the training rows give and balance).

With the model loaded, before the bare model's run (``model_problems``):

- what the base must support: PEFT's baseline (``base.require``), the training options (``preflight.check_options``);
- per method, with its own virtual tokens ``P`` (methods differ; with ``--tune`` the largest ``P`` it may choose):
  the training preflight's rule for the training and dev rows (``preflight.check_fits``: a KV prefix never after
  text, every row + its answer within the context), the same rule for the test rows (read only after training), and
  the latency prompt + ``P`` + ``--latency-tokens``;
- a fixed ``--shots K``: every seed's demonstrations drawn, written and fitted (``FewShotRun.preflight``).
"""

from __future__ import annotations

from collections.abc import Callable

from softprompts.compare.config import CompareConfig, CompareData
from softprompts.compare.fewshot import answer_tokens
from softprompts.compare.fewshot_run import FewShotRun, fewshot_problems
from softprompts.compare.peft_baseline import LORA, LORA_LR, import_peft
from softprompts.compare.tuning import longest_prompt, tune_problems
from softprompts.errors import SoftpromptsError
from softprompts.methods import build_method, method_class
from softprompts.tasks import encode, prompt_ids, split_prompt
from softprompts.training import TrainConfig
from softprompts.training.guards import check_fits_context
from softprompts.training.preflight import check_fits, check_options


def train_config(config: CompareConfig, method: str, seed: int, steps: int) -> TrainConfig:
    """The training options of one run (not validated): ``--lr`` or the method's measured default, LoRA's own."""
    if method == LORA:  # a weight adapter's own scale: --lr is for the prompt methods
        lr = LORA_LR
    else:
        lr = config.lr if config.lr is not None else method_class(method).default_lr
    return TrainConfig(steps=steps, lr=lr, batch_size=config.batch_size, eval_every=config.eval_every,
                       checkpoint_every=max(1, min(25, steps // 4 or 1)), seed=seed, progress=config.progress)


def _refusal(check: Callable[[], object]) -> str | None:
    """The message of the ``SoftpromptsError`` that ``check()`` raises, or None."""
    try:
        check()
    except SoftpromptsError as exc:
        return str(exc)
    return None


def _method_problems(config: CompareConfig, name: str, steps: int) -> list[str]:
    """One method's name, options, training options and (``--baseline peft``) PEFT counterpart."""
    try:
        cls = method_class(name)
    except SoftpromptsError as exc:
        return [str(exc)]
    options = {"seed": 0} | ({} if config.virtual_tokens is None else {"num_virtual_tokens": config.virtual_tokens})
    found = [_refusal(lambda: cls.config_class.from_options(**options)),
             "; ".join(train_config(config, cls.name, 0, steps).errors()) or None]
    return [f"{cls.name}: {problem}" for problem in found if problem]


def option_problems(config: CompareConfig) -> list[str]:
    """Every problem of the options alone (no data, no model)."""
    found = list(config.errors())
    steps = config.steps if config.steps is not None and config.steps >= 1 else 2  # --minutes: the timing's 2 steps
    for name in dict.fromkeys(config.methods):
        found += _method_problems(config, name, steps)
    if config.uses_peft:
        found.append(_refusal(import_peft))
    if config.runs_lora:
        found += [f"lora: {p}" for p in train_config(config, LORA, 0, steps).errors()]
    return [p for p in dict.fromkeys(found) if p]


def problems(config: CompareConfig, data: CompareData) -> list[str]:
    """Every problem found without the model: the options, then the rows."""
    found = option_problems(config)
    if not data.train:
        found.append("the training data is empty")
    return found + tune_problems(config, data) + fewshot_problems(config, data)


def _row_problems(base, config: CompareConfig, data: CompareData, dev: list, test: list) -> list[str]:
    """Per method: training options on this base, training / dev / test rows and the latency prompt in context."""
    found = []
    encoded, _ = encode(base, data.train, data.spec)
    answer = answer_tokens(base, data.spec)
    tests = [(sum(map(len, prompt_ids(base, ex.prompt, data.spec))), answer) for ex in test]
    lead, ids = split_prompt(base, (test or dev or data.train)[0].prompt)
    found.append(_refusal(lambda: base.check_fits(len(lead) + len(ids), 0, config.latency_tokens, "--latency-tokens")))
    for name in dict.fromkeys(method_class(m).name for m in config.methods):
        def check(name: str = name) -> None:
            method = build_method(base, name, data.spec, num_virtual_tokens=longest_prompt(config, name))
            virtual = method.config.num_virtual_tokens
            check_options(base, train_config(config, name, 0, config.steps or 2))
            check_fits(base, method, data.spec, encoded, dev)
            check_fits_context(base, virtual, tests, "test data")
            base.check_fits(len(lead) + len(ids), virtual, config.latency_tokens, "--latency-tokens")

        problem = _refusal(check)
        found.append(f"{name}: {problem}" if problem else None)
    return found


def model_problems(base, config: CompareConfig, data: CompareData, dev: list, test: list) -> list[str]:
    """Every problem found with the model loaded (module docstring); ``dev`` / ``test``: the rows the runs read."""
    found = [_refusal(lambda: base.require("peft_baseline"))] if config.uses_peft else []
    found += [_refusal(lambda: base.require("layer_probe"))] if config.explain else []
    found += _row_problems(base, config, data, dev, test)
    if "fewshot" in config.baselines:
        found += FewShotRun(base, data, dev, test, config).preflight(config.seeds)
    return [p for p in dict.fromkeys(found) if p]


def refuse(found: list[str]) -> None:
    """One ``SoftpromptsError`` listing every problem, or nothing."""
    if found:
        raise SoftpromptsError("; ".join(found))


__all__ = ["model_problems", "option_problems", "problems", "refuse", "train_config"]
