"""Context distillation targets: the teacher (the chunk in context) scored once per conversation, top-k kept.

For conversation ``i`` with chunk ``c``, teacher prompt ``t_i`` (what follows the chunk's context, up to the answer)
and answer ids ``a_i [n]``::

    KV_c        = base.text_to_kv(context(c))                      once per chunk (exactly the chunk in the prompt)
    z_i         = base(KV_c ; t_i + a_i) at the n answer positions  [n, V]
    targets_i   = top_k_targets(z_i, k)                            [n, k] ids and renormalized probabilities

and the student row is ``Encoded(prompt = the conversation without the chunk, target = a_i, soft_targets)``: the
training loop's loss on it is ``sum_j CE(q_ij, p_student(. | cartridge, prompt, a_<j))`` (``model/soft_targets.py``).
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from softprompts.data.corpus import Chunk
from softprompts.model.artifacts import VirtualContext
from softprompts.model.padding import length_sorted_chunks, prompt_target_rows
from softprompts.model.soft_targets import SoftTargets, top_k_targets
from softprompts.tasks import Encoded, split_prompt
from softprompts.training.self_study import ChunkContexts, ContextFormat, Conversation


@torch.no_grad()
def teacher_targets(base, chunks: list[Chunk], conversations: list[Conversation], fmt: ContextFormat, top_k: int,
                    batch_size: int = 16, progress: bool = True,
                    contexts: ChunkContexts | None = None) -> list[SoftTargets]:
    """The teacher's top-``top_k`` distribution at every answer token of every conversation (``[n_i, k]`` each, CPU);
    ``contexts``: the chunks' contexts and KV, shared with self-study."""
    contexts = contexts or ChunkContexts(base, chunks, fmt)
    prompts = [contexts.prompt_ids(conv.chunk, conv.question) for conv in conversations]
    answers = [conv.answer_ids for conv in conversations]
    out: list[SoftTargets | None] = [None] * len(conversations)
    bar = tqdm(total=len(conversations), desc="self-study: teacher", disable=not progress, leave=False)
    for rows in length_sorted_chunks([len(p) + len(a) for p, a in zip(prompts, answers, strict=True)], batch_size):
        ids, mask, _, positions = prompt_target_rows([prompts[i] for i in rows], [answers[i] for i in rows],
                                                     base.pad_id, base.device)
        ctx = VirtualContext.from_rows([contexts.kv(conversations[i].chunk) for i in rows])
        logits = base.token_logits(ctx, ids, mask, logits_positions=positions)  # [b, L, V]
        for row, i in enumerate(rows):
            n = len(answers[i])
            targets = top_k_targets(logits[row, logits.shape[1] - n :], top_k)
            out[i] = SoftTargets(targets.ids.cpu(), targets.probs.cpu())
        bar.update(len(rows))
    bar.close()
    return out


def student_rows(base, conversations: list[Conversation], fmt: ContextFormat,
                 targets: list[SoftTargets]) -> list[Encoded]:
    """The training rows: each conversation as a user sends it (no chunk), its answer ids, the teacher's targets."""
    rows = []
    for conv, soft in zip(conversations, targets, strict=True):
        lead, prompt = split_prompt(base, fmt.student_prompt(conv.question))
        rows.append(Encoded(prompt, list(conv.answer_ids), None, lead, soft))
    return rows


__all__ = ["student_rows", "teacher_targets"]
