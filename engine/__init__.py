"""Multi-stage influence engine: trace finetuned predictions back to pretraining examples.

Score convention (used verbatim everywhere): the score is the predicted change of the test loss
if the pretraining example is removed and both stages are retrained. score > 0: helpful;
score < 0: harmful. total = pretrained_term + finetuned_term.
"""

__version__ = "0.1.0"
