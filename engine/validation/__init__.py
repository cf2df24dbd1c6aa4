"""Check a run's influence scores against actual removal and retraining of both stages.

``python -m engine validate RUN_DIR`` (see README "Validation") runs four checks:

1. **Leave-one-out agreement.**  For a few test points (default: up to 10 misclassified ones),
   the top-N pretraining examples by |score| plus N random ones are removed one at a time and
   both stages are retrained; the actual change of the measurement is compared with the score
   (Pearson, Spearman, sign agreement, magnitude ratio), per term as well as in total.
2. **Group removal.**  The k most harmful pretraining examples for the misclassified test points
   (most negative summed score) are removed together, next to k random ones and the k most
   helpful ones; the actual change of those points' mean measurement and of accuracy is compared
   with the prediction (sum of the removed examples' scores, averaged over the points).
3. **Planted-noise detection** (when a list of mislabelled pretraining ids is available):
   precision@k and ROC AUC of the influence ranking next to baselines computed in the same run.
4. **Finetuning-data influence** (:mod:`engine.validation.finetune_check`): the run's
   ``finetune_scores.npy`` (computed when the run has none) against retraining the finetuning
   stage only without one finetuning example (top-N by |score| plus N random per test point).

Removal is the engine's definition of the score (eps = -1/M): the removed examples get weight 0
in ``L_pre = (1/M) sum_j w_j l_pre(z_j) + R`` and the denominator stays M, i.e.
``fit_two_stage(task, sample_weights=w, warm_start=reference)``.  Ground truth is measured
against a **reference fit**: the stored parameters re-polished with the same optimizer, the same
tolerance and all weights 1, so that optimizer error does not enter the differences.  Every
retrain is warm-started from the reference (pretraining from (U*, W*), finetuning from its own
solution with the new backbone) and run to a gradient-norm tolerance (default 1e-10) far below
the run's, because the pretraining Hessian's smallest eigenvalue can be ~1e-5: a gradient norm
of 1e-7 leaves parameter errors of order 1e-7 / lambda_min ~ 1e-2, as big as the effects measured.
A retrain that ends above the tolerance is continued from where it stopped, with twice the
L-BFGS iterations, for up to ``max_rounds`` rounds; what remains unconverged is reported.

Each retrain is an independent job: under ``torchrun`` the jobs are split over the ranks
(``torch.distributed``; rank 0 gathers the results and writes), otherwise they run in a
``ProcessPoolExecutor`` on this node (default min(2, CPUs) workers, one torch thread each);
every worker rebuilds the task once from the run directory.  Results do not depend on which.

The results go atomically to ``RUN_DIR/validation/``: ``summary.json``, ``loo.csv``,
``group.csv``, ``noise.csv``, ``finetune.csv`` and ``loo_scatter.json`` (a Plotly figure the
dashboard shows).

====================  ==========================================================================
module                what it holds
====================  ==========================================================================
``settings``          :class:`ValidationSettings`, the targets, file names
``retrains``          the retraining jobs (in process, a process pool, or the ranks of a launch)
``sections``          leave-one-out, group removal and noise detection analyses
``finetune_check``    finetuning-data influence vs finetuning-only retraining
``stats``             agreement statistics
``report``            the pass/fail checks and the scatter figure
``core``              :func:`validate` and the CLI entry
====================  ==========================================================================
"""

from engine.validation.core import main, validate
from engine.validation.retrains import run_retrains
from engine.validation.settings import (
    NOISE_FILE,
    VALIDATION_DIR,
    ValidationError,
    ValidationSettings,
)

__all__ = ["NOISE_FILE", "VALIDATION_DIR", "ValidationError", "ValidationSettings", "main",
           "run_retrains", "validate"]
