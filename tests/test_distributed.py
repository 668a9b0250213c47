"""Several processes (torchrun, gloo, CPU): N processes with grad_accum a train
exactly what one process with grad_accum a·N trains, under DDP and FSDP2, in
amplified and exact mode with packed rows, with random selection and sampled
extra rows; sharded checkpoints resume exactly, also on another number of
processes; a stopped launch continues on one process with its built-in
reference; one rank's failure ends the launch with its message."""

import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from centrifuge.cli import main
from centrifuge.training import TrainConfig, train

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is missing")

WORKER = Path(__file__).parent / "distributed" / "worker.py"
HF_WORKER = Path(__file__).parent / "distributed" / "hf_worker.py"
N = 2


@pytest.fixture(scope="module")
def base(data_file, cache):
    """Packed rows (many short documents per row)."""
    return dict(model="tiny", data=[str(data_file)], select="loss", ratio=0.5, seq_len=48,
                batch_size=2, steps=3, warmup_steps=1, lr=1e-2, eval_interval=0, eval_rows=4,
                save_interval=0, cache_dir=cache, device="cpu")  # fmt: skip


def failed(proc: subprocess.CompletedProcess) -> str:
    """The ranks' tracebacks come first in torchrun's stderr, its summary last."""
    return proc.stderr[:3000] + "\n...\n" + proc.stderr[-1500:]


def torchrun(configs: list[dict], timeout: float = 240) -> subprocess.CompletedProcess:
    return launch(WORKER, json.dumps(configs), timeout=timeout)


def launch(script: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={N}", str(script), *args]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def weights(run_dir) -> dict:
    name = (Path(run_dir) / "latest").read_text().strip()
    return load_file(str(Path(run_dir) / name / "model.safetensors"))


# fp32 sums in another order (gradients all-reduced over processes instead of
# accumulated in one) differ in the last bits; AdamW divides by the gradient's
# own scale, so on an entry whose gradient is nearly zero that becomes an update
# difference of up to ~lr * 1e-3 (1.9e-5 seen on one CPU at lr 1e-2, 3 steps).
# A wrong scale or a dropped micro-batch moves weights by ~lr: far above this.
def assert_same_weights(a: dict, b: dict, atol: float = 1e-4) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=lambda m: f"{k}: {m}")


@pytest.fixture(scope="module")
def launched(tmp_path_factory, base, sft_file):
    """One torchrun launch training every multi-process configuration."""
    root = tmp_path_factory.mktemp("dist")
    runs = {
        "ddp": dict(base, parallel="ddp", grad_accum=2),
        "fsdp": dict(base, parallel="fsdp", grad_accum=2),
        "fsdp_exact": dict(base, parallel="fsdp", grad_accum=2, backward="exact"),
        # Gradients reduce-scattered after every micro-batch (kept sharded in between).
        "fsdp_sync_every": dict(base, parallel="fsdp", grad_accum=2, fsdp_grad_sync="every"),
        # Prompt/completion data: the prompts are context rows in the compact backward.
        "ddp_sft": dict(base, data=[str(sft_file)], seq_len=192, parallel="ddp", grad_accum=2),
        # Random draws (selection, sampled extra rows) are seeded per micro-batch.
        "ddp_random_extra": dict(base, parallel="ddp", grad_accum=2, select="random",
                                 backward_extra=0.5),
        # Rows ranked next (counted on the host per micro-batch); every 2nd step exact.
        "ddp_ranked_schedule": dict(base, parallel="ddp", grad_accum=2, backward_ratio=0.8,
                                    exact_every=2),
        # FSDP2 units re-gather the weights for the compact recompute in the backward.
        "fsdp_ckpt": dict(base, parallel="fsdp", grad_accum=2, activation_checkpointing=True),
        # 4 steps, saved at 2 and 4; then a copy of checkpoint-2 resumes to 4.
        "fsdp_long": dict(base, parallel="fsdp", steps=4, save_interval=2),
    }
    for name, cfg in runs.items():
        cfg["out_dir"] = str(root / name)
    proc = torchrun(list(runs.values()))
    assert proc.returncode == 0, failed(proc)
    return root, runs


@pytest.mark.parametrize("name", ["ddp", "fsdp", "fsdp_exact", "fsdp_sync_every", "fsdp_ckpt",
                                  "ddp_random_extra", "ddp_sft", "ddp_ranked_schedule"])
