"""The reference-score store: round trip, resume after an interruption, and
clear errors for incomplete, corrupt or mismatched stores."""

import json

import numpy as np
import pytest
import torch

from centrifuge import build_model, get_preset
from centrifuge.scoring import (
    ScoreWriter,
    load_reference_scores,
    read_header,
    score_dataset,
)
from centrifuge.scoring.store import DATA, HEADER


pytestmark = pytest.mark.usefixtures("one_thread")


class FakeDataset:
    """A PackedDataset stand-in: deterministic packed rows of random tokens."""

    def __init__(self, n_rows=13, seq_len=24, vocab=512, seed=0, fingerprint=None):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n_rows, seq_len), generator=g)
        self.labels = self.ids.clone()
        self.labels[:, :3] = -100  # a "prompt" without loss
        self.pos = torch.zeros_like(self.ids)
        for i in range(n_rows):  # two or three documents per row
            cuts = sorted(torch.randint(2, seq_len - 1, (2,), generator=g).tolist())
            p = torch.arange(seq_len)
            p[cuts[0]:] -= cuts[0]
            p[cuts[1]:] -= p[cuts[1]].clone()
            self.pos[i] = p
        self.seq_len = seq_len
        self.fingerprint = fingerprint or f"fake-{n_rows}x{seq_len}-v{vocab}-s{seed}"

    def __len__(self):
        return self.ids.shape[0]

    def batch(self, indices):
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return dict(input_ids=self.ids[idx], labels=self.labels[idx], position_ids=self.pos[idx])


def _write_all(path, ds, values, **kw):
    with ScoreWriter.open(path, ds, "model-a", **kw) as w:
        for a, b in w.pending_chunks():
            w.write_chunk(a, values[a:b])
    return path


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_round_trip(tmp_path, seed, dtype):
    n, L = [(13, 24), (7, 5), (1, 33)][seed]
    ds = FakeDataset(n, L, seed=seed)
    vals = np.random.default_rng(seed).gamma(2.0, 2.0, (n, L)).astype(np.float32)
    _write_all(tmp_path / "s", ds, vals, dtype=dtype, chunk_rows=[4, 3, 1][seed])
    got = load_reference_scores(tmp_path / "s", ds)
    assert isinstance(got, np.memmap) and got.shape == (n, L) and not got.flags.writeable
    assert got.dtype == np.dtype(dtype)
    if dtype == "float32":
        assert np.array_equal(got, vals)
    else:
        np.testing.assert_allclose(got.astype(np.float32), vals, rtol=1e-3, atol=1e-4)
    h = read_header(tmp_path / "s")
    assert h["rows_done"] == n and h["fingerprint"] == ds.fingerprint


def test_scores_are_the_reference_models_token_losses(tmp_path):
    ds = FakeDataset(11, 20, seed=3)
    model = build_model(get_preset("tiny"), seed=3)
    res = score_dataset(model, ds, tmp_path / "s", batch_size=4, chunk_rows=4)
    assert res["complete"] and res["rows_done"] == 11 and res["resumed_from"] == 0
    got = torch.from_numpy(np.array(load_reference_scores(tmp_path / "s", ds)))
    with torch.no_grad():
        b = ds.batch(range(11))
        out = model(b["input_ids"], labels=b["labels"], position_ids=b["position_ids"])
    torch.testing.assert_close(got, out.token_loss * out.valid, rtol=1e-5, atol=1e-5)
    assert (got[~out.valid] == 0).all() and (got[out.valid] > 0).all()


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path):
    ds = FakeDataset(10, 16, seed=4)
    model = build_model(get_preset("tiny"), seed=4)
    full = score_dataset(model, ds, tmp_path / "full", batch_size=2, chunk_rows=4)
    assert full["complete"]
    # A run killed after its first chunk: the store says so and is refused.
    part = score_dataset(model, ds, tmp_path / "part", batch_size=2, chunk_rows=4, max_chunks=1)
    assert not part["complete"] and part["rows_done"] == 4
    with pytest.raises(ValueError, match="incomplete: 4 of 10 rows"):
        load_reference_scores(tmp_path / "part", ds)
    # A crash inside the next chunk: its bytes are on disk but the header does not
    # count them, so the loader still refuses and the resume recomputes them.
    raw = np.memmap(tmp_path / "part" / DATA, dtype=np.float32, mode="r+", shape=(10, 16))
    raw[4:8] = 123.0
    raw.flush()
    del raw
    (tmp_path / "part" / (HEADER + ".tmp")).write_text("{ half a head")  # crash mid-rename
    with pytest.raises(ValueError, match="incomplete"):
        load_reference_scores(tmp_path / "part", ds)
    again = score_dataset(model, ds, tmp_path / "part", batch_size=2, chunk_rows=4)
    assert again["complete"] and again["resumed_from"] == 4
    a = load_reference_scores(tmp_path / "full", ds)
    b = load_reference_scores(tmp_path / "part", ds)
    assert np.array_equal(a, b)
    # Complete already: nothing left to do.
    assert score_dataset(model, ds, tmp_path / "part", batch_size=2, chunk_rows=4)["resumed_from"] == 10


