"""Checkpoints: atomic writes under simulated crashes, verification, and
exact resume after a crash in the middle of a save."""

import json

import pytest
import torch
from safetensors.torch import load_file

from centrifuge.data import corpus
from centrifuge.models import LlamaForCausalLM, build_model, get_preset
from centrifuge.training import CheckpointError, TrainConfig, train
from centrifuge.training import checkpoint as ck


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("data") / "d.jsonl"
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus.documents("clean", 0, 40)))
    return f


def cfg(tmp_path, data_file, **kw):
    base = dict(model="tiny", data=[str(data_file)], select="random", ratio=0.5, seq_len=32,
                batch_size=2, steps=4, warmup_steps=1, eval_interval=0, eval_rows=2,
                save_interval=1, out_dir=str(tmp_path / "run"),
                cache_dir=str(tmp_path.parent / "cache"), device="cpu")  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def _crash_on_call(n, real):
    calls = []

    def f(*a, **k):
        calls.append(1)
        if len(calls) == n:
            raise OSError("simulated crash: disk full")
        return real(*a, **k)

    return f


@pytest.mark.parametrize("where", ["state", "latest"])
def test_crash_during_save_keeps_latest_valid_and_resume_is_exact(tmp_path, data_file, monkeypatch, where):
    straight = train(cfg(tmp_path / "a", data_file), progress=False)
    # crash while writing checkpoint-3: in its trainer state, or just before `latest` moves
    with monkeypatch.context() as m:
        if where == "state":
            m.setattr(ck.torch, "save", _crash_on_call(3, torch.save))
        else:
            m.setattr(ck, "_write_latest", _crash_on_call(3, ck._write_latest))
        with pytest.raises(OSError, match="simulated crash"):
            train(cfg(tmp_path / "b", data_file), progress=False)
    run = tmp_path / "b" / "run"
    assert (run / "latest").read_text().strip() == "checkpoint-2"
    assert not any(p.name.startswith(".tmp") for p in run.iterdir())
    assert (run / "checkpoint-3").exists() == (where == "latest")  # renamed before the crash
    ck.verify(ck.resolve(run))  # latest names a complete checkpoint
    resumed = train(cfg(tmp_path / "b", data_file, resume=True), progress=False)
    assert resumed["steps"] == straight["steps"] == 4
    wa = load_file(str(tmp_path / "a" / "run" / "checkpoint-4" / "model.safetensors"))
    wb = load_file(str(run / "checkpoint-4" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_leftovers_of_a_killed_save_are_ignored_and_removed(tmp_path):
    model = build_model(get_preset("tiny"), seed=0)
    out = tmp_path / "run"
    good = ck.save_checkpoint(out, 1, model, dict(step=1))
    # what a process killed mid-save leaves: a half-written temporary directory
    junk = out / ".tmp-checkpoint-2-deadbeef"
    junk.mkdir()
    (junk / "model.safetensors").write_bytes(b"\0" * 10)
    assert ck.resolve(out) == good
    assert ck.load_trainer_state(good)["step"] == 1
    assert junk in ck.clean_partial(out) and not junk.exists()


def test_verify_reports_incomplete_and_corrupt(tmp_path):
    model = build_model(get_preset("tiny"), seed=0)
    c = ck.save_checkpoint(tmp_path, 5, model, dict(step=5))
    assert LlamaForCausalLM.from_pretrained(c).config.hidden_size == 64
    (c / "trainer_state.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt.*trainer_state.pt"):
        ck.load_trainer_state(c)
    (c / "config.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete.*config.json"):
        ck.verify(c)
    (c / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        ck.verify(c)
    (tmp_path / "latest").write_text("checkpoint-9\n")
    with pytest.raises(CheckpointError, match="does not exist"):
        ck.resolve(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        ck.resolve(tmp_path / "nowhere")


def test_saving_the_same_step_again_replaces_it(tmp_path):
    a = build_model(get_preset("tiny"), seed=0)
    b = build_model(get_preset("tiny"), seed=1)
    ck.save_checkpoint(tmp_path, 3, a, dict(step=3))
    c = ck.save_checkpoint(tmp_path, 3, b, dict(step=3))
    w = load_file(str(c / "model.safetensors"))
    assert torch.equal(w["model.norm.weight"], b.model.norm.weight.detach())
    assert torch.equal(w["lm_head.weight"], b.lm_head.weight.detach())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "latest"]
