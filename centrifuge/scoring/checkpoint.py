"""Finding and loading a model checkpoint given on the command line."""

from __future__ import annotations

from pathlib import Path

import torch


def resolve_checkpoint(path: str | Path) -> Path:
    """The weights directory meant by ``path``: a directory with config.json
    (a native or Hugging Face Llama-family checkpoint), or a training run's
    ``out_dir`` whose ``latest`` pointer (a symlink, or a file holding the
    checkpoint's name or path) names one."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if (p / "config.json").is_file():
        return p
    latest = p / "latest"
    if latest.is_dir() and (latest / "config.json").is_file():
        return latest
    if latest.is_file():
        name = latest.read_text().strip()
        target = Path(name) if Path(name).is_absolute() else p / name
        if (target / "config.json").is_file():
            return target
        raise FileNotFoundError(f"{latest} points to {name!r}, which holds no config.json")
    raise FileNotFoundError(
        f"{p} is not a checkpoint: expected config.json + *.safetensors (native or Hugging "
        "Face Llama-family), or a training run directory with a 'latest' pointer"
    )


def load_checkpoint(path: str | Path, device="cpu") -> tuple[torch.nn.Module, Path]:
    """(model in float32 on ``device``, the resolved directory)."""
    from centrifuge.models import LlamaForCausalLM

    d = resolve_checkpoint(path)
    return LlamaForCausalLM.from_pretrained(d).to(device), d
