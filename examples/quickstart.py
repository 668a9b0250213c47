"""Token-filtered training from Python, on the built-in corpus (CPU, ~1 minute).

Run: python examples/quickstart.py

The same loop as `centrifuge train`, at a smaller scale: keep the 50% of
tokens with the highest loss, backward on those rows only.
"""

from centrifuge.training import TrainConfig, train

summary = train(TrainConfig(
    model="mini",            # 0.87M parameters, byte vocabulary
    select="loss",           # no reference model needed (rho1 would train one first)
    ratio=0.5,
    steps=60,
    eval_interval=30,
    eval_problems=50,
    out_dir="runs/quickstart",
    overwrite=True,          # a second run replaces the first (without it, it is refused)
))
print(f"eval loss {summary['eval_loss']:.3f} after {summary['steps']} steps; "
      f"kept {summary['tokens_kept']:,} of {summary['tokens_seen']:,} tokens; "
      f"checkpoint {summary['checkpoint']}")
