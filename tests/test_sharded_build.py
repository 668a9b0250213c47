"""A model that FSDP2 or tensor parallelism splits is built on the meta device
and each process fills only its own shards (torchrun, gloo, CPU): the gathered
weights equal one process's bit for bit — ``build_model``'s for a fresh run,
the whole checkpoint's (``from_pretrained``) for ``--resume`` and ``--model
DIR`` (FSDP2, tp 2, tp 2 x FSDP2; untied, tied with biases, q/k norms; a model
directory in bf16 over two files, one with a vocabulary FSDP2 splits unevenly)
— and no process holds more than its shards plus three full parameters' bytes
during the build, nor reads a model directory's tensors in ``check``, and a
split load reads from the checkpoint exactly the elements of its own shards,
while a DDP run (whole, as before) holds and reads the whole model. A damaged
or mismatched model directory still fails in ``check``."""

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from centrifuge.distributed import DistContext
from centrifuge.models import LlamaForCausalLM, build_model, get_preset
from centrifuge.models.llama import checkpoint_parameters
from centrifuge.training import TrainConfig, setup, train

sys.path.insert(0, str(Path(__file__).parent))
from test_distributed import failed  # noqa: E402
from test_tensor_parallel import torchrun  # noqa: E402

sys.path.pop(0)

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is missing")

BUILD_WORKER = Path(__file__).parent / "distributed" / "build_worker.py"


def _builds(tmp_path, nproc: int, configs: list[dict]) -> list[dict]:
    for i, c in enumerate(configs):
        c.setdefault("out_dir", str(tmp_path / f"run{i}"))
    out = tmp_path / "built.pt"
    proc = torchrun(BUILD_WORKER, nproc, str(out), json.dumps(configs))
    assert proc.returncode == 0, failed(proc)
    return torch.load(out)


def _assert_weights(built: dict, want: LlamaForCausalLM, cfg: dict) -> None:
    want = dict(want.named_parameters())  # a tied embedding once, as the worker's
    got = built["weights"]
    assert got.keys() == want.keys(), cfg
    for k in want:
        assert torch.equal(got[k], want[k]), f"{cfg['model']} tp {cfg.get('tp', 1)}: {k} differs"


def _assert_one_process_weights(built: dict, cfg: dict) -> None:
    _assert_weights(built, build_model(get_preset(cfg["model"]), seed=cfg["seed"]), cfg)


def _whole(built: dict) -> int:
    """Bytes of the whole model's fp32 weights."""
    return 4 * sum(v.numel() for v in built["weights"].values())


