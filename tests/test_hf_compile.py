"""torch.compile on a patched transformers model (backend "eager": Dynamo's
tracing is what is under test, and it is the same for every backend).

A patched model's decoder layers and LM head run their autograd Functions
outside the compiled graphs: their backward reads the plan that the loss fills
after the forward. The gradients and the filtered-rows check must stay those
of the uncompiled model."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from test_hf_patch import batch, make_model  # noqa: E402

from centrifuge import filtered_loss, patch  # noqa: E402
from centrifuge.plan import Layout  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _step(model, ids, kw, keep, labels: bool):
    """One training forward + filtered loss + backward; the loss."""
    if labels:
        out = model(input_ids=ids, labels=ids, **kw)
        loss = filtered_loss(out.token_loss, keep)
    else:
        logits = model(input_ids=ids, **kw).logits
        tl = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        loss = filtered_loss(tl, keep[:, :-1])
    loss.backward()
    return loss.detach()


def _assert_step_matches(model, compiled, ids, kw, keep, labels=True):
    want_loss = _step(model, ids, kw, keep, labels)
    want = {n: p.grad for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    loss = _step(compiled, ids, kw, keep, labels)
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-12)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name], rtol=1e-10, atol=1e-12, msg=name)
    model.zero_grad(set_to_none=True)


def test_training_steps_at_new_shapes_with_and_without_attention_mask():
    """Two calls without attention_mask at different shapes make the batch and
    sequence sizes symbolic; a call with a mask at a third shape then raised
    "position_ids has shape (4, 10), expected (4, 10)" from Layout.build. Every
    step gives the uncompiled model's loss and gradients."""
    model = patch(make_model("llama")).train()
    compiled = torch.compile(model, backend="eager")
    g = torch.Generator().manual_seed(0)
    for B, L, padded in [(2, 8, False), (3, 9, False), (4, 10, True)]:
        ids = torch.randint(0, 61, (B, L), generator=g)
        mask = torch.ones(B, L, dtype=torch.long)
        mask[0, :3] = 0
        keep = (torch.rand(B, L, generator=g) < 0.5) & mask.bool()
        keep[:, -1], keep[1, 2] = False, True
        _assert_step_matches(model, compiled, ids, {"attention_mask": mask} if padded else {}, keep)


def test_layout_shape_check_with_symbolic_batch():
    """The cause of the error above: a symbolic batch size beside a static
    position_ids size; Dynamo decided ``16 in (1, batch)`` as False."""

    def build(batch, seqlen, position_ids, mask):
        return Layout.build(batch, seqlen, "cpu", position_ids, mask).segment_ids

    pos = torch.arange(7).repeat(4, 1)
    torch._dynamo.mark_static(pos, 0)
    mask = torch.ones(4, 7, dtype=torch.bool)
    mask[1, :2] = False
    got = torch.compile(build, backend="eager", dynamic=True)(4, 7, pos, mask)
    assert torch.equal(got, build(4, 7, pos, mask))


def test_layout_of_unpacked_rows_compiles_without_breaks():
    """No position_ids and no mask: one document per row, every size known on
    the host (no nonzero, no host sync); the same layout as the general path."""
    explained = torch._dynamo.explain(Layout.build)(3, 7)
    assert explained.graph_break_count == 0
    fast = Layout.build(3, 7)
    general = Layout.build(3, 7, position_ids=torch.arange(7))
    for name in ("position_ids", "segment_ids", "cu_seqlens"):
        assert torch.equal(getattr(fast, name), getattr(general, name)), name
    assert fast.max_seqlen == general.max_seqlen


def test_logits_step_and_rows_check_under_compile():
    """The logits form (final norm and LM head as their own Functions) gives the
    uncompiled gradients, and the backward still checks that no filtered row
    receives gradient: a traced backward would have read the plan unfilled and
    skipped the check."""
    ids, kw, keep = batch("padding", seed=3)
    model = patch(make_model("llama")).train()
    compiled = torch.compile(model, backend="eager")
    _assert_step_matches(model, compiled, ids, kw, keep, labels=False)
    out = compiled(input_ids=ids, labels=ids, **kw)
    loss = filtered_loss(out.token_loss, keep) + out.loss  # out.loss reaches filtered rows
    with pytest.raises(RuntimeError, match="gradient to filtered rows"):
        loss.backward()
