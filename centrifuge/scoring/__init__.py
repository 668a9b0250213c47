"""Reference scores for Rho-1 selection, computed once and stored beside the data.

``centrifuge score`` runs the reference model once over a dataset
(:func:`score_dataset`); training reads the result with
:func:`load_reference_scores` and passes ``torch.from_numpy(scores[rows])`` as
``ref_loss`` to the ``rho1`` :class:`~centrifuge.selection.Selector`.
"""

from centrifuge.scoring.score import model_identity, reference_losses, score_dataset
from centrifuge.scoring.store import (
    ScoreStoreError,
    ScoreWriter,
    load_reference_scores,
    read_header,
    verify,
)

__all__ = [
    "ScoreStoreError", "ScoreWriter", "load_reference_scores", "read_header", "verify",
    "model_identity", "reference_losses", "score_dataset",
]  # fmt: skip
