"""Held-out loss by kind of token on the built-in corpus' problems, and which
kinds Rho-1's selection keeps: where a backward mode loses quality."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from centrifuge.data.corpus import TOKEN_TYPES, Problem, char_types


def _token_losses(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, L] int64 ids, [B, L] 0/1 mask -> [B, L - 1] float32 loss of token j + 1."""
    h = model(ids, attention_mask=mask).hidden[:, :-1]
    logits = (h @ model.lm_head.weight.to(h.dtype).t()).float()
    return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")


@torch.no_grad()
def loss_by_token_type(model, tokenizer, problems: list[Problem], device="cpu", reference=None,
                       ratio: float | None = None, batch_size: int = 32) -> dict:  # fmt: skip
    """Mean loss of each of :data:`~centrifuge.data.corpus.TOKEN_TYPES` over
    ``problems`` (every token but each problem's first, which nothing predicts).

    With a ``reference`` model and a ``ratio``, also the share of each kind that
    Rho-1's selection would keep: the top ``ratio`` of all these tokens by excess
    loss (``model``'s loss minus ``reference``'s), as one batch.

    model, reference: native LlamaForCausalLM models (evaluated in eval mode).
    tokenizer: the byte tokenizer (one token per character of the ASCII text).
    Returns {type: dict(loss=float, tokens=int[, kept=float])}.
    """
    if not problems:
        raise ValueError("loss_by_token_type needs at least one problem")
    if (reference is None) != (ratio is None):
        raise ValueError("the kept shares need both a reference model and a ratio")
    models = [model] if reference is None else [model, reference]
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    losses, ref_losses, kinds = [], [], []
    try:
        for start in range(0, len(problems), batch_size):
            chunk = problems[start : start + batch_size]
            seqs = [tokenizer.encode(p.text) for p in chunk]
            for p, s in zip(chunk, seqs):
                if len(s) != len(p.text):
                    raise ValueError("loss_by_token_type needs one token per character (the byte "
                                     f"tokenizer); {tokenizer!r} gave {len(s)} for {len(p.text)}")  # fmt: skip
            L = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), L), tokenizer.eos_id, dtype=torch.long)
            mask = torch.zeros((len(seqs), L), dtype=torch.long)
            for i, s in enumerate(seqs):
                ids[i, : len(s)] = torch.tensor(s)
                mask[i, : len(s)] = 1
            ids, mask = ids.to(device), mask.to(device)
            per = [_token_losses(m, ids, mask).cpu() for m in models]
            for i, p in enumerate(chunk):
                n = len(seqs[i]) - 1
                losses.append(per[0][i, :n])
                if reference is not None:
                    ref_losses.append(per[1][i, :n])
                kinds += char_types(p)[1:]
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    loss = torch.cat(losses).double()
    kind = torch.tensor([TOKEN_TYPES.index(k) for k in kinds])
    keep = None
    if reference is not None:
        excess = loss - torch.cat(ref_losses).double()
        keep = torch.zeros_like(excess, dtype=torch.bool)
        keep[excess.topk(max(1, round(ratio * len(excess)))).indices] = True
    out = {}
    for j, name in enumerate(TOKEN_TYPES):
        sel = kind == j
        if sel.any():
            out[name] = dict(loss=float(loss[sel].mean()), tokens=int(sel.sum()))
            if keep is not None:
                out[name]["kept"] = float(keep[sel].double().mean())
    return out
