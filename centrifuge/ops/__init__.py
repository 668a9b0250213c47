"""Ops: each one a plain PyTorch reference, a fast kernel where the device has
one, and a backward that runs on kept rows only."""


def clear_step_caches() -> None:
    """Forget the index structures the Triton ops build once per step and share
    across layers (kept-row and key-row bounds, the inverse keep index), cached
    by tensor identity. A CUDA graph capture must call it first: its inputs live
    in fixed buffers that every batch rewrites, so an entry built before the capture (by
    the warm-up, or another capture of the same buffers) would be read by every
    replay with the values of the batch it was built from, and freed under it
    later; cleared, the capture records the kernels that build them."""
    from centrifuge.ops import step_cache

    step_cache.clear()
