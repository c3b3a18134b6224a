"""Pieces every adapter needs the same way: padding a batch of embedded prompts, their position ids,
and the understanding-loss pair (token log-probs of an answer → a loss, or a summed log-prob).

Plain functions, so a new adapter (in reca or in a user's package) calls them instead of copying
them; keeping one copy is what keeps the adapters' batch-split invariance identical.
"""

from __future__ import annotations

from typing import Sequence

import torch

IGNORE = -100  # label of a position that is not an answer token (transformers' convention)


def left_pad(rows: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(T_i, d)`` embeddings → ``(B, T, d)`` padded on the left, and the attention mask.

    Left padding puts every prompt's last token in the last column, right where the generated
    tokens (queries, image tokens) follow."""
    width = max(r.shape[0] for r in rows)
    x = rows[0].new_zeros(len(rows), width, rows[0].shape[-1])
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=x.device)
    for i, r in enumerate(rows):
        x[i, width - r.shape[0] :] = r
        mask[i, width - r.shape[0] :] = 1
    return x, mask


def right_pad(
    rows: Sequence[torch.Tensor], labels: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher-forced sequences ``(T_i, d)`` with their labels ``(T_i,)`` → padded embeddings,
    attention mask and labels (``IGNORE`` on padding)."""
    width = max(r.shape[0] for r in rows)
    x = rows[0].new_zeros(len(rows), width, rows[0].shape[-1])
    target = torch.full((len(rows), width), IGNORE, dtype=torch.long, device=x.device)
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=x.device)
    for i, (r, lab) in enumerate(zip(rows, labels)):
        x[i, : r.shape[0]], mask[i, : r.shape[0]] = r, 1
        target[i, : lab.shape[0]] = lab.to(x.device)
    return x, mask, target


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so a left-padded prompt starts at position 0."""
    return (mask.cumsum(1) - 1).clamp(min=0)


def answer_logprobs(
    hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs ``(B, T-1)`` of the labelled tokens and their mask, from the LM's last
    hidden states ``(B, T, d)``: position t predicts token t+1.

    ``head`` (the LM head) runs only where an answer token is predicted: a 100k vocabulary over
    hundreds of image positions per sample would cost gigabytes of logits for nothing."""
    target = labels[:, 1:]
    valid = target != IGNORE
    logits = head(hidden[:, :-1][valid]).float()
    logp = hidden.new_zeros(target.shape, dtype=torch.float32)
    logp[valid] = torch.log_softmax(logits, -1).gather(-1, target[valid][:, None])[:, 0]
    return logp, valid


def sequence_nll(logp: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Cross-entropy from per-token log-probs ``(B, T)`` and a mask: token mean per sample, then mean
    over samples. Unlike one token mean over the batch, it does not depend on how a batch is split
    across processes or micro-batches (two-process DDP reproduces one process)."""
    return (-(logp * valid).sum(1) / valid.sum(1)).mean()


def answer_sequences(embeds: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
    """A right-padded teacher-forced batch (:func:`right_pad`) → per sample its unpadded sequence
    and the prompt length (the first answer position), as ``Traceable.hidden_states`` reports them."""
    return [(embeds[i, : int(mask[i].sum())], int((labels[i] != IGNORE).nonzero()[0])) for i in range(len(embeds))]


def layer_states(lm: torch.nn.Module, seqs: Sequence[tuple[torch.Tensor, int]]) -> list[tuple[list[torch.Tensor], int]]:
    """Every layer's hidden states ``(T, d)`` (embeddings first) of each sequence, with its prompt
    length. One sequence at a time, so no padding enters the states the entropy probe measures."""
    out = []
    for seq, prompt_len in seqs:
        states = lm(inputs_embeds=seq[None], output_hidden_states=True).hidden_states
        out.append(([h[0].float().cpu() for h in states], prompt_len))
    return out