def test_n_processes_equal_one_process_with_n_times_the_accumulation(launched, tmp_path, name):
    root, runs = launched
    single = dict(runs[name], parallel="auto", grad_accum=runs[name]["grad_accum"] * N,
                  out_dir=str(tmp_path / "single"))  # fmt: skip
    summary = train(TrainConfig(**single), progress=False)
    assert_same_weights(weights(root / name), weights(tmp_path / "single"))
    dist_metrics = [json.loads(l) for l in (root / name / "metrics.jsonl").read_text().splitlines()]
    one_metrics = [json.loads(l) for l in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    assert [a["kind"] for a in dist_metrics] == [b["kind"] for b in one_metrics]
    for a, b in zip(dist_metrics, one_metrics):
        if a["kind"] == "train":
            # The step's loss is normalized over every kept row, and so is the
            # gradient (its norm: AdamW alone would hide a wrong scale).
            assert a["tokens_kept"] == b["tokens_kept"]
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    assert summary["tokens_kept"] == one_metrics[-2]["tokens_kept"] == dist_metrics[-2]["tokens_kept"]


def test_sharded_checkpoint_resumes_exactly(launched, tmp_path):
    root, runs = launched
    long_dir = root / "fsdp_long"
    assert (long_dir / "checkpoint-2" / "dcp").is_dir()  # the optimizer state, sharded
    # Same number of processes: resuming from checkpoint-2 reproduces checkpoint-4 exactly.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    subprocess.run(["cp", "-r", str(long_dir / "checkpoint-2"), str(resumed)], check=True)
    (resumed / "latest").write_text("checkpoint-2\n")
    proc = torchrun([dict(runs["fsdp_long"], out_dir=str(resumed), resume=True)])
    assert proc.returncode == 0, failed(proc)
    assert_same_weights(weights(long_dir), weights(resumed), atol=0)
    # One process with N times the accumulation continues the same run.
    single = tmp_path / "single"
    single.mkdir()
    subprocess.run(["cp", "-r", str(long_dir / "checkpoint-2"), str(single)], check=True)
    (single / "latest").write_text("checkpoint-2\n")
    train(TrainConfig(**dict(runs["fsdp_long"], out_dir=str(single), resume=True, parallel="auto",
                             grad_accum=N)), progress=False)  # fmt: skip
    assert_same_weights(weights(long_dir), weights(single))


def test_sigterm_on_one_process_stops_every_process_after_the_same_step(launched, tmp_path):
    """The stop request travels with the step's all-reduce: all processes save
    checkpoint-3 together, and --resume continues to the uninterrupted weights."""
    root, runs = launched
    run = tmp_path / "stopped"
    proc = torchrun([dict(runs["fsdp_long"], out_dir=str(run), save_interval=0,
                          sigterm_on_rank=1, sigterm_at_step=2)])  # fmt: skip
    assert proc.returncode != 0  # the launch ends as interrupted
    assert (run / "latest").read_text().strip() == "checkpoint-3"
    proc = torchrun([dict(runs["fsdp_long"], out_dir=str(run), resume=True)])
    assert proc.returncode == 0, failed(proc)
    assert_same_weights(weights(root / "fsdp_long"), weights(run), atol=0)


def _children(pid: int) -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()
            and Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1] == str(pid)]  # fmt: skip


