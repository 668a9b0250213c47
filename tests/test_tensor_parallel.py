"""Tensor parallelism with sequence parallelism (torchrun, gloo, CPU): the native
model split over 2 (and 4) processes gives one process's gradients in float64
for the amplified and exact backward, the quality knobs, activation
checkpointing, packed and padded rows, GQA, Qwen2 biases and Qwen3 q/k norms,
also with FSDP2 over the replicas (2-D); ``centrifuge train --tp 2`` trains one
process's weights, its checkpoint loads in transformers and resumes on one
process and on tp 2 x FSDP2; two torchrun "nodes" (--nnodes 2 on localhost) run
FSDP2 and tp x FSDP2; bad layouts are refused with a clear message."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from centrifuge.training import TrainConfig, train

sys.path.insert(0, str(Path(__file__).parent))
from test_distributed import WORKER, assert_same_weights, failed, weights  # noqa: E402

sys.path.pop(0)

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is missing")

TP_WORKER = Path(__file__).parent / "distributed" / "tp_worker.py"


def torchrun(script: Path, nproc: int, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    import os

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", str(script), *args]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _tp_worker():
    sys.path.insert(0, str(TP_WORKER.parent))
    try:
        import tp_worker
    finally:
        sys.path.pop(0)
    return tp_worker


def assert_one_process_gradients(got: list[dict], cases: list[dict]) -> None:
    w = _tp_worker()
    for case, g in zip(cases, got, strict=True):
        model = w.model_for(case)
        w.step(model, case)
        want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert g.keys() == want.keys(), case
        for n in want:
            torch.testing.assert_close(g[n], want[n], rtol=1e-9, atol=1e-12,
                                       msg=lambda m: f"{case} {n}: {m}")  # fmt: skip


TWO = [
    {},  # amplified, compact backward, prompts as context rows
    {"backward": "exact"},
    {"batch": "packed"},
    {"recompute": True, "batch": "packed"},
    {"recompute": True, "batch": "padded", "backward": "exact"},
    {"batch": "padded", "backward": "exact"},
    {"model": "tiny-gqa", "batch": "packed", "extra": 0.5},  # sampled filtered rows
    {"model": "tiny-qwen2", "exact_layers": 1, "batch": "padded"},  # biases, tied embeddings
    {"context": "constant", "batch": "packed"},  # prompts outside the backward set
    {"model": "tiny-qwen3", "recompute": True},  # q/k norms (replicated over heads)
]
FOUR = [
    {"tp": 4, "batch": "packed"},
    {"tp": 2, "recompute": True, "batch": "padded"},  # 2 replicas x tp 2, FSDP2 over replicas
    {"tp": 2, "model": "tiny-qwen3", "batch": "packed"},
]


@pytest.mark.parametrize("nproc,cases", [(2, TWO), (4, FOUR)], ids=["tp2", "tp4-and-tp2xfsdp2"])
def test_tensor_parallel_gives_one_process_gradients(tmp_path, nproc, cases):
    out = tmp_path / "grads.pt"
    proc = torchrun(TP_WORKER, nproc, str(out), json.dumps(cases))
    assert proc.returncode == 0, failed(proc)
    saved = torch.load(out)
    assert_one_process_gradients(saved["grads"], cases)
    if nproc == 2:
        # The recompute gathers the normalized rows it needs (every row's input,
        # its rows' post-attention norm) once, and the backward reads them: no
        # more all-gathers than a backward from saved activations, compact or dense.
        key = lambda case: json.dumps(case, sort_keys=True)  # noqa: E731
        gathers = dict(zip(map(key, cases), saved["backward_gathers"]))
        for case in ({"batch": "packed"}, {"batch": "padded", "backward": "exact"}):
            saved_acts = gathers[key(case)]
            assert saved_acts > 0 and gathers[key(dict(case, recompute=True))] == saved_acts, case


def test_unsupported_models_are_refused():
    from centrifuge.distributed.tensor_parallel import check_tensor_parallel
    from centrifuge.models import build_model, get_preset

    with pytest.raises(ValueError, match=r"splits the key/value heads \(2\): choose a tp that divides 2"):
        check_tensor_parallel(build_model(get_preset("tiny-gqa")), 4)
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    with pytest.raises(TypeError, match="supports Centrifuge's native model"):
        check_tensor_parallel(transformers.LlamaForCausalLM(cfg), 2)


@pytest.fixture(scope="module")
def small_run(data_file, cache):
    return dict(model="tiny", data=[str(data_file)], select="loss", ratio=0.5, seq_len=48,
                batch_size=2, steps=3, warmup_steps=1, lr=1e-2, eval_interval=0, eval_rows=4,
                save_interval=0, cache_dir=cache, device="cpu")  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_run, sft_file):
    """One launch of ``centrifuge train --tp 2`` on 2 processes (one replica)."""
    root = tmp_path_factory.mktemp("tp")
    base = dict(small_run, grad_accum=2, tp=2)
    runs = {
        "ckpt": dict(base, activation_checkpointing=True),
        "sft": dict(base, data=[str(sft_file)], seq_len=192),  # prompts: context rows
        # The built-in corpus: evaluation decodes answers (rows padded to a multiple of tp).
        "corpus": dict(base, data=None, steps=1, eval_problems=3),
        # 4 steps, saved at 2 and 4: checkpoint-2 resumes on other layouts.
        "long": dict(base, steps=4, save_interval=2),
    }
    for name, cfg in runs.items():
        cfg["out_dir"] = str(root / name)
    proc = torchrun(WORKER, 2, json.dumps(list(runs.values())))
    assert proc.returncode == 0, failed(proc)
    return root, runs


@pytest.mark.parametrize("name", ["ckpt", "sft", "corpus"])
def test_train_tp_equals_one_process(trained, tmp_path, name):
    root, runs = trained
    single = dict(runs[name], tp=1, out_dir=str(tmp_path / "single"))
    train(TrainConfig(**single), progress=False)
    assert_same_weights(weights(root / name), weights(tmp_path / "single"))
    metrics = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
               for d in (root / name, tmp_path / "single")]  # fmt: skip
    for a, b in zip(*metrics, strict=True):
        if a["kind"] == "train":
            assert a["tokens_kept"] == b["tokens_kept"] and a["tokens_seen"] == b["tokens_seen"]
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
        else:
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
            assert a["accuracy"] == b["accuracy"]


def _resume_copy(long_dir: Path, to: Path) -> Path:
    to.mkdir()
    subprocess.run(["cp", "-r", str(long_dir / "checkpoint-2"), str(to)], check=True)
    (to / "latest").write_text("checkpoint-2\n")
    return to


def test_tp_checkpoint_resumes_on_other_layouts_and_loads_in_transformers(trained, tmp_path):
    """checkpoint-2 of tp 2 (one replica, 2 micro-batches a step) continues on one
    process and on tp 2 x 2 FSDP2 replicas (1 micro-batch each) to the weights of
    the uninterrupted run: DCP reshards the optimizer state."""
    root, runs = trained
    long_dir = root / "long"
    assert (long_dir / "checkpoint-2" / "dcp").is_dir()  # the optimizer state, sharded by DCP
    single = _resume_copy(long_dir, tmp_path / "single")
    train(TrainConfig(**dict(runs["long"], out_dir=str(single), resume=True, tp=1)), progress=False)
    assert_same_weights(weights(long_dir), weights(single))
    four = _resume_copy(long_dir, tmp_path / "four")
    proc = torchrun(WORKER, 4, json.dumps([dict(runs["long"], out_dir=str(four), resume=True,
                                                grad_accum=1)]))  # fmt: skip
    assert proc.returncode == 0, failed(proc)
    assert_same_weights(weights(long_dir), weights(four))
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(long_dir / "checkpoint-4")
    full = weights(long_dir)
    assert_same_weights({k: v for k, v in model.state_dict().items() if k in full}, full, atol=0)


def test_tp_needs_torchrun(tmp_path, data_file, cache):
    cfg = TrainConfig(model="tiny", data=[str(data_file)], steps=1, cache_dir=cache, device="cpu",
                      tp=2, out_dir=str(tmp_path / "x"))  # fmt: skip
    with pytest.raises(ValueError, match="needs 2 x N processes"):
        train(cfg, progress=False)
    for knob in (dict(exact_top=1), dict(kv_projections=True)):
        with pytest.raises(ValueError, match="not supported under tensor parallelism"):
            TrainConfig(model="tiny", tp=2, **knob)


def test_data_parallel_modes_under_tp():
    from centrifuge.distributed import DistContext, choose_parallel

    two_replicas = DistContext(rank=0, world_size=4, tp=2)
    assert choose_parallel("auto", two_replicas, 10**6) == "fsdp"
    with pytest.raises(ValueError, match="'ddp' is not supported with tensor parallelism"):
        choose_parallel("ddp", two_replicas, 10**6)
    one_replica = DistContext(rank=1, world_size=2, tp=2)
    assert choose_parallel("auto", one_replica, 10**6) == "none"
    with pytest.raises(ValueError, match="needs several processes"):
        choose_parallel("fsdp", one_replica, 10**6)


def test_two_nodes_fsdp_and_tp_x_fsdp_equal_one_process(small_run, tmp_path):
    """Two torchrun launchers (--nnodes 2, rendezvous on localhost), 2 processes
    each: FSDP2 over 4 replicas, then tp 2 inside each "node" x FSDP2 across
    them; each trains what one process with the replicas' accumulation trains."""
    import os
    import socket

    runs = {"fsdp": dict(small_run, parallel="fsdp", grad_accum=1),
            "tp_fsdp": dict(small_run, tp=2, grad_accum=1, activation_checkpointing=True)}  # fmt: skip
    for name, cfg in runs.items():
        cfg["out_dir"] = str(tmp_path / name)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]))
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
                               f"--node-rank={r}", "--nproc-per-node=2", "--master-addr=127.0.0.1",
                               f"--master-port={port}", str(WORKER), json.dumps(list(runs.values()))],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]  # fmt: skip
    for p in nodes:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
    for name, cfg in runs.items():
        replicas = 4 // cfg.get("tp", 1)
        single = dict(cfg, parallel="auto", tp=1, grad_accum=replicas, out_dir=str(tmp_path / f"{name}-one"))
        train(TrainConfig(**single), progress=False)
        assert_same_weights(weights(tmp_path / name), weights(tmp_path / f"{name}-one"))