def test_resume_refuses_another_model_or_layout(tmp_path):
    ds = FakeDataset(8, 16, seed=5)
    m1, m2 = build_model(get_preset("tiny"), seed=1), build_model(get_preset("tiny"), seed=2)
    score_dataset(m1, ds, tmp_path / "s", batch_size=2, chunk_rows=2, max_chunks=1)
    with pytest.raises(ValueError, match="made differently.*model"):
        score_dataset(m2, ds, tmp_path / "s", batch_size=2, chunk_rows=2)
    with pytest.raises(ValueError, match="made differently.*dtype"):
        score_dataset(m1, ds, tmp_path / "s", batch_size=2, chunk_rows=2, dtype="float16")
    with pytest.raises(ValueError, match="made differently.*fingerprint"):
        score_dataset(m1, FakeDataset(8, 16, seed=6), tmp_path / "s", batch_size=2, chunk_rows=2)
    res = score_dataset(m2, ds, tmp_path / "s", batch_size=2, chunk_rows=2, overwrite=True)
    assert res["complete"] and res["resumed_from"] == 0
    assert read_header(tmp_path / "s")["model"]["digest"] != ""


def test_mismatched_dataset_is_refused(tmp_path):
    ds = FakeDataset(6, 12)
    _write_all(tmp_path / "s", ds, np.ones((6, 12), np.float32), chunk_rows=4)
    with pytest.raises(ValueError, match="computed for dataset 'fake-6x12"):
        load_reference_scores(tmp_path / "s", FakeDataset(6, 12, seed=9))
    with pytest.raises(ValueError, match=r"shape \[6, 12\], the dataset has \[7, 12\]"):
        load_reference_scores(tmp_path / "s", FakeDataset(7, 12, fingerprint=ds.fingerprint))


