"""What the two terms of a score mean, in one sentence and a tooltip (the math of
``docs/multistage-influence.md``, in the notation of the engine: backbone ``U`` shared by both
stages, pretraining head ``W``, finetuning head ``T``, test loss ``g_t``).

For pretraining example ``z_j`` (one of ``M``) both terms share the same factor
``[p_j]_U = [H^-1 grad_(U,W) l_pre(z_j)]_U``: how removing the example moves the pretrained
backbone (the ``U`` rows of the full inverse pretraining Hessian applied to the full gradient).
Each term is ``(1/M) s(t)^T [p_j]_U``; the terms differ in ``s(t)``, i.e. in the path by which
that backbone change reaches the test loss.
"""

from __future__ import annotations

from engine.artifacts import Run

SENTENCE = (
    "Removing a pretraining example changes the pretrained backbone (the features the "
    "finetuned head reads). The **pretrained-model term** is the part of the predicted change "
    "of the test loss that flows through those shared backbone parameters; the "
    "**finetuned-model term** is the part that flows through the finetuning head, refitted on "
    "the changed backbone. total = pretrained_term + finetuned_term.")

_COMMON = (
    "Removing example z_j (one of M) moves the pretrained parameters by (1/M)·H⁻¹∇l_pre(z_j) "
    "(H: Hessian of the pretraining objective); only the backbone rows [p_j]_U of that shift "
    "reach the finetuned model. Each term is (1/M)·s(t)ᵀ[p_j]_U, with its own s(t):")

_FIXED = (
    "\n\n- **pretrained_term**: s_pre(t) = ∇_U g_t — the test loss through the shared "
    "backbone, the finetuning head held at its trained value."
    "\n- **finetuned_term**: s_ft(t) = −A_UT A_TT⁻¹ ∇_T g_t — through the finetuning head, "
    "which refits to the changed backbone (dT̂/dU* = −A_TT⁻¹ A_TU; A: Hessian of the "
    "finetuning objective).")

_UPDATED = (
    "\n\n- **pretrained_term**: s_pre(t) = α[B⁻¹[0; ∇_U g_t]]_U — the test loss through the "
    "finetuned backbone."
    "\n- **finetuned_term**: s_ft(t) = α[B⁻¹[∇_T g_t; 0]]_U — through the finetuned head."
    "\n\n(B: Hessian of the finetuning objective with its proximal term (α/2)‖U − U*‖², "
    "which ties the finetuned backbone to the pretrained one.)")

#: Column tooltips of the score columns.
TERM_HELP = {
    "total": "Predicted change of the test loss if the example is removed and both stages are "
             "retrained (> 0 helpful, < 0 harmful) = pretrained_term + finetuned_term.",
    "pretrained_term": "Part of total that flows through the shared backbone parameters "
                       "(the pretrained features the finetuned head uses).",
    "finetuned_term": "Part of total that flows through the finetuning head, refitted on the "
                      "changed backbone.",
}


def scenario(run: Run) -> str:
    """The run's finetuning scenario, "fixed" or "updated" (from the manifest)."""
    value = run.manifest.get("scenario") if isinstance(run.manifest, dict) else None
    return "updated" if value == "updated" else "fixed"


def term_tooltip(run: Run) -> str:
    """Markdown tooltip with the formulas of this run's scenario."""
    which = scenario(run)
    alpha = run.manifest.get("alpha") if isinstance(run.manifest, dict) else None
    head = (f"This run's scenario: **{which}** (backbone "
            + ("kept fixed during finetuning)." if which == "fixed" else
               f"updated during finetuning, α = {alpha}).") + "\n\n")
    return head + _COMMON + (_FIXED if which == "fixed" else _UPDATED)
