"""Write a small supervised fine-tuning file: prompt/completion records made
from the built-in corpus' math problems (the question is the prompt; the
worked solution and the answer are the completion, the only tokens trained on).

Run: python examples/sft_data.py runs/sft.jsonl [--n 2000] [--seed 0]
Then: centrifuge train --data runs/sft.jsonl --select loss --ratio 0.5 --out-dir runs/sft
"""

import argparse
import json
from pathlib import Path

from centrifuge.data import corpus


def records(n: int, seed: int) -> list[dict]:
    out = []
    for p in corpus.heldout_problems(seed, n):
        question, rest = p.text.split("\n", 1)  # "Problem: ...", then solution and answer
        out.append({"prompt": question + "\n", "completion": rest})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="the JSONL file to write")
    ap.add_argument("--n", type=int, default=2000, help="records")
    ap.add_argument("--seed", type=int, default=0, help="seed of the problems")
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in records(args.n, args.seed)))
    print(f"wrote {args.n} prompt/completion records to {args.out}")


if __name__ == "__main__":
    main()