def test_fsdp_auto_choices_count_a_tensor_parallel_shard(monkeypatch):
    """fsdp_reshard auto keeps the gathered weights while they fit a quarter of
    a GPU: under tp a rank gathers 1/tp of them (70B at tp 8: 17.5 GB of 141).
    fsdp_grad_sync auto keeps unsharded fp32 gradients between micro-batches
    while they fit a tenth of a GPU (70B at tp 8: 35 GB, so it syncs every one;
    at tp 8 with 8B parameters, 4 GB: only the last)."""
    from types import SimpleNamespace

    from centrifuge.distributed import DistContext, choose_grad_sync, choose_reshard

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=141e9))
    gpu = torch.device("cuda", 0)
    flat, tp8 = DistContext(rank=0, world_size=16, device=gpu), DistContext(rank=0, world_size=16, tp=8, device=gpu)
    assert choose_reshard("auto", flat, int(70e9)) and not choose_reshard("auto", tp8, int(70e9))
    assert choose_grad_sync("auto", tp8, int(70e9), "fsdp") and not choose_grad_sync("auto", tp8, int(8e9), "fsdp")
    assert not choose_grad_sync("auto", flat, int(70e9), "ddp")  # DDP holds whole gradients anyway
    assert choose_grad_sync("every", flat, 1, "fsdp") and not choose_grad_sync("last", tp8, int(70e9), "fsdp")
    with pytest.raises(ValueError, match="fsdp_grad_sync must be one of"):
        choose_grad_sync("sometimes", flat, 1, "fsdp")
