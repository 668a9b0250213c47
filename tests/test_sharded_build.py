"""A fresh model that FSDP2 or tensor parallelism splits is built on the meta
device and each process fills only its own shards (torchrun, gloo, CPU): the
gathered weights equal one process's ``build_model`` bit for bit (FSDP2, tp 2,
tp 2 x FSDP2; untied, tied with biases, q/k norms), and no process holds more
than its shards plus three full parameters' bytes during the build, while a DDP build
(whole, as before) holds the whole model."""

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from centrifuge.models import build_model, get_preset

sys.path.insert(0, str(Path(__file__).parent))
from test_distributed import failed  # noqa: E402
from test_tensor_parallel import torchrun  # noqa: E402

sys.path.pop(0)

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is missing")

BUILD_WORKER = Path(__file__).parent / "distributed" / "build_worker.py"


def _builds(tmp_path, nproc: int, configs: list[dict]) -> list[dict]:
    for i, c in enumerate(configs):
        c["out_dir"] = str(tmp_path / f"run{i}")
    out = tmp_path / "built.pt"
    proc = torchrun(BUILD_WORKER, nproc, str(out), json.dumps(configs))
    assert proc.returncode == 0, failed(proc)
    return torch.load(out)


def _assert_one_process_weights(built: dict, cfg: dict) -> None:
    want = build_model(get_preset(cfg["model"]), seed=cfg["seed"]).state_dict()
    want.pop("lm_head.weight") if get_preset(cfg["model"]).tie_word_embeddings else None
    got = built["weights"]
    assert got.keys() == want.keys(), cfg
    for k in want:
        assert torch.equal(got[k], want[k]), f"{cfg['model']} tp {cfg.get('tp', 1)}: {k} differs"


def _assert_sharded_memory(built: dict, cfg: dict) -> None:
    """Beyond its own shards a process holds at most three full parameters' bytes
    at once (the drawn one, and while it is split, its parts: a strided 2-D split
    copies all of them); a whole model would not fit that bound."""
    for r in built["ranks"]:
        bound = r["local"] + 3 * r["largest"]
        whole = 4 * get_preset(cfg["model"]).num_parameters()
        assert bound < whole, "the model is too small for the check to tell a whole build"
        assert r["peak"] <= bound, (cfg, r)


@pytest.fixture
def base(data_file, cache):
    return dict(data=[str(data_file)], select="loss", seq_len=32, batch_size=2, steps=1,
                cache_dir=cache, device="cpu", save_interval=0, eval_interval=0)  # fmt: skip


def test_two_processes_fsdp_and_tp(tmp_path, base):
    configs = [dict(base, model="mini", parallel="fsdp", seed=3),
               dict(base, model="mini", tp=2, seed=4),
               dict(base, model="tiny-qwen2", parallel="fsdp", seed=5),  # tied, biases
               dict(base, model="tiny-qwen2", tp=2, seed=5),
               dict(base, model="tiny-qwen3", tp=2, seed=6),  # tied, q/k norms
               dict(base, model="mini", parallel="ddp", seed=3)]  # fmt: skip
    built = _builds(tmp_path, 2, [dict(c) for c in configs])
    for b, cfg in zip(built, configs, strict=True):
        _assert_one_process_weights(b, cfg)
    for b, cfg in zip(built[:2], configs[:2]):
        _assert_sharded_memory(b, cfg)
    # The counter sees a whole build: DDP's processes each hold every weight.
    whole = 4 * sum(v.numel() for v in built[-1]["weights"].values())
    assert all(r["peak"] >= whole for r in built[-1]["ranks"])


def test_tp_times_fsdp(tmp_path, base):
    configs = [dict(base, model="mini", tp=2, seed=7),
               dict(base, model="tiny-qwen3", tp=2, seed=8)]  # fmt: skip
    built = _builds(tmp_path, 4, [dict(c) for c in configs])
    for b, cfg in zip(built, configs, strict=True):
        _assert_one_process_weights(b, cfg)
    _assert_sharded_memory(built[0], configs[0])


@pytest.mark.parametrize("name", ["tiny", "tiny-qwen2", "tiny-qwen3"])
def test_initial_parameters_are_build_models(name):
    """One at a time, the same values and names, and torch's generator left where
    ``build_model`` leaves it."""
    from centrifuge.models.llama import initial_parameters

    config = get_preset(name)
    want = dict(build_model(config, seed=11).named_parameters())
    after_build = torch.rand(4)
    got = list(initial_parameters(config, 11))
    assert torch.equal(torch.rand(4), after_build)
    assert [n for n, _ in got] == list(want)
    for n, t in got:
        assert t.dtype == torch.float32 and torch.equal(t, want[n]), n


def test_materialize_takes_a_meta_model():
    from centrifuge.distributed import materialize

    with pytest.raises(ValueError, match="built on the meta device"):
        materialize(build_model(get_preset("tiny")), torch.device("cpu"), [])
