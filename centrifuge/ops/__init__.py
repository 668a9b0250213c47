"""Ops: each one a plain PyTorch reference, a fast kernel where the device has
one, and a backward that runs on kept rows only."""
