"""A run's directory as a new user meets it: a finished run is never lost,
every interruption (Ctrl-C or SIGTERM, in the reference phase, a training
step or an evaluation) is continued exactly by ``--resume``, and ``--resume``
needs none of the run's options."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from centrifuge.cli import main
from centrifuge.interrupt import Interrupted
from centrifuge.training import CheckpointError, TrainConfig, train
from centrifuge.training.metrics import MetricsLog, read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def user_data(out, data_file, cache, **kw):
    base = dict(model="tiny", data=[str(data_file)], select="loss", ratio=0.5, seq_len=32,
                batch_size=2, steps=5, warmup_steps=2, lr=1e-2, eval_interval=0, eval_rows=4,
                save_interval=0, out_dir=str(out), cache_dir=cache, device="cpu")  # fmt: skip
    return TrainConfig(**{**base, **kw})


def builtin(out, cache, **kw):
    """The default pipeline, small: a built-in reference, then rho1."""
    base = dict(model="tiny", seq_len=32, batch_size=2, steps=4, reference_steps=4, warmup_steps=1,
                eval_interval=2, eval_rows=4, eval_problems=0, save_interval=0, out_dir=str(out),
                cache_dir=cache, device="cpu")  # fmt: skip
    return TrainConfig(**{**base, **kw})


def weights(ckpt):
    return load_file(str(ckpt / "model.safetensors"))


def history(out):
    """The metrics without timings: what an exact continuation must reproduce."""
    keep = ("kind", "step", "loss", "loss_all", "kept_fraction", "lr", "grad_norm", "perplexity")
    return [{k: r[k] for k in keep if k in r} for r in read_metrics(out / "metrics.jsonl")]


def test_a_finished_run_is_never_overwritten(tmp_path, data_file, cache):
    out = tmp_path / "run"
    train(user_data(out, data_file, cache, steps=3), progress=False)
    (out / "notes.txt").write_text("mine")
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match="already holds a run .*checkpoint-3.*--resume.*--overwrite"):
        train(user_data(out, data_file, cache, steps=2), progress=False)
    assert (out / "metrics.jsonl").read_text() == before
    assert (out / "latest").read_text().strip() == "checkpoint-3"
    s = train(user_data(out, data_file, cache, steps=2, overwrite=True), progress=False)
    assert s["steps"] == 2 and not (out / "checkpoint-3").exists()
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"] == [1, 2]
    assert (out / "notes.txt").read_text() == "mine"  # only the run's own files go
    with pytest.raises(ValueError, match="either resume or overwrite"):
        user_data(out, data_file, cache, resume=True, overwrite=True)
    # a checkpoint of another run continues into an empty directory, not into this run
    other = train(user_data(tmp_path / "other", data_file, cache, steps=1), progress=False)
    with pytest.raises(ValueError, match="already holds another run"):
        train(user_data(out, data_file, cache, steps=2, resume=other["checkpoint"]), progress=False)
    s = train(user_data(tmp_path / "new", data_file, cache, steps=2, resume=other["checkpoint"]),
              progress=False)  # fmt: skip
    assert s["steps"] == 2 and (out / "latest").read_text().strip() == "checkpoint-2"


def tree(d):
    return sorted(p.relative_to(d).as_posix() for p in d.rglob("*"))


def test_only_what_a_run_wrote_is_a_run_and_only_it_is_deleted(tmp_path, data_file, cache):
    # A user's own folders under the names a run writes are no run: nothing starts
    # there (it would write into them), --overwrite included, and nothing is deleted.
    mine = tmp_path / "mine"
    for name in ("reference", "tensorboard"):
        (mine / name).mkdir(parents=True)
        (mine / name / "notes.txt").write_text(name)
    (mine / "tensorboard" / "events.out.tfevents.1.host").write_text("the user's own")
    before = tree(mine)
    for kw in ({}, dict(overwrite=True)):
        with pytest.raises(ValueError, match="holds reference/, tensorboard/, which no Centrifuge "
                                             "run wrote"):  # fmt: skip
            train(user_data(mine, data_file, cache, **kw), progress=False)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(user_data(mine, data_file, cache, resume=True), progress=False)
    assert tree(mine) == before
    # In a run's directory, --overwrite deletes the files the run wrote, and keeps the
    # user's (in its checkpoints, its reference's directory, its TensorBoard folder).
    run = tmp_path / "run"
    train(builtin(run, cache), progress=False)
    (run / "tensorboard").mkdir()  # as a run writes it where TensorBoard is installed
    (run / "tensorboard" / "events.out.tfevents.2.host").write_bytes(b"")
    kept = [run / "checkpoint-4" / "my-eval.json", run / "reference" / "notes.txt",
            run / "tensorboard" / "notes.txt"]  # fmt: skip
    for p in kept:
        p.write_text("mine")
    s = train(builtin(run, cache, steps=2, overwrite=True), progress=False)
    assert all(p.read_text() == "mine" for p in kept)
    assert tree(run / "checkpoint-4") == ["my-eval.json"]
    assert tree(run / "tensorboard") == ["notes.txt"]
    assert (run / "latest").read_text().strip() == "checkpoint-2" and s["steps"] == 2
    # every file of a checkpoint has the permissions open() gives (safetensors' too)
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (run / "checkpoint-2").iterdir()}
    assert modes == dict.fromkeys(modes, 0o666 & ~umask)


def test_progress_in_a_log_is_a_plain_line_every_few_steps(tmp_path, data_file, cache, capsys):
    """stderr is not a terminal here: no bar redrawn at every step, but 20 lines a run."""
    train(user_data(tmp_path / "run", data_file, cache, steps=40), progress=True)
    err = capsys.readouterr().err
    lines = re.findall(r"^\[train\] step (\d+)/40: loss \d+\.\d+, kept 0\.\d\d, [\d,]+ tokens/s, "
                       r"\d+m\d\ds elapsed, ETA \d+m\d\ds$", err, re.M)  # fmt: skip
    assert [int(s) for s in lines] == list(range(2, 41, 2))
    assert "\r" not in err


def _signal_at(monkeypatch, where: str, kind: str, step: int, signum: int) -> None:
    """Send ``signum`` to this process right after the run in ``where`` logs
    its ``kind`` record of ``step``: as a user's Ctrl-C or a scheduler's SIGTERM."""
    original = MetricsLog.log

    def log(self, record):
        original(self, record)
        if self.path.parent.name == where and record["kind"] == kind and record["step"] == step:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(MetricsLog, "log", log)


def test_every_interruption_is_continued_exactly(tmp_path, cache, monkeypatch):
    straight = train(builtin(tmp_path / "a", cache), progress=False)
    out = tmp_path / "b"
    # SIGTERM in the reference phase: the reference stops after its step 2, with a checkpoint
    _signal_at(monkeypatch, "reference", "train", 2, signal.SIGTERM)
    with pytest.raises(Interrupted):
        train(builtin(out, cache), progress=False)
    assert (out / "reference" / "latest").read_text().strip() == "checkpoint-2"
    assert not (out / "latest").exists()
    with pytest.raises(ValueError, match="already holds a run .*interrupted before its first"):
        train(builtin(out, cache), progress=False)
    # Ctrl-C during the evaluation at step 2: the step's evaluation completes, then a checkpoint
    _signal_at(monkeypatch, "b", "eval", 2, signal.SIGINT)
    with pytest.raises(Interrupted):
        train(builtin(out, cache, resume=True), progress=False)
    assert (out / "latest").read_text().strip() == "checkpoint-2"
    assert (out / "reference" / "latest").read_text().strip() == "checkpoint-4"
    # SIGTERM after a training step
    _signal_at(monkeypatch, "b", "train", 3, signal.SIGTERM)
    with pytest.raises(Interrupted):
        train(builtin(out, cache, resume=True), progress=False)
    monkeypatch.undo()
    s = train(builtin(out, cache, resume=True), progress=False)
    assert s["steps"] == 4
    for phase in ("reference/checkpoint-4", "checkpoint-4"):
        a, b = weights(tmp_path / "a" / phase), weights(out / phase)
        assert all(torch.equal(a[k], b[k]) for k in a), phase
    assert history(out) == history(tmp_path / "a")
    assert history(out / "reference") == history(tmp_path / "a" / "reference")
    assert s["eval_loss"] == straight["eval_loss"]


def test_resume_restores_the_runs_options(tmp_path, data_file, cache, capsys):
    out = tmp_path / "run"
    argv = ["train", "--model", "tiny", "--data", str(data_file), "--select", "random",
            "--ratio", "0.4", "--seq-len", "32", "--batch-size", "2", "--warmup-steps", "1", "--lr", "1e-2",
            "--eval-interval", "0", "--eval-rows", "4", "--cache-dir", cache, "--device", "cpu",
            "--quiet", "--out-dir", str(out)]  # fmt: skip
    assert main(argv + ["--steps", "2"]) == 0
    assert main(["train", "--resume", "--out-dir", str(out), "--steps", "4", "--quiet"]) == 0
    assert "done: 4 steps" in capsys.readouterr().out
    finished = (out / "checkpoint-4" / "trainer_state.pt").read_bytes()
    assert main(["train", "--resume", "--out-dir", str(out), "--quiet"]) == 0  # nothing left to do
    said = capsys.readouterr().out
    assert said.startswith("already finished: 4 steps, none trained now")
    assert f"centrifuge train --resume --out-dir {out} --steps N, N > 4" in said
    assert (out / "checkpoint-4" / "trainer_state.pt").read_bytes() == finished
    # the same two commands through the API, every option given both times
    api = dict(select="random", ratio=0.4, warmup_steps=1, eval_interval=0)
    train(user_data(tmp_path / "api", data_file, cache, steps=2, **api), progress=False)
    again = train(user_data(tmp_path / "api", data_file, cache, steps=4, resume=True, **api),
                  progress=False)  # fmt: skip
    a, b = weights(out / "checkpoint-4"), load_file(again["checkpoint"] + "/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rc = main(["train", "--resume", "--out-dir", str(out), "--seed", "3", "--batch-size", "4",
               "--ratio", "0.4", "--steps", "5"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert "--batch-size 4 (the run's: 2); --seed 3 (the run's: 0)" in err and "ratio" not in err
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(user_data(tmp_path / "empty", data_file, cache, resume=True), progress=False)


def test_sigterm_to_the_command_saves_and_bare_resume_continues(tmp_path, data_file, cache):
    """The command as a scheduler meets it: SIGTERM in a training step, exit
    status 143 with the command that continues, and that command finishes the
    run as if nothing had happened."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "centrifuge.cli", "train", "--model", "tiny", "--data",
           str(data_file), "--select", "loss", "--ratio", "0.5", "--seq-len", "32",
           "--batch-size", "2", "--steps", "150", "--warmup-steps", "2", "--lr", "1e-2",
           "--eval-interval", "0", "--eval-rows", "4", "--save-interval", "0",
           "--cache-dir", cache, "--device", "cpu", "--out-dir", str(out)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + 120
    while p.poll() is None and time.monotonic() < deadline:  # in the middle of training
        if metrics.is_file() and '"kind": "train"' in metrics.read_text():
            p.send_signal(signal.SIGTERM)
            break
        time.sleep(0.01)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, err
    assert f"continue with: centrifuge train --resume --out-dir {out}" in err
    stopped = int((out / "latest").read_text().strip().removeprefix("checkpoint-"))
    assert 1 <= stopped < 150
    assert main(["train", "--resume", "--out-dir", str(out), "--quiet"]) == 0
    straight = train(user_data(tmp_path / "straight", data_file, cache, steps=150), progress=False)
    a, b = weights(out / "checkpoint-150"), load_file(straight["checkpoint"] + "/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_signal_stops_at_once_without_saving_a_half_step():
    from centrifuge.interrupt import DeferredStop

    stop = DeferredStop()
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # recorded, not raised
        assert stop.signum == signal.SIGTERM and not stop.forced
        with pytest.raises(Interrupted):
            os.kill(os.getpid(), signal.SIGINT)
        assert stop.forced
        with pytest.raises(Interrupted):
            stop.check()
    finally:
        stop.close()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
