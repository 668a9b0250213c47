"""TrainConfig: every option of a training run, validated before anything runs.

The same options come from the command line, a YAML/TOML file, or Python.
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from centrifuge.data.formats import FORMATS
from centrifuge.distributed import GRAD_SYNC_MODES, PARALLEL_MODES, RESHARD_MODES
from centrifuge.plan import BACKWARD_MODES, BackwardOptions
from centrifuge.selection import GRANULARITIES, METHODS

DTYPES = ("fp32", "bf16")
# The backward's quality knobs: they act on filtered tokens only.
KNOBS = ("backward_extra", "backward_extra_weight", "exact_layers", "exact_top", "kv_projections",
         "backward_ratio", "exact_every", "exact_final")
DEFAULT_MODEL = "mini"  # a byte-level preset that learns the built-in corpus in minutes on CPU


@dataclass
class TrainConfig:
    """Options of ``centrifuge train`` (the CLI flags are these names with dashes).

    model:            preset name (centrifuge.models.PRESETS), local HF checkpoint directory,
                      or a training run directory (its latest checkpoint).
    data:             data files/directories, or None for the built-in corpus.
    tokenizer:        local HF tokenizer directory, "byte", or None (the model directory's
                      tokenizer if it has one, else the built-in byte tokenizer).
    select, ratio, granularity: token selection (centrifuge.selection.Selector).
    reference:        reference model directory for ``rho1`` (its losses computed on the fly).
    reference_scores: precomputed reference scores (``centrifuge score``) for ``rho1``.
                      With neither, on the built-in corpus a reference model is first
                      trained on its clean split (``reference_steps``), as Rho-1 does.
    backward:         ``amplified`` (Centrifuge: backward on kept rows) or ``exact``
                      (masked loss, dense backward: the usual token filtering).
    backward_extra, backward_extra_weight, exact_layers: quality knobs of ``amplified``
                      (centrifuge.plan.BackwardOptions ``extra``, ``extra_weight``,
                      ``exact_layers``): each filtered row that precedes a kept one joins
                      the backward with probability backward_extra, its K/V gradient
                      from other rows weighted 1/p (unbiased) or backward_extra_weight;
                      the bottom exact_layers layers run the exact backward.
    exact_top:        the top exact_top layers run the exact backward, the gradient
                      stopped at filtered tokens below them (BackwardOptions ``exact_top``).
    kv_projections:   filtered tokens' K/V gradients reach the K/V projections, not the
                      residual stream (BackwardOptions ``kv_projections``).
    backward_ratio:   quality knob of ``amplified`` (BackwardOptions ``backward_ratio``), in
                      [ratio, 1]: the labelled rows the selection ranks next after the kept
                      ones, up to this share, join the backward without a loss (as context
                      rows do); None = only the kept rows. 1 = the exact gradient.
    exact_every, exact_final: a schedule of ``amplified``: the exact backward (masked loss,
                      dense) on every exact_every-th optimizer step (0 = never) and on the
                      last exact_final share of the steps (0 = none), the amplified one on
                      the others; the metric ``exact_backward`` says which ran.
    backward_path:    how ``amplified`` is computed (the gradients are the same):
                      ``compact`` (gathered kept rows), ``dense`` (full-size GEMMs,
                      filtered K/V gradients zeroed; small models) or ``auto``.
    context_rows:     rows labelled -100 before a labelled row (the prompt of SFT data):
                      ``backward`` keeps them in the backward set (plain SFT's gradient at
                      ratio 1), ``constant`` treats them like filtered rows (cheaper,
                      another gradient; BackwardOptions ``context``).
    seq_len, batch_size, grad_accum: rows of seq_len tokens; batch_size rows per
                      micro-batch, grad_accum micro-batches per optimizer step.
    lr, warmup_steps, min_lr_ratio: linear warm-up to lr, cosine decay to lr * min_lr_ratio.
    weight_decay, grad_clip: AdamW weight decay (matrices only); max gradient norm (0 = off).
    steps, max_tokens: optimizer steps; a token budget (rows * seq_len) caps them if set.
    dtype:            fp32, or bf16 autocast (fp32 master weights).
    activation_checkpointing: decoder layers keep only their input and recompute
                      the rest in the backward (on kept rows with ``amplified``).
    cuda_graphs:      replay micro-batches from CUDA graphs, one capture per shape (kept,
                      context and document counts; centrifuge.training.graphs), and the
                      optimizer update from the second step on: the host no longer
                      issues every kernel, and ``backward_path`` ``auto`` takes
                      the compact path. One CUDA process; random selection and sampled
                      extra rows run eagerly, and say so.
    device:           "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...; under
                      torchrun every process takes cuda:LOCAL_RANK (or the CPU).
    parallel:         several processes (torchrun): "ddp", "fsdp" (FSDP2, one unit per
                      decoder layer + the root), or "auto" (DDP while the replicated
                      weights, gradients and optimizer state fit in half a GPU, else FSDP);
                      one process: "auto" or "none".
    tp:               tensor parallelism (with sequence parallelism) of the native model
                      over groups of tp consecutive processes; the processes / tp
                      data-parallel replicas are "parallel"'s (FSDP with tp > 1).
    fsdp_reshard:     FSDP: "off" keeps each layer's gathered weights from forward to
                      backward (faster), "on" gathers them again (less memory), "auto"
                      off while they take at most a quarter of a GPU.
    fsdp_grad_sync:   FSDP with grad_accum > 1: "last" reduce-scatters the gradients after
                      a step's last micro-batch (fewest bytes; unsharded fp32 gradients
                      between micro-batches), "every" after each one (sharded gradients),
                      "auto" last while those gradients take at most a tenth of a GPU.
    eval_interval, save_interval: in steps (0 = only at the end).
    out_dir, resume:  output directory; resume = True continues the run in ``out_dir``
                      (from ``latest``, or from the start if it was interrupted before
                      its first checkpoint), a path continues from that checkpoint.
    overwrite:        start over in an ``out_dir`` that holds a run, deleting it (without
                      it, a new run there is refused: a finished run is never lost).
    """

    model: str = DEFAULT_MODEL
    data: list[str] | None = None
    tokenizer: str | None = None
    select: str = "rho1"
    ratio: float = 0.6
    granularity: str = "batch"
    reference: str | None = None
    reference_scores: str | None = None
    backward: str = "amplified"
    backward_extra: float = 0.0
    backward_extra_weight: float | None = None
    exact_layers: int = 0
    exact_top: int = 0
    kv_projections: bool = False
    backward_path: str = "auto"
    context_rows: str = "backward"
    backward_ratio: float | None = None
    exact_every: int = 0
    exact_final: float = 0.0
    seq_len: int = 256
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-3
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    steps: int = 400
    max_tokens: int | None = None
    dtype: str = "fp32"
    activation_checkpointing: bool = False
    cuda_graphs: bool = False
    device: str = "auto"
    parallel: str = "auto"
    tp: int = 1
    fsdp_reshard: str = "auto"
    fsdp_grad_sync: str = "auto"
    seed: int = 0
    eval_interval: int = 100
    save_interval: int = 200
    out_dir: str = "runs/train"
    resume: bool | str = False
    overwrite: bool = False
    # Beyond the shared contract: options of this trainer.
    reference_steps: int = 150  # steps of the built-in reference model (built-in corpus, rho1)
    eval_rows: int = 256  # held-out rows per evaluation
    eval_problems: int = 300  # held-out problems for answer accuracy (built-in corpus; 0 = none)
    # How a JSONL/Parquet/Arrow record becomes a document (centrifuge.data.formats):
    # "text" (text_field), "prompt-completion" (the loss on the completion only),
    # "messages" (on the assistant turns only), or "auto" (by the first record's fields).
    data_format: str = "auto"
    text_field: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    cache_dir: str | None = None  # token cache (default ~/.cache/centrifuge)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad option."""
        def need(cond, msg):
            if not cond:
                raise ValueError(msg)

        need(isinstance(self.model, str) and self.model, "model must be a preset name or a directory")
        if isinstance(self.data, (str, Path)):
            self.data = [str(self.data)]
        need(self.data_format in FORMATS,
             f"data_format must be one of {FORMATS}, got {self.data_format!r}")
        need(self.prompt_field != self.completion_field,
             f"prompt_field and completion_field must differ, both are {self.prompt_field!r}")
        need(self.select in METHODS, f"select must be one of {METHODS}, got {self.select!r}")
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type.startswith("float") and not (v is None and f.type.endswith("None")):
                need(isinstance(v, (int, float)) and not isinstance(v, bool),
                     f"{f.name} must be a number, got {v!r}")
        need(isinstance(self.ratio, (int, float)) and not math.isnan(self.ratio)
             and 0.0 < self.ratio <= 1.0, f"ratio must lie in (0, 1], got {self.ratio}")  # fmt: skip
        need(self.granularity in GRANULARITIES,
             f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        need(self.backward in BACKWARD_MODES,
             f"backward must be one of {BACKWARD_MODES}, got {self.backward!r}")
        self.backward_options()  # raises on bad knobs
        if self.backward_ratio is not None:
            need(self.ratio <= self.backward_ratio <= 1.0,
                 f"backward_ratio must lie in [ratio, 1] = [{self.ratio:g}, 1] (the backward set "
                 f"holds the kept rows), got {self.backward_ratio}")  # fmt: skip
        need(isinstance(self.exact_every, int) and not isinstance(self.exact_every, bool)
             and self.exact_every >= 0,
             f"exact_every must be a non-negative integer (0 = off), got {self.exact_every!r}")  # fmt: skip
        need(0.0 <= self.exact_final <= 1.0,
             f"exact_final must lie in [0, 1] (a share of the steps), got {self.exact_final}")
        need(self.backward == "amplified" or not (self.exact_every or self.exact_final),
             "exact_every / exact_final run the exact backward on some steps of an amplified run; "
             "backward 'exact' runs it on every step already")  # fmt: skip
        knobs = [n for n in KNOBS if getattr(self, n) not in (0, None)]
        need(self.select != "none" or not knobs,
             f"{' and '.join(knobs)} {'act' if len(knobs) > 1 else 'acts'} on filtered tokens, "
             "and select 'none' filters none: "
             "leave it out, or choose a selection")
        need(not (self.resume and self.overwrite), "give either resume or overwrite, not both")
        need(not (self.reference and self.reference_scores),
             "give either reference or reference_scores, not both")
        for name in ("seq_len", "batch_size", "grad_accum", "steps", "reference_steps", "eval_rows", "tp"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                 f"{name} must be a positive integer, got {v!r}")
        need(self.seq_len >= 2, f"seq_len must be at least 2, got {self.seq_len}")
        for name in ("warmup_steps", "eval_interval", "save_interval", "seed", "eval_problems"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                 f"{name} must be a non-negative integer, got {v!r}")
        need(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
             f"max_tokens must be a positive integer or None, got {self.max_tokens!r}")
        need(self.lr > 0 and math.isfinite(self.lr), f"lr must be positive, got {self.lr}")
        need(0.0 <= self.min_lr_ratio <= 1.0, f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(self.grad_clip >= 0, f"grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
        need(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        need(isinstance(self.activation_checkpointing, bool),
             f"activation_checkpointing must be true or false, got {self.activation_checkpointing!r}")
        need(isinstance(self.cuda_graphs, bool), f"cuda_graphs must be true or false, got {self.cuda_graphs!r}")
        need(self.parallel in PARALLEL_MODES,
             f"parallel must be one of {PARALLEL_MODES}, got {self.parallel!r}")
        need(self.fsdp_reshard in RESHARD_MODES,
             f"fsdp_reshard must be one of {RESHARD_MODES}, got {self.fsdp_reshard!r}")
        need(self.fsdp_grad_sync in GRAD_SYNC_MODES,
             f"fsdp_grad_sync must be one of {GRAD_SYNC_MODES}, got {self.fsdp_grad_sync!r}")
        # Both read or mask full-size rows inside a layer, where tensor parallelism
        # holds only this rank's share of them.
        need(self.tp == 1 or not (self.exact_top or self.kv_projections),
             "exact_top and kv_projections are not supported under tensor parallelism (tp > 1) yet")

    def backward_options(self) -> BackwardOptions:
        """A fresh :class:`BackwardOptions` of these options (the training loop
        seeds its sampling generator for every micro-batch)."""
        return BackwardOptions(self.backward, self.backward_extra, self.backward_extra_weight,
                               self.exact_layers, seed=self.seed, path=self.backward_path,
                               context=self.context_rows, exact_top=self.exact_top,
                               kv_projections=self.kv_projections,
                               backward_ratio=self.backward_ratio)  # fmt: skip

    def tokens_per_step(self, processes: int = 1) -> int:
        """Tokens of one optimizer step over ``processes`` (torchrun) processes."""
        return self.batch_size * self.grad_accum * self.seq_len * processes

    def total_steps(self, processes: int = 1) -> int:
        """``steps``, capped by the token budget when ``max_tokens`` is set."""
        if self.max_tokens is None:
            return self.steps
        return max(1, min(self.steps, self.max_tokens // self.tokens_per_step(processes)))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "") -> "TrainConfig":
        """Options by name; numbers given as text (YAML reads ``1e-3`` as a
        string) become numbers. ``source``: where ``d`` comes from, for errors."""
        return cls(**cls.parse(d, source))

    @classmethod
    def parse(cls, d: dict, source: str = "") -> dict:
        """``d`` checked for unknown names, numbers written as text converted."""
        where = f"{source}: " if source else ""
        types = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(d) - types.keys())
        if unknown:
            hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, types, 1))
                     else repr(k) for k in unknown]  # fmt: skip
            raise ValueError(f"{where}unknown training option(s) {', '.join(hints)}; known: "
                             f"{', '.join(sorted(types))}")  # fmt: skip
        out = dict(d)
        for k, v in d.items():
            kind = types[k].split(" ")[0]
            if kind in ("int", "float") and isinstance(v, (str, float)) and not isinstance(v, bool):
                out[k] = _number(k, v, kind, where)
        return out

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> "TrainConfig":
        """Read options from a .yaml/.yml, .toml or .json file (dashes or
        underscores in keys); ``overrides`` win."""
        return cls.from_dict({**cls.parse(read_config_file(path), f"config file {path}"), **overrides})


def _number(name: str, v, kind: str, where: str):
    """``v`` (text, or a float for an integer option) as a number of ``kind``."""
    try:
        x = float(v)
    except ValueError:
        raise ValueError(f"{where}{name} must be a number, got {v!r}") from None
    if kind == "float":
        return x
    if not x.is_integer():
        raise ValueError(f"{where}{name} must be an integer, got {v!r}")
    return int(x)


def read_config_file(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"config file {p} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    suffix = p.suffix.lower()
    if suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError("reading a YAML config needs PyYAML (pip install pyyaml)") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            line = f" at line {where.line + 1}" if where is not None else ""
            problem = getattr(e, "problem", None) or type(e).__name__
            raise ValueError(f"config file {p} is not valid YAML: {problem}{line}") from None
    elif suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            try:
                import tomli as tomllib
            except ImportError:
                raise ValueError("reading a TOML config on Python 3.10 needs tomli") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"config file {p} is not valid TOML: {e}") from None
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"config file {p} is not valid JSON: {e}") from None
    else:
        raise ValueError(f"config file {p} must be .yaml, .yml, .toml or .json")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {p} must hold a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}
