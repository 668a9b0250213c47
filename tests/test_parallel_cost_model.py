"""scripts/parallel_cost_model.py: its arithmetic on hand-computed cases, the
calibration's solve, and the measured one-GPU tinyllama step it must reproduce."""

import pytest

from centrifuge.models import get_preset


@pytest.fixture
def pcm(load_script):
    return load_script("parallel_cost_model")


def test_activation_bytes_by_hand(pcm):
    # tinyllama: d = H·D = 2048, Hkv·D = 256, F = 5632, H = 32.
    c = get_preset("tinyllama-1.1b")
    assert pcm.activation_bytes(c, False) == 2 * (2048 * 4 + 2 * 256 + 2 * 5632) + 8 + 4 * 32
    assert pcm.activation_bytes(c, True) == 2 * 2048 + 4 * 32


def test_tp_collectives_by_hand(pcm):
    # Compute made free: what is left is the TP bytes of docs/parallelism.md at 1 GB/s.
    hw = pcm.Hardware(1e15, 1e15, 1e15, 1e15, nvlink=1.0)
    c = get_preset("tiny")
    assert (c.hidden_size, c.num_layers, c.vocab_size, c.tie_word_embeddings) == (64, 2, 512, False)
    lay = pcm.Layout("tiny", 1024, 1, rho=0.25, tp=2)
    s = pcm.step_time(lay, hw)
    row = (2 - 1) / 2 * 64 * 2 / 1e9  # seconds per gathered row: (tp-1)/tp · d · 2 B
    replicated = 2 * (2 - 1) / 2 * 4 * (2 * 512 * 64 + 64) / 1e9  # fp32 all-reduce of the root
    assert s["tp_comm_fwd"] == pytest.approx(2 * 4 * 1024 * row)
    assert s["dense"] == pytest.approx(2 * (4 + 6) * 1024 * row + replicated, rel=1e-6)
    assert s["centrifuge"] == pytest.approx(2 * (4 + 6 * 0.25) * 1024 * row + replicated, rel=1e-6)
    # With checkpointing: the recompute's collectives, and a backward that reads
    # the recompute's gathered h1 and h2 (4 row sets instead of 6).
    ckpt = pcm.step_time(pcm.Layout("tiny", 1024, 1, rho=0.25, tp=2, ckpt=True), hw)
    assert ckpt["dense"] - s["dense"] == pytest.approx(2 * (3 - 2) * 1024 * row, rel=1e-6)
    assert ckpt["centrifuge"] - s["centrifuge"] == pytest.approx(2 * (1 + 2 * 0.25 - 2 * 0.25) * 1024 * row,
                                                                rel=1e-6)  # fmt: skip


def test_fsdp_exposure(pcm):
    assert pcm._fsdp_exposed(3.0, 1.0, 4) == 3.0 + 3 * 2.0  # first whole, then the excess
    assert pcm._fsdp_exposed(1.0, 3.0, 4) == 1.0  # hidden but the first


def test_memory_by_hand(pcm):
    # AdamW under FSDP over 4, weights kept: 16 B + 4 B (kept, as measured) a layer
    # parameter on its GPU, the root's bf16 copy, plus activations etc.
    c = get_preset("tiny")
    lay = pcm.Layout("tiny", 1024, 1, tp=2, dp=4)
    m = pcm.memory(lay)
    layers, root = 2 * c.layer_parameters() / 2, 2 * 512 * 64 + 64
    assert m["static"] == pytest.approx(16 * (layers + root) / 4 + 4 * layers + 2 * root)
    assert m["activations"] == pytest.approx(pcm.activation_bytes(c, False) * 1024 / 2 * 2)
    assert m["centrifuge"] <= m["dense"]


def test_calibration_solves_its_two_steps(pcm):
    hw = pcm.calibrate()
    for preset, B, L, name in pcm.CALIBRATION:
        row = pcm._rows(name, variant="dense")
        s = pcm.step_time(pcm.Layout(preset, L, B, weights="bench-bf16"), hw)
        assert s["dense"] * 1e3 == pytest.approx(row["forward_ms"] + row["backward_ms"], rel=1e-9)


def test_reproduces_measured_tinyllama(pcm):
    # Tolerance: step ratio within 0.02, peak within 1 GiB of the H200 bench (one GPU, 8x2048).
    v = {r["label"]: r for r in pcm.validation(pcm.calibrate())}["tinyllama 8x2048, 1 GPU"]
    assert abs(v["ratio"][0] - v["ratio"][1]) < 0.02
    for key in ("gib_dense", "gib_centrifuge"):
        assert abs(v[key][0] - v[key][1]) < 1.0
