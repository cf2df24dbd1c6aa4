"""The one score convention, in words, used verbatim by the engine, run files, UI and exports.

Kept free of heavy imports so the dashboard can use it without loading torch.
"""

SCORE_CONVENTION = (
    "score = predicted change of the test loss if the pretraining example is removed and both "
    "stages are retrained; score > 0: helpful; score < 0: harmful; "
    "total = pretrained_term + finetuned_term."
)