def test_sigterm_under_torchrun_then_one_process_continues_with_the_same_reference(tmp_path, cache):
    """The default pipeline (a built-in reference, then rho1) under torchrun, a
    SIGTERM to one process in the middle of training: every process stops with
    a checkpoint and torchrun ends with status 0, the printed one-process command
    continues the run, the reference is reused as it is, and the weights are
    those of one process with N times the accumulation, straight through."""
    out, straight = tmp_path / "stopped", tmp_path / "straight"
    opts = ["--model", "tiny", "--seq-len", "32", "--batch-size", "2", "--reference-steps", "3",
            "--steps", "30", "--warmup-steps", "1", "--eval-interval", "0", "--eval-rows", "4",
            "--eval-problems", "0", "--save-interval", "0", "--cache-dir", cache, "--device", "cpu",
            "--quiet"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={N}",
           "-m", "centrifuge.cli", "train", *opts, "--parallel", "ddp", "--out-dir", str(out)]  # fmt: skip
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + 240
    while p.poll() is None and time.monotonic() < deadline:  # the run's first step, after the reference
        if metrics.is_file() and '"kind": "train"' in metrics.read_text():
            os.kill(_children(p.pid)[0], signal.SIGTERM)
            break
        time.sleep(0.01)
    _, err = p.communicate(timeout=240)
    assert p.returncode == 0 and "ChildFailedError" not in err, err[-3000:]
    stopped = int((out / "latest").read_text().strip().removeprefix("checkpoint-"))
    assert 1 <= stopped < 30
    assert (f"continue with: torchrun --nproc-per-node {N} -m centrifuge.cli train --resume "
            f"--out-dir {out}") in err  # fmt: skip
    one = err.split("or on one process: ")[1].splitlines()[0]
    assert one == f"centrifuge train --resume --out-dir {out} --grad-accum {N} --parallel auto"
    reference = out / "reference" / "checkpoint-3" / "model.safetensors"
    before = hashlib.sha256(reference.read_bytes()).hexdigest()
    assert main(shlex.split(one)[1:] + ["--quiet"]) == 0
    assert hashlib.sha256(reference.read_bytes()).hexdigest() == before
    assert (out / "reference" / "latest").read_text().strip() == "checkpoint-3"
    assert main(["train", *opts, "--grad-accum", str(N), "--out-dir", str(straight)]) == 0
    for phase in ("reference/checkpoint-3", "checkpoint-30"):
        assert_same_weights(load_file(str(out / phase / "model.safetensors")),
                            load_file(str(straight / phase / "model.safetensors")))  # fmt: skip


def test_checkpoint_loads_in_transformers(launched):
    transformers = pytest.importorskip("transformers")
    root, _ = launched
    ckpt = root / "fsdp" / (root / "fsdp" / "latest").read_text().strip()
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt)
    assert_same_weights({k: v for k, v in model.state_dict().items() if k in weights(root / "fsdp")},
                        weights(root / "fsdp"), atol=0)


def test_resume_with_another_global_batch_is_refused(launched, tmp_path):
    root, runs = launched
    from centrifuge.training import CheckpointError

    cfg = TrainConfig(**dict(runs["fsdp_long"], out_dir=str(root / "fsdp_long"), resume=True,
                             parallel="auto", steps=6))  # fmt: skip
    with pytest.raises(CheckpointError, match=r"grad_accum x processes: 1 x 2 -> 1 x 1"):
        train(cfg, progress=False)


def test_one_failing_rank_stops_the_launch(base, tmp_path):
    proc = torchrun([dict(base, parallel="ddp", out_dir=str(tmp_path / "fail"), fail_on_rank=1)],
                    timeout=120)
    assert proc.returncode != 0
    assert "injected failure on rank 1 at step 1" in proc.stderr


def test_parallel_modes_need_processes(base, tmp_path):
    with pytest.raises(ValueError, match="needs several processes"):
        train(TrainConfig(**dict(base, parallel="fsdp", out_dir=str(tmp_path / "x"))), progress=False)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_patched_hf_model_under_ddp_and_fsdp_equals_one_process(tmp_path, mode):
    """The plain-loop recipe (centrifuge.patch + filtered_loss normalized by the
    step's kept rows of every process) gives one process's gradients."""
    pytest.importorskip("transformers")
    sys.path.insert(0, str(HF_WORKER.parent))
    try:
        import hf_worker
    finally:
        sys.path.pop(0)
    proc = launch(HF_WORKER, mode, str(tmp_path / "grads.pt"))
    assert proc.returncode == 0, failed(proc)
    got = torch.load(tmp_path / "grads.pt")
    model = hf_worker.build_model()
    hf_worker.train_step(model, hf_worker.micro_batches(0, 1), world=1)
    want = {n: p.grad for n, p in model.named_parameters()}
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-9, atol=1e-12, msg=lambda m: f"{n}: {m}")


def test_centrifuge_trainer_under_fsdp_equals_ddp(tmp_path):
    """CentrifugeTrainer (examples/hf_trainer.py) under torchrun: FSDP2 through the
    Trainer trains the same weights as DDP."""
    pytest.importorskip("accelerate")
    example = Path(__file__).parents[1] / "examples" / "hf_trainer.py"
    for flags in ([], ["--fsdp"]):
        out = tmp_path / ("fsdp" if flags else "ddp")
        proc = launch(example, "--steps", "6", "--out", str(out), *flags)
        assert proc.returncode == 0, failed(proc)
    ddp, fsdp = (load_file(str(tmp_path / m / "model.safetensors")) for m in ("ddp", "fsdp"))
    assert_same_weights(ddp, fsdp, atol=1e-6)
