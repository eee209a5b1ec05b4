"""How similar a dataset is to the backbone's pretraining data: the rule (pure). The measurement that
feeds it (the probes on cached features) is `train.session.measure`.

Method (documented in the README; evidence returned and shown to the user):

1. Linear probe: on a stratified sample (at most `config.sample` images), the
   cross-validated accuracy of a logistic regression on pooled features of
   the final stage and of the two stages before it. When an earlier stage
   probes better than the final one by at least `config.margin`, the final layers
   are too specific to the pretraining data: `different`.
2. Head confidence, where the base file carries its ImageNet classifier: the
   mean top-1 probability on the sample. Only a tie-breaker: when the probe is
   within the margin either way and the confidence is below `config.low_confidence`,
   the data counts as `different`.
Otherwise `similar`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from finetune_cli.config import SIMILARITY, SimilarityConfig


@dataclass(frozen=True)
class Similarity:
    """The verdict and its evidence.

    Attributes:
        verdict: `similar` or `different`.
        stage_accuracy: {stage index as str: cross-validated probe accuracy 0-1};
            the highest index is the final stage.
        best_stage: the stage with the best probe accuracy.
        head_confidence: mean ImageNet top-1 probability 0-1, or None.
        n_sample: images probed.
        reason: the rule that decided, in words.
        forced: the user set --similarity.
    """

    verdict: str
    stage_accuracy: dict
    best_stage: int
    head_confidence: float | None
    n_sample: int
    reason: str
    forced: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def sample_indices(labels: np.ndarray, size: int = SIMILARITY.sample, seed: int = 0) -> np.ndarray:
    """A stratified random sample of row indices, sorted, at most `size` rows."""
    if len(labels) <= size:
        return np.arange(len(labels))
    from sklearn.model_selection import train_test_split

    keep, _ = train_test_split(np.arange(len(labels)), train_size=size, stratify=labels, random_state=seed)
    return np.sort(keep)


def judge(stage_accuracy: dict[int, float], head_confidence: float | None, n_sample: int,
          config: SimilarityConfig = SIMILARITY) -> Similarity:
    """Apply the rule above to measured evidence (pure)."""
    final = max(stage_accuracy)
    best = max(stage_accuracy, key=lambda k: (stage_accuracy[k], k))
    gain = stage_accuracy[best] - stage_accuracy[final]
    accuracy = {str(k): round(v, 4) for k, v in sorted(stage_accuracy.items())}
    if gain >= config.margin:
        verdict = "different"
        reason = (f"stage {best} probes better than the final stage ({stage_accuracy[best]:.0%} vs "
                  f"{stage_accuracy[final]:.0%}): the last layers are specific to the pretraining data")
    elif head_confidence is not None and head_confidence < config.low_confidence:
        verdict = "different"
        reason = (f"the probe is a tie, and the pretrained classifier is unsure on these images "
                  f"(mean top-1 probability {head_confidence:.0%} < {config.low_confidence:.0%})")
    else:
        verdict = "similar"
        reason = (f"the final stage probes best or as well ({stage_accuracy[final]:.0%}"
                  + (f"; ImageNet head confidence {head_confidence:.0%}" if head_confidence is not None else "")
                  + ")")
    return Similarity(verdict, accuracy, best, head_confidence, n_sample, reason)


def forced(verdict: str, reason: str = "set with --similarity") -> Similarity:
    """A verdict given rather than measured (by --similarity, or known from how the base was made)."""
    return Similarity(verdict, {}, 0, None, 0, reason, forced=True)


def probe_layers(n_stages: int) -> list[int | None]:
    """The stages the probe compares: the two before the last, and the final output (None)."""
    return [k for k in (n_stages - 2, n_stages - 1) if k >= 1] + [None]