def test_corrupt_stores_are_refused(tmp_path):
    ds = FakeDataset(6, 12)
    vals = np.arange(72, dtype=np.float32).reshape(6, 12) / 10
    with pytest.raises(ValueError, match="no reference-score store"):
        load_reference_scores(tmp_path / "missing", ds)
    s = _write_all(tmp_path / "s", ds, vals, chunk_rows=4)
    header = (s / HEADER).read_text()
    # A flipped value in a completed chunk fails its checksum.
    raw = np.memmap(s / DATA, dtype=np.float32, mode="r+", shape=(6, 12))
    raw[5, 3] += 1
    raw.flush()
    del raw
    with pytest.raises(ValueError, match=r"rows 4\.\.5 fail their checksum"):
        load_reference_scores(s, ds)
    assert load_reference_scores(s, ds, verify_checksums=False)[5, 3] == vals[5, 3] + 1
    # A truncated data file.
    _write_all(s, ds, vals, chunk_rows=4, overwrite=True)
    with open(s / DATA, "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match="holds 100 bytes"):
        load_reference_scores(s, ds)
    # Damaged headers.
    (s / HEADER).write_text(header[: len(header) // 2])
    with pytest.raises(ValueError, match="corrupt header"):
        load_reference_scores(s, ds)
    bad = json.loads(header)
    bad["rows_done"] = 99
    (s / HEADER).write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="bad sizes"):
        load_reference_scores(s, ds)
    bad = json.loads(header)
    bad["chunk_crc"] = bad["chunk_crc"][:1]
    (s / HEADER).write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="1 chunk checksums for 6 rows"):
        load_reference_scores(s, ds)
    (s / HEADER).write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a reference-score header"):
        load_reference_scores(s, ds)
    (s / HEADER).unlink()
    with pytest.raises(ValueError, match="has no header.json"):
        load_reference_scores(s, ds)


def test_writer_input_errors(tmp_path):
    ds = FakeDataset(5, 8)
    with pytest.raises(ValueError, match="score dtype must be one of"):
        with ScoreWriter.open(tmp_path / "s", ds, "m", dtype="int8"):
            pass
    with ScoreWriter.open(tmp_path / "s", ds, "m", chunk_rows=2) as w:
        with pytest.raises(ValueError, match="in order: next is row 0, got 2"):
            w.write_chunk(2, np.zeros((2, 8)))
        with pytest.raises(ValueError, match=r"shape \(2, 8\)"):
            w.write_chunk(0, np.zeros((3, 8)))
        with pytest.raises(ValueError, match="not finite"):
            w.write_chunk(0, np.full((2, 8), np.nan))
        with pytest.raises(ValueError, match="another process is writing"):
            with ScoreWriter.open(tmp_path / "s", ds, "m", chunk_rows=2):
                pass
        w.write_chunk(0, np.ones((2, 8)))
        assert w.rows_done == 2 and not w.complete
    with ScoreWriter.open(tmp_path / "h", ds, "m", dtype="float16", chunk_rows=5) as w:
        with pytest.raises(ValueError, match="overflow float16"):
            w.write_chunk(0, np.full((5, 8), 1e6))


def test_vocabulary_mismatch_is_named(tmp_path):
    ds = FakeDataset(3, 8, vocab=600)
    ds.ids[0, 0] = 599
    with pytest.raises(ValueError, match="vocabulary has 512 entries"):
        score_dataset(build_model(get_preset("tiny"), seed=0), ds, tmp_path / "s")


def test_resume_edge_cases(tmp_path):
    ds = FakeDataset(6, 10, seed=8)
    model = build_model(get_preset("tiny"), seed=8)
    # A crash after the first header, before the data file existed: starts afresh.
    with ScoreWriter.open(tmp_path / "s", ds, "m", chunk_rows=3):
        pass
    (tmp_path / "s" / DATA).unlink()
    res = score_dataset(model, ds, tmp_path / "s", batch_size=3, chunk_rows=3)
    assert res["complete"] and res["resumed_from"] == 0
    # The same weights given by another path resume (identity = the weights' digest).
    score_dataset(model, ds, tmp_path / "p", batch_size=3, chunk_rows=3, max_chunks=1,
                  model_source="/some/where")  # fmt: skip
    res = score_dataset(model, ds, tmp_path / "p", batch_size=3, chunk_rows=3,
                        model_source="elsewhere/../where")  # fmt: skip
    assert res["complete"] and res["resumed_from"] == 3
    assert np.array_equal(load_reference_scores(tmp_path / "p", ds), load_reference_scores(tmp_path / "s", ds))
    # A store whose completed data file vanished cannot be resumed silently.
    score_dataset(model, ds, tmp_path / "q", batch_size=3, chunk_rows=3, max_chunks=1)
    (tmp_path / "q" / DATA).unlink()
    with pytest.raises(ValueError, match="has no scores.bin"):
        score_dataset(model, ds, tmp_path / "q", batch_size=3, chunk_rows=3)
