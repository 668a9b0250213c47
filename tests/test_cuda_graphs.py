"""The host side of captured steps (CUDA graphs themselves are tested in
tests/gpu/test_cuda_graphs_gpu.py): the padded layout a captured step reads
gives the model's gradients, the signature parts, the eager first call of the
captured update, and clear errors."""

import pytest
import torch

from centrifuge.cuda_graphs import StaticInputs
from centrifuge.models import build_model, get_preset
from centrifuge.plan import BackwardOptions, Layout
from centrifuge.selection import Selector
from centrifuge.training import TrainConfig, train
from centrifuge.training.graphs import CapturedUpdate, capacity, why_not_captured, why_update_not_captured
from centrifuge.training.loop import _optimizer


def packed_positions(B, L, seed):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(B):
        row = []
        while len(row) < L:
            row.extend(range(int(torch.randint(3, L // 2, (1,), generator=g))))
        rows.append(row[:L])
    return torch.tensor(rows)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_padded_layout_gives_the_same_gradients(seed):
    """forward(layout=Layout.build(...).padded(C)) — empty documents appended,
    max_seqlen the row length — equals forward(position_ids=...), compact plan."""
    model = build_model(get_preset("tiny"), dtype=torch.float64, seed=seed)
    B, L = 3, 29
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (B, L), generator=g)
    pos = packed_positions(B, L, seed)
    layout = Layout.build(B, L, "cpu", pos)
    n_docs = layout.cu_seqlens.numel() - 1
    padded = layout.padded(capacity(n_docs))
    assert padded.cu_seqlens.numel() == capacity(n_docs) > n_docs
    assert padded.max_seqlen == L and torch.equal(padded.cu_seqlens[: n_docs + 1], layout.cu_seqlens)
    grads = []
    for kw in (dict(position_ids=pos), dict(layout=padded)):
        out = model(ids, labels=ids, backward=BackwardOptions(path="compact"), **kw)
        keep = Selector("loss", 0.5)(out.token_loss, out.valid)
        out.plan.loss(out.token_loss, keep).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        model.zero_grad(set_to_none=True)
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-12, atol=1e-14, msg=n)
    with pytest.raises(ValueError, match="not both"):
        model(ids, labels=ids, position_ids=pos, layout=padded)
    with pytest.raises(ValueError, match="layout has shape"):
        model(ids[:, :-1], labels=ids[:, :-1], layout=padded)
    with pytest.raises(ValueError, match="capacity"):
        layout.padded(n_docs)


def test_signature_parts_and_refusals():
    assert [capacity(n) for n in (1, 2, 3, 4, 7, 8)] == [2, 4, 4, 8, 8, 16]
    amplified = BackwardOptions()
    assert why_not_captured(1, "loss", amplified) is None
    assert "several processes" in why_not_captured(2, "loss", amplified)
    assert "random selection" in why_not_captured(1, "random", amplified)
    assert "extra" in why_not_captured(1, "rho1", BackwardOptions(extra=0.5))
    assert why_not_captured(1, "loss", BackwardOptions(kv_projections=True)) is None
    assert why_not_captured(1, "loss", BackwardOptions(kv_projections=True, path="dense")) is None
    buffers = StaticInputs(torch.device("cpu"))
    first = buffers.update(x=torch.ones(2, 3))["x"]
    assert buffers.update(x=torch.zeros(2, 3))["x"] is first and not first.any()
    with pytest.raises(ValueError, match="fixed shapes"):
        buffers.update(x=torch.zeros(3, 3))


def test_cuda_graphs_need_a_cuda_device(tmp_path, data_file, cache):
    cfg = TrainConfig(model="tiny", data=[str(data_file)], select="loss", seq_len=32, batch_size=2,
                      steps=1, eval_interval=0, save_interval=0, out_dir=str(tmp_path / "run"),
                      cache_dir=cache, device="cpu", cuda_graphs=True)  # fmt: skip
    with pytest.raises(ValueError, match="needs a CUDA device"):
        train(cfg, progress=False)


def test_the_captured_update_starts_with_the_eager_step():
    """The first call of CapturedUpdate is the eager update — one AdamW step, not a
    warm-up step more — reading the lr from a device tensor, and it leaves the
    parameter groups (what checkpoints save) as an eager run's: float lrs,
    capturable off. Its later calls capture and replay (CUDA only)."""
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1)
    models = [build_model(get_preset("tiny"), dtype=torch.float64, seed=0) for _ in range(2)]
    opts = [_optimizer(m, cfg, fused=True) for m in models]
    g = torch.Generator().manual_seed(0)
    for pa, pb in zip(*(m.parameters() for m in models)):
        pa.grad = torch.randn(pa.shape, generator=g, dtype=pa.dtype)
        pb.grad = pa.grad.clone()

    def update(model, opt):
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        opt.zero_grad(set_to_none=False)
        return norm

    before = [p.detach().clone() for p in models[0].parameters()]
    want = update(models[0], opts[0])
    assert why_update_not_captured(opts[1]) is None
    captured = CapturedUpdate(opts[1], lambda: update(models[1], opts[1]), torch.device("cpu"))
    got = captured()
    assert (captured.calls, captured.replays, captured.graph) == (1, 0, None)
    assert got == want
    assert opts[1].state_dict()["param_groups"] == opts[0].state_dict()["param_groups"]
    assert all(type(group["lr"]) is float and not group["capturable"] for group in opts[1].param_groups)
    for (name, pa), pb, p0 in zip(models[0].named_parameters(), models[1].parameters(), before):
        sa, sb = opts[0].state[pa], opts[1].state[pb]
        assert sb["step"].item() == 1 and torch.equal(sa["step"], sb["step"]), name
        for key in ("exp_avg", "exp_avg_sq"):  # the lr does not enter the moments
            assert torch.equal(sa[key], sb[key]), (name, key)
        # The lr read as float32 changes the update by its rounding (2e-8 of 1e-2).
        torch.testing.assert_close(pb - p0, pa - p0, rtol=1e-7, atol=0, msg=name)
        assert pb.grad is not None and not pb.grad.any()
    assert "foreach" in why_update_not_captured(torch.optim.AdamW(models[0].parameters()))
