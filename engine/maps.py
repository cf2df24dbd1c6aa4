"""2-D map coordinates of pretraining and test examples from backbone features.

UMAP's first fit in a process costs 10-35 s of numba JIT, so maps are computed once here and
stored with the run; the dashboard never fits anything.
"""

from __future__ import annotations

import numpy as np


def map_coordinates(pretrain_features: np.ndarray, test_features: np.ndarray, *,
                    method: str = "umap", n_neighbors: int = 15, min_dist: float = 0.1,
                    seed: int = 0, finetune_features: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Embed the sets jointly (one map) and return (pretrain_xy, test_xy, finetune_xy),
    float32; ``finetune_xy`` is ``None`` without ``finetune_features`` (the finetuning
    training examples, placed on the same map when their influence is scored)."""
    parts = [pretrain_features, test_features]
    if finetune_features is not None:
        parts.append(finetune_features)
    feats = np.concatenate(parts).astype(np.float64)
    if method == "pca":
        from sklearn.decomposition import PCA

        xy = PCA(n_components=2, random_state=seed).fit_transform(feats)
    elif method == "umap":
        import umap

        reducer = umap.UMAP(n_components=2, n_neighbors=min(n_neighbors, len(feats) - 1),
                            min_dist=min_dist, random_state=seed, n_jobs=1)
        xy = reducer.fit_transform(feats)
    else:
        raise ValueError(f"map method {method!r} is not one of umap, pca")
    xy = np.asarray(xy, dtype=np.float32)
    n_pre, n_test = len(pretrain_features), len(test_features)
    ft_xy = xy[n_pre + n_test:] if finetune_features is not None else None
    return xy[:n_pre], xy[n_pre:n_pre + n_test], ft_xy
