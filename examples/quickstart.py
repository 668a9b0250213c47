"""A few token-filtered training steps of a tiny native model on CPU.

Run: python examples/quickstart.py
"""

import torch

from centrifuge import Selector, build_model, get_preset

torch.manual_seed(0)
model = build_model(get_preset("tiny"), seed=0)
opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
selector = Selector("loss", ratio=0.5)  # keep the hardest half of the tokens
data = torch.randint(0, 64, (8, 128))  # a small vocabulary: learnable in a few steps

for step in range(20):
    out = model(data, labels=data)  # dense forward: every token's loss
    keep = selector(out.token_loss, out.valid)  # choose rows
    loss = out.plan.loss(out.token_loss, keep)  # mean over kept rows
    loss.backward()  # the backward runs on kept rows only
    opt.step()
    opt.zero_grad(set_to_none=True)
    if step % 5 == 0 or step == 19:
        print(f"step {step:2d}  filtered loss {loss.item():.3f}  kept {out.plan.n_keep}/{int(out.valid.sum())}")
