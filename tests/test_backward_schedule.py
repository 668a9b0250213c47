"""The backward knobs of ``centrifuge train``: a schedule of exact steps
(``exact_every``, ``exact_final``) and a backward set larger than the loss set
(``backward_ratio``). Short CPU runs of the tiny preset."""

import pytest
import torch

from centrifuge.cli import main
from centrifuge.models import LlamaForCausalLM
from centrifuge.training import CheckpointError, TrainConfig, train
from centrifuge.training.metrics import read_metrics
from centrifuge.training.schedule import ExactSchedule
from test_training import _weights, tiny


def test_exact_schedule_names_the_steps():
    def exact(every, final, total):
        s = ExactSchedule(every, final, total)
        return [step + 1 for step in range(total) if s(step)]  # 1-based, as logged

    assert exact(3, 0.0, 10) == [3, 6, 9]
    assert exact(0, 0.3, 10) == [8, 9, 10]  # ceil(0.3 * 10) = 3 steps, not 4
    assert exact(4, 0.25, 10) == [4, 8, 9, 10]  # ceil(2.5) = 3
    assert exact(0, 1.0, 4) == [1, 2, 3, 4] and exact(1, 0.0, 3) == [1, 2, 3]
    assert exact(0, 0.0, 5) == [] and not ExactSchedule(0, 0.0, 5).active


def _modes(monkeypatch):
    """Record (model id, backward mode) of every training forward's plan."""
    seen = []
    make_plan = LlamaForCausalLM.make_plan

    def spy(self, *a, **kw):
        plan = make_plan(self, *a, **kw)
        if torch.is_grad_enabled():  # not the evaluations
            seen.append((id(self), plan.mode))
        return plan

    monkeypatch.setattr(LlamaForCausalLM, "make_plan", spy)
    return seen


def test_exact_steps_switch_the_backward_without_a_new_model(tmp_path, data_file, cache, monkeypatch):
    """Steps 2, 4 (every 2nd) and 5-6 (the last third) run the exact backward, both
    micro-batches of each, on the same model; the metrics say which ran."""
    seen = _modes(monkeypatch)
    s = train(tiny(tmp_path, data_file, cache, steps=6, grad_accum=2, exact_every=2, exact_final=0.34),
              progress=False)  # fmt: skip
    want = [0, 1, 0, 1, 1, 1]
    assert [m == "exact" for _, m in seen] == [bool(e) for e in want for _ in range(2)]
    assert len({model for model, _ in seen}) == 1
    recs = [r for r in read_metrics(s["metrics"]) if r["kind"] == "train"]
    assert [r["exact_backward"] for r in recs] == want


def test_exact_steps_are_those_of_backward_exact(tmp_path, data_file, cache):
    """A schedule that runs every step exact trains what ``--backward exact``
    trains (bit for bit), and one that runs none what ``amplified`` trains; a
    mixed one trains neither."""
    def weights(name, **kw):
        train(tiny(tmp_path / name, data_file, cache, steps=4, **kw), progress=False)
        return _weights(tmp_path / name / "run" / "checkpoint-4")

    exact, amplified = weights("exact", backward="exact"), weights("amplified")
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    assert same(weights("final", exact_final=1.0), exact)
    assert same(weights("every", exact_every=1), exact)
    assert same(weights("off", exact_every=0, exact_final=0.0), amplified)
    mixed = weights("mixed", exact_every=2)
    assert not same(mixed, exact) and not same(mixed, amplified)


def test_backward_ratio_one_trains_what_the_exact_backward_trains(tmp_path, data_file, cache):
    """ρ_b = 1: every labelled row in the backward set is the exact gradient (up
    to rounding: other kernels); ρ < ρ_b < 1 is neither."""
    def weights(name, **kw):
        s = train(tiny(tmp_path / name, data_file, cache, steps=2, grad_clip=0.0, **kw), progress=False)
        return _weights(tmp_path / name / "run" / "checkpoint-2"), s

    exact, _ = weights("exact", backward="exact")
    all_rows, s = weights("all", backward_ratio=1.0)
    assert s["kept_fraction"] == pytest.approx(0.5, abs=0.02)  # the loss is still on the kept rows
    for k in exact:
        torch.testing.assert_close(all_rows[k], exact[k], rtol=1e-4, atol=1e-6, msg=k)
    between, _ = weights("between", backward_ratio=0.75)
    amplified, _ = weights("amplified")
    key = "model.layers.0.self_attn.k_proj.weight"
    for other in (exact, amplified):
        assert (between[key] - other[key]).abs().max() > 1e-5


def test_resumed_schedule_decides_as_the_run_did(tmp_path, data_file, cache):
    """Interrupted after step 2 and resumed, a run with a schedule and ranked rows
    takes the same decisions at the same steps and ends with the same weights;
    the schedule options cannot change on resume."""
    knobs = dict(exact_every=3, exact_final=0.2, backward_ratio=0.8, select="random")
    straight = train(tiny(tmp_path / "a", data_file, cache, steps=5, **knobs), progress=False)

    def stop_at_2(step, record):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny(tmp_path / "b", data_file, cache, steps=5, save_interval=2, **knobs),
              progress=False, callback=stop_at_2)  # fmt: skip
    with pytest.raises(CheckpointError, match="exact_every"):
        train(tiny(tmp_path / "b", data_file, cache, steps=5, resume=True, **dict(knobs, exact_every=2)),
              progress=False)  # fmt: skip
    # The CLI resumes with the run's own options, the schedule among them.
    assert main(["train", "--resume", "--out-dir", str(tmp_path / "b" / "run"), "--quiet"]) == 0
    history = [[(r["step"], r["exact_backward"], r["loss"]) for r in read_metrics(p) if r["kind"] == "train"]
               for p in (straight["metrics"], tmp_path / "b" / "run" / "metrics.jsonl")]  # fmt: skip
    assert history[0] == history[1]
    assert [e for _, e, _ in history[0]] == [0, 0, 1, 0, 1]
    wa, wb = _weights(tmp_path / "a" / "run" / "checkpoint-5"), _weights(tmp_path / "b" / "run" / "checkpoint-5")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("kw, match", [
    (dict(backward_ratio=0.4), r"backward_ratio must lie in \[ratio, 1\] = \[0.6, 1\]"),
    (dict(backward_ratio=1.2), "backward_ratio must lie in"),
    (dict(backward_ratio="x"), "backward_ratio must be a number"),
    (dict(backward="exact", backward_ratio=0.8), "mode 'exact'"),
    (dict(select="none", backward_ratio=0.8), "backward_ratio acts on filtered tokens"),
    (dict(exact_every=-1), "exact_every must be a non-negative integer"),
    (dict(exact_every=1.5), "exact_every must be a non-negative integer"),
    (dict(exact_final=1.5), r"exact_final must lie in \[0, 1\]"),
    (dict(backward="exact", exact_every=2), "backward 'exact' runs it on every step already"),
    (dict(select="none", exact_final=0.1), "exact_final acts on filtered tokens"),
])  # fmt: skip
def test_bad_knobs_fail_clearly(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)


def test_train_help_names_the_knobs(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for flag in ("--backward-ratio R", "--exact-every K", "--exact-final F"):
        assert flag in out
    assert "every K-th optimizer step" in out and "last share F" in out