def _assert_sharded_memory(built: dict, cfg: dict) -> None:
    """Beyond its own shards a process holds at most three full parameters' bytes
    at once (it holds the drawn parameter or the block it reads, and that
    block's fp32 cast); a whole model would not fit that bound."""
    for r in built["ranks"]:
        bound = r["local"] + 3 * r["largest"]
        assert bound < _whole(built), "the model is too small for the check to tell a whole build"
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
    assert all(r["peak"] >= _whole(built[-1]) for r in built[-1]["ranks"])


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


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, data_file, cache):
    """Weights to load, none of them a fresh initialization of the runs' seeds:
    ``runs``: a one-process run of 1 step (grad_accum 2) per model, to resume;
    ``dirs``: model directories — ``mini`` (fp32, one file, seed 22),
    ``mini-259`` (``mini`` with an odd vocabulary: the embedding and LM head
    split unevenly over 2 data-parallel ranks; seed 23) and ``tiny-qwen3``
    (tied; bf16, over two files, the second also holding the tied
    ``lm_head.weight``, which a load ignores; seed 21)."""
    root = tmp_path_factory.mktemp("checkpoints")
    base = dict(data=[str(data_file)], select="loss", seq_len=32, batch_size=2, steps=1,
                grad_accum=2, cache_dir=cache, device="cpu", save_interval=0, eval_interval=0)  # fmt: skip
    runs = {}
    for name, seed in (("mini", 3), ("tiny-qwen2", 5)):
        runs[name] = root / f"run-{name}"
        train(TrainConfig(**dict(base, model=name, seed=seed, out_dir=str(runs[name]))), progress=False)
    mini = root / "mini"
    build_model(get_preset("mini"), seed=22).save_pretrained(mini)
    odd = root / "mini-259"
    build_model(dataclasses.replace(get_preset("mini"), vocab_size=259), seed=23).save_pretrained(odd)
    qwen3 = root / "qwen3"
    model = build_model(get_preset("tiny-qwen3"), seed=21)
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    model.save_pretrained(qwen3, state_dict=state)  # config.json; lm_head dropped
    from safetensors.torch import save_file

    (qwen3 / "model.safetensors").unlink()
    names = list(state)
    first, second = names[: len(names) // 2], names[len(names) // 2:]
    save_file({k: state[k] for k in first}, str(qwen3 / "model-00001-of-00002.safetensors"))
    save_file({k: state[k].clone() for k in second} | {"lm_head.weight": state["lm_head.weight"].clone()},
              str(qwen3 / "model-00002-of-00002.safetensors"))  # fmt: skip
    return dict(runs=runs, dirs={"mini": mini, "mini-259": odd, "tiny-qwen3": qwen3}, base=base)


def _resume_copy(run: Path, to: Path) -> str:
    shutil.copytree(run, to)
    return str(to)


def _whole_load(path: Path) -> LlamaForCausalLM:
    """One process's load of a checkpoint (a run's latest) or model directory."""
    latest = path / "latest"
    return LlamaForCausalLM.from_pretrained(path / latest.read_text().strip() if latest.is_file() else path)


def _assert_loads(tmp_path, nproc: int, checkpoints, cases: list[tuple[str, dict]]) -> list[dict]:
    """cases: (run or directory name, options). Every build equals the whole load
    of its checkpoint, which is not the fresh initialization of the run's seed,
    and a split one (FSDP2 or tp) read from the checkpoint exactly its own
    shards' elements on every rank (a whole read would be all of them, as DDP's
    is); returns the builds."""
    configs, wants = [], []
    for i, (what, opts) in enumerate(cases):
        run = checkpoints["runs"].get(what) if opts.get("resume") else None
        cfg = dict(checkpoints["base"], grad_accum=2 // (nproc // opts.get("tp", 1)), **opts)
        if run is not None:
            cfg.update(model=what, out_dir=_resume_copy(run, tmp_path / f"resumed{i}"))
        else:
            cfg["model"] = str(checkpoints["dirs"][what])
        configs.append(cfg)
        wants.append(_whole_load(run or checkpoints["dirs"][what]))
        fresh = build_model(wants[-1].config, seed=cfg["seed"])
        assert not torch.equal(fresh.lm_head.weight, wants[-1].lm_head.weight)
    built = _builds(tmp_path, nproc, [dict(c) for c in configs])
    for b, cfg, want in zip(built, configs, wants, strict=True):
        _assert_weights(b, want, cfg)
        whole = sum(v.numel() for v in b["weights"].values())
        for r in b["ranks"]:
            if cfg.get("parallel") == "ddp":
                assert r["read"] == whole, (cfg, r)
            else:
                assert r["read"] == r["local_elements"] < whole, (cfg, r)
    return built


def test_resume_and_model_dir_load_shard_by_shard(tmp_path, checkpoints):
    cases = [("mini", dict(resume=True, parallel="fsdp", seed=3)),
             ("mini", dict(resume=True, tp=2, seed=3)),
             ("tiny-qwen2", dict(resume=True, tp=2, seed=5)),  # tied, biases
             ("tiny-qwen3", dict(parallel="fsdp", seed=3)),  # tied, q/k norms; bf16, two files
             ("tiny-qwen3", dict(tp=2, seed=3)),
             ("mini", dict(tp=2, seed=3)),
             ("mini-259", dict(parallel="fsdp", seed=3)),  # uneven: 130 and 129 rows
             ("mini", dict(parallel="ddp", seed=3))]  # fmt: skip
    built = _assert_loads(tmp_path, 2, checkpoints, cases)
    for b, (what, opts) in zip(built[:-1], cases[:-1]):
        if what == "mini":
            _assert_sharded_memory(b, opts)
        if not opts.get("resume"):  # check() read the headers, no tensor
            assert all(r["check_peak"] < r["largest"] for r in b["ranks"]), (what, opts, b["ranks"])
    # The counters see a whole load: DDP's check() reads every weight, and its build holds them.
    ddp = built[-1]
    assert all(r["check_peak"] >= _whole(ddp) and r["peak"] >= _whole(ddp) for r in ddp["ranks"])


def test_resume_and_model_dir_load_on_tp_times_fsdp(tmp_path, checkpoints):
    cases = [("mini", dict(resume=True, tp=2, seed=3)),
             ("tiny-qwen3", dict(tp=2, seed=3)),
             ("mini-259", dict(tp=2, seed=3))]  # fmt: skip
    built = _assert_loads(tmp_path, 4, checkpoints, cases)
    _assert_sharded_memory(built[0], cases[0][1])


def test_checkpoint_parameters_read_whole_or_a_block(checkpoints):
    """A sharded bf16 directory: named_parameters() order, the tied lm_head.weight
    dropped; read whole (``t[:]``) or a block of rows and columns, float32 tensors
    equal to from_pretrained's and its blocks."""
    d = checkpoints["dirs"]["tiny-qwen3"]
    want = dict(LlamaForCausalLM.from_pretrained(d).named_parameters())
    got = checkpoint_parameters(d)
    assert [n for n, _ in got] == list(want) and "lm_head.weight" not in want
    for n, t in got:
        whole = t[:]
        assert whole.dtype == torch.float32 and torch.equal(whole, want[n]), n
        box = tuple(slice(1, 1 + k // 2) for k in want[n].shape)  # an odd start and length
        block = t[box]
        assert block.dtype == torch.float32 and torch.equal(block, want[n][box]), n


@pytest.mark.parametrize("damage,error", [
    ("truncate", "cannot read checkpoint file .*model-00002-of-00002.safetensors"),
    ("layers", "does not match its config: missing"),
    ("width", r"does not match its config: model.layers.0.mlp.gate_proj.weight has shape"),
])  # fmt: skip
def test_damaged_model_dir_fails_in_check_under_a_split_run(tmp_path, checkpoints, damage, error):
    """Under tp 2 (headers only) as on one process (a whole load): the same clear
    error, from check(), before anything is written."""
    d = tmp_path / "model"
    shutil.copytree(checkpoints["dirs"]["tiny-qwen3"], d)
    if damage == "truncate":
        f = d / "model-00002-of-00002.safetensors"
        f.write_bytes(f.read_bytes()[:-100])
    else:
        cfg = json.loads((d / "config.json").read_text())
        if damage == "layers":
            cfg["num_hidden_layers"] += 1
        else:
            cfg["intermediate_size"] += 8
        (d / "config.json").write_text(json.dumps(cfg))
    cfg = TrainConfig(**dict(checkpoints["base"], model=str(d), seed=3, out_dir=str(tmp_path / "out")))
    for c, ctx in ((dataclasses.replace(cfg, tp=2, grad_accum=2), DistContext(world_size=2, tp=2)),
                   (cfg, DistContext())):  # fmt: skip
        with pytest.raises(ValueError, match=error):
            setup.check(c, ctx, progress=False)
        assert not (tmp_path / "out").exists()


def test_materialize_takes_a_meta_model_and_every_parameter():
    from centrifuge.distributed import materialize
    from centrifuge.models.llama import initial_parameters

    with pytest.raises(ValueError, match="built on the meta device"):
        materialize(build_model(get_preset("tiny")), torch.device("cpu"), [])
    with torch.device("meta"):
        model = LlamaForCausalLM(get_preset("tiny"))
    some = [(n, t) for n, t in initial_parameters(model.config, 0) if "layers.1." not in n]
    with pytest.raises(ValueError, match=r"gave no tensor for \['model.layers.1"):
        materialize(model, torch.device("cpu"), some)


@pytest.mark.parametrize("shape,placements", [
    ((6, 5), "S0 S1"),  # uneven columns: 3 and 2
    ((3, 4), "S0 R"),  # uneven rows: 2 and 1
    ((2, 3), "S1 S1"),  # 3 columns over 4 ranks: the last holds none
    ((8, 4), "SS0 S0"),  # FSDP2 over a tp-split weight: rows contiguous
    ((8, 4), "S0 SS0"),  # rows 0 and 2 on rank 0: not contiguous
])  # fmt: skip
def test_a_part_is_read_at_its_indices(tmp_path, shape, placements):
    """On every rank of a 2 x 2 mesh (torch's fake process group: one process,
    no collectives), the part that materialize reads from a bf16 safetensors
    file equals ``distribute_tensor``'s split of the whole tensor bit for bit,
    and reads no more than its own elements where its indices are contiguous."""
    from safetensors.torch import save_file
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from centrifuge.distributed.materialize import _held_indices, _read_part
    from centrifuge.models.llama import StoredTensor

    class Counted(StoredTensor):
        read = 0

        def __getitem__(self, index):
            block = super().__getitem__(index)
            Counted.read += block.numel()
            return block

    kinds = {"S0": Shard(0), "S1": Shard(1), "R": Replicate(), "SS0": _StridedShard(0, split_factor=2)}
    full = torch.randn(shape).to(torch.bfloat16)
    save_file({"w": full}, str(tmp_path / "w.safetensors"))
    stored = Counted(tmp_path / "w.safetensors", "w", torch.float32)
    for rank in range(4):
        dist.init_process_group("fake", rank=rank, world_size=4, store=FakeStore())
        try:
            mesh = init_device_mesh("cpu", (2, 2))
            split = distribute_tensor(full.float(), mesh, [kinds[k] for k in placements.split()],
                                      src_data_rank=None)  # fmt: skip
            want = split.to_local()
            if want.numel() == 0:  # materialize reads nothing
                assert rank == 3 and placements == "S1 S1"
                continue
            Counted.read = 0
            got = _read_part(stored, _held_indices(split))
            assert torch.equal(got, want), (rank, got, want)
            assert Counted.read == want.numel() or placements == "S0 SS0", (rank, Counted.read)
        finally:
            dist.destroy_process_group()
