"""What stops training early with a clear error instead of carrying on with garbage.

* Non-finite values: after every optimizer step's backward pass the summed loss over the global batch and the
  gradient norm of the method's parameters must be finite, and after the update so must the parameters (a learning
  rate of ``inf`` passes the first two and breaks the third). Both numbers are already reduced over ranks, so every
  rank stops at the same step. Training then ends with ``NonFiniteError``: no adapter is written and the last
  checkpoint (an earlier step) stays for a resume with other settings.
* The context window: every training example (``P`` virtual + prompt + target tokens) and every dev example
  (``P`` + prompt + the decoding limit for generation) must fit the model's ``context_limit``; checked before the first
  step, naming the longest example and the limit.
"""

from __future__ import annotations

import math

import torch

from softprompts.errors import SoftpromptsError
from softprompts.model.generation import ContextLengthError


class NonFiniteError(SoftpromptsError):
    """Training produced NaN or infinity (loss, gradient or parameters)."""


def _stop(step: int, what: str, lr: float, checkpoint: str | None) -> NonFiniteError:
    kept = f"the last checkpoint ({checkpoint}) is kept; " if checkpoint else ""
    return NonFiniteError(
        f"training stopped at step {step}: {what}. No adapter was written; {kept}try a lower learning rate "
        f"(--lr, now {lr:g}), more warmup (--warmup-ratio) or another --init"
    )


def check_step(step: int, loss_sum: float, grad_norm: torch.Tensor, lr: float, checkpoint: str | None) -> None:
    """Raise ``NonFiniteError`` when the step's summed loss or its gradient norm is NaN or infinite."""
    if not math.isfinite(loss_sum):
        raise _stop(step, f"the loss is {loss_sum}", lr, checkpoint)
    norm = float(grad_norm)
    if not math.isfinite(norm):
        raise _stop(step, f"the gradient norm is {norm}", lr, checkpoint)


def step_update(optimizer: torch.optim.Optimizer, step: int, lr: float, checkpoint: str | None) -> None:
    """``optimizer.step()``; an update too large for the parameters' dtype (torch: "cannot be converted ... without
    overflow", e.g. lr 1e38) is ``NonFiniteError`` too."""
    try:
        optimizer.step()
    except RuntimeError as exc:
        if "overflow" not in str(exc):
            raise
        raise _stop(step, f"the update overflowed ({exc})", lr, checkpoint) from None


def check_parameters(step: int, method: torch.nn.Module, lr: float, checkpoint: str | None) -> None:
    """Raise ``NonFiniteError`` when an update left a method parameter NaN or infinite."""
    for name, p in method.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise _stop(step, f"the update made parameter {name!r} non-finite", lr, checkpoint)


def check_fits_context(base, virtual: int, rows: list[tuple[int, int]], what: str) -> None:
    """Raise ``SoftpromptsError`` when a row ``(prompt tokens, answer tokens)`` with ``virtual`` virtual tokens does
    not fit the base model's context (its family's rule, ``FrozenBase.check_fits``). The rows that bind are checked:
    the longest in all, the longest prompt and the longest answer."""
    if not rows:
        return
    binding = {max(rows, key=sum), max(rows, key=lambda r: r[0]), max(rows, key=lambda r: r[1])}
    for prompt, answer in sorted(binding):
        try:
            base.check_fits(prompt, virtual, answer, "answer tokens")
        except ContextLengthError as exc:
            raise SoftpromptsError(
                f"{what}: {virtual} virtual tokens and the longest example ({prompt} prompt + {answer} answer tokens) "
                f"exceed the model's context limit of {base.context_limit} tokens ({exc}); use fewer "
                "--virtual-tokens or lower --max-prompt-tokens / --max-target-tokens") from None


__all__ = ["NonFiniteError", "check_fits_context", "check_parameters", "check_step", "step_update"]
