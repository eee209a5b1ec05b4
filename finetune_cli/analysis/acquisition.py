"""Which unlabeled images to label next: uncertainty mixed with diversity, against its plain baselines.

Cluster-margin (the default; Citovsky, DeSalvo, Gentile, Karydas, Rajagopalan,
Rostamizadeh & Kumar 2021, "Batch active learning at scale", NeurIPS), as
here: the `candidates` x K unlabeled images with the smallest margin are
clustered into K groups (k-means on mean-centred, unit-length features), and
each group gives its smallest-margin image, so the batch is uncertain without
K near-copies of one confusion. (The paper clusters the whole pool once, by
agglomerative clustering, and samples clusters round-robin; one k-means of the
candidates serves the same end at a folder's scale.)

BADGE (Ash, Zhang, Krishnamurthy, Langford & Agarwal 2020, "Deep batch active
learning by diverse, uncertain gradient lower bounds", ICLR) embeds each
unlabeled image as the gradient of the cross-entropy, at the label the model
guesses, with respect to the last layer's weights: g = (p - onehot(argmax p))
outer [x, 1], for probabilities p (k,) and features x (d,). Its length grows
with the model's uncertainty and the image's feature magnitude, and its
direction says which weights the label would move. The batch is chosen by
k-means++ seeding on these embeddings (each next image drawn with probability
proportional to its squared distance to the nearest one already chosen), so it
is uncertain and diverse at once, with nothing to tune. Distances are computed
from the factorisation <g_i, g_j> = <a_i, a_j> <x_i, x_j> (a = p - onehot),
so the (n, k*d) embeddings are never held: memory is O(n (k + d)).

Margin sampling (Scheffer et al. 2001) takes the K images with the smallest
gap between the two most probable classes; random takes K at random.
"""

from __future__ import annotations

import numpy as np

METHODS = ("cluster-margin", "badge", "margin", "random")

#: Cluster-margin's candidates, as a multiple of the images asked for.
CANDIDATES = 5


def margins(probs: np.ndarray) -> np.ndarray:
    """(n,) the top probability minus the second, in [0, 1], for probs (n, k >= 2)."""
    top = np.sort(probs, axis=1)[:, -2:]
    return top[:, 1] - top[:, 0]


def badge(probs: np.ndarray, features: np.ndarray, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(chosen rows (n,) in pick order, each pick's squared gradient distance to the nearest earlier pick (n,);
    the first pick, the longest embedding, gets its squared length) by k-means++ seeding on BADGE embeddings.

    Args:
        probs: (m, k) the model's probabilities; features: (m, d) what its last layer reads; n <= m.
    """
    rng = np.random.default_rng(seed)
    a = probs.astype(np.float64).copy()
    a[np.arange(len(a)), probs.argmax(1)] -= 1.0
    x = np.hstack([features.astype(np.float64), np.ones((len(features), 1))])
    lengths = (a * a).sum(1) * (x * x).sum(1)  # ||g_i||^2
    first = int(np.argmax(lengths))
    chosen, gaps = [first], [float(lengths[first])]
    nearest = distances_to(a, x, lengths, first)
    for _ in range(1, n):
        weights = np.clip(nearest, 0, None)
        weights[chosen] = 0
        total = weights.sum()
        pick = int(rng.choice(len(weights), p=weights / total)) if total > 0 else \
            int(rng.choice(np.setdiff1d(np.arange(len(weights)), chosen)))
        chosen.append(pick)
        gaps.append(float(nearest[pick]))
        nearest = np.minimum(nearest, distances_to(a, x, lengths, pick))
    return np.array(chosen), np.array(gaps)


def distances_to(a: np.ndarray, x: np.ndarray, lengths: np.ndarray, j: int) -> np.ndarray:
    """(m,) squared distances of every embedding to embedding j: |g_i|^2 + |g_j|^2 - 2 <a_i, a_j> <x_i, x_j>."""
    return lengths + lengths[j] - 2.0 * (a @ a[j]) * (x @ x[j])


def cluster_margin(probs: np.ndarray, features: np.ndarray, n: int, seed: int = 0,
                   candidates: int = CANDIDATES) -> np.ndarray:
    """(chosen rows (<= n,), by increasing margin): the smallest-margin image of each of n k-means clusters of the
    `candidates` x n smallest-margin rows. probs (m, k), features (m, d)."""
    from sklearn.cluster import KMeans

    pool = np.argsort(margins(probs), kind="stable")[:min(len(probs), candidates * n)]
    if len(pool) <= n:
        return pool
    z = features[pool] - features[pool].mean(axis=0)
    z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    groups = KMeans(n, n_init=3, random_state=seed).fit_predict(z)
    chosen = np.array([pool[groups == g][0] for g in np.unique(groups)])  # pool is by margin: [0], the smallest
    return chosen[np.argsort(margins(probs)[chosen], kind="stable")]


def choose(method: str, probs: np.ndarray, features: np.ndarray, n: int, seed: int = 0
           ) -> tuple[np.ndarray, np.ndarray]:
    """(chosen rows (n,), score (n,) in [0, 1], higher = picked earlier for a stronger reason) by `method`.

    cluster-margin and margin: 1 - margin; badge: the pick's gradient distance, relative to the first pick's;
    random: 1 - rank / n. Cluster-margin may return fewer than n rows when the features have fewer distinct
    points than n clusters.
    """
    n = min(n, len(probs))
    if method == "cluster-margin":
        rows = cluster_margin(probs, features, n, seed)
        return rows, 1.0 - margins(probs)[rows]
    if method == "badge":
        rows, gaps = badge(probs, features, n, seed)
        return rows, gaps / max(gaps[0], 1e-12)
    if method == "margin":
        rows = np.argsort(margins(probs), kind="stable")[:n]
        return rows, 1.0 - margins(probs)[rows]
    if method == "random":
        return np.random.default_rng(seed).permutation(len(probs))[:n], 1.0 - np.arange(n) / n
    raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
