"""The decision table: (size category, similarity) -> a training plan. Pure: no I/O.

                 similar to ImageNet          different from ImageNet
    small data   linear: logistic regression   trouble: logistic regression on the
                 on frozen final features      best earlier stage, augmented views;
                                               try `finetune pretrain`
    large data   partial: fine-tune the top    full: fine-tune every stage, top
                 stages at lr/10               stages at lr/10, the rest at lr/100
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from finetune_cli.strategy.recipes import Recipe

#: (size_category, similarity) -> shipped recipe name.
TABLE = {
    ("small", "similar"): "linear",
    ("large", "similar"): "partial",
    ("large", "different"): "full",
    ("small", "different"): "trouble",
}

REASONS = {
    ("small", "similar"): "few images per class and content like {source}: the pretrained final "
    "features already separate the classes, and fine-tuning would overfit; a linear classifier on "
    "frozen features is fast and safe",
    ("large", "similar"): "enough images per class to adapt the most specific (top) stages without "
    "overfitting, and the content is like {source}, so the lower stages are kept as they are",
    ("large", "different"): "enough images per class, and the content differs from {source}, so "
    "most of the network is worth adapting: top stages at 1/10 of the rate, lower ones at 1/100",
    ("small", "different"): "you're in trouble: few images and content unlike {source}, so the final "
    "features are too specific to it and fine-tuning would overfit; a linear classifier on the "
    "best earlier stage with augmented views is the safest bet",
}


@dataclass(frozen=True)
class Plan:
    """What `train` will do, and why.

    Attributes:
        strategy: `linear`, `partial` or `full`.
        recipe: the recipe's name.
        size_category, similarity: the evidence the table was read with.
        feature_stage: linear: `final`, `best` or a stage index; else `final`.
        train_stages: stage indices (1-based) that fine-tune; () for linear.
        top_stages: the subset of train_stages trained at the `top` rate.
        learning_rates: {"head", "top", "intermediate"} -> rate (fine-tuning).
        augmentation: `none`, `light` or `strong`: on-line augmentation of
            end-to-end fine-tuning (every stage trains, or no cache).
        feature_views: cached augmented views per training image: of its
            frozen features (linear) or of its frozen-prefix activations
            (fine-tuning with frozen lower stages).
        epochs: fine-tuning epochs at most (0 for linear).
        reason: why, in words.
        suggestions: what the user could do next.
        flips: horizontal flips in that augmentation and those views; False once the
            flip check (`train.flips`) found that a flip changes the class.
    """

    strategy: str
    recipe: str
    size_category: str
    similarity: str
    feature_stage: str
    train_stages: tuple[int, ...]
    top_stages: tuple[int, ...]
    learning_rates: dict
    augmentation: str
    feature_views: int
    epochs: int
    reason: str
    suggestions: tuple[str, ...] = ()
    flips: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def table_recipe(size_category: str, similarity: str, strategy: str = "auto") -> str:
    """The shipped recipe name for a table cell, or for a forced strategy."""
    if strategy != "auto":
        return strategy
    return TABLE[(size_category, similarity)]


def decide(
    size_category: str,
    similarity: str,
    n_stages: int,
    recipe: Recipe,
    *,
    has_unlabeled: bool = False,
    overridden: bool = False,
    source: str = "ImageNet",
    best_stage: int | None = None,
) -> Plan:
    """Turn evidence and a recipe into a `Plan`.

    Args:
        size_category: `small` or `large`.
        similarity: `similar` or `different`.
        n_stages: the backbone's number of stages (>= 1).
        recipe: the recipe chosen for the cell (or forced by the user).
        has_unlabeled: unlabeled images are available for pretraining.
        overridden: the user forced the strategy or recipe.
        source: the base's pretraining data, in words, for the reason.
        best_stage: the stage the similarity probe measured best, or None (not measured): a `full` plan of
            the table's own choosing trains from it up, and the stages below it stay frozen (`_from_best`).
    """
    cell = (size_category, similarity)
    if cell not in TABLE:
        raise ValueError(f"Expected size in (small, large) and similarity in (similar, different). Received: {cell}")
    best_stage = None if overridden else best_stage
    train, top = _stages(recipe, n_stages, best_stage)
    rate = recipe.learning_rate
    reason = REASONS[cell].format(source=source) + _frozen_reason(recipe, best_stage, n_stages)
    if overridden:
        reason = f"recipe '{recipe.name}' chosen by you; the table would say: {reason}"
    suggestions = []
    if cell == ("small", "different"):
        suggestions.append(
            "pretrain an encoder on unlabeled images of this kind: "
            "`finetune train DIR --unlabeled RAW --out RUN` (or `finetune pretrain --unlabeled RAW --out enc.keras`)"
            if not has_unlabeled else "unlabeled images given: pretraining on them first"
        )
    return Plan(
        strategy=recipe.strategy,
        recipe=recipe.name,
        size_category=size_category,
        similarity=similarity,
        feature_stage=recipe.feature_stage if recipe.strategy == "linear" else "final",
        train_stages=train,
        top_stages=top,
        learning_rates={
            "head": rate,
            "top": rate * recipe.top_lr_factor,
            "intermediate": rate * recipe.intermediate_lr_factor,
        },
        augmentation=recipe.augmentation,
        feature_views=recipe.feature_views,
        epochs=0 if recipe.strategy == "linear" else recipe.epochs,
        reason=reason,
        suggestions=tuple(suggestions),
    )


def _from_best(recipe: Recipe, best_stage: int | None, n_stages: int) -> bool:
    """Whether a recipe that trains every stage should train from the probe's `best_stage` up instead: the
    stages below the one whose features transfer best are generic (Yosinski et al. 2014), and freezing them
    keeps the prefix cached (`train.prefix`). Only for a measured best stage between the first and the last."""
    return recipe.strategy == "full" and recipe.unfreeze_stages == 0 and best_stage is not None and \
        1 < best_stage < n_stages


def _frozen_reason(recipe: Recipe, best_stage: int | None, n_stages: int) -> str:
    """The reason's tail for a `full` plan frozen below the probe's best stage (`_from_best`), else ""."""
    if not _from_best(recipe, best_stage, n_stages):
        return ""
    below = "stage 1 stays" if best_stage == 2 else f"stages 1-{best_stage - 1} stay"
    return (f"; {below} frozen: the probe measured stage {best_stage} best, so the features below it transfer, "
            "and they are cached instead of run every epoch")


def _stages(recipe: Recipe, n_stages: int, best_stage: int | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(stages that train, of those the top ones), counted from the last stage; a `full` recipe from
    `best_stage` up where `_from_best` says so."""
    if recipe.strategy == "linear":
        return (), ()
    if _from_best(recipe, best_stage, n_stages):
        recipe = replace(recipe, unfreeze_stages=n_stages - best_stage + 1)
    count = n_stages if recipe.strategy == "full" and recipe.unfreeze_stages == 0 else min(recipe.unfreeze_stages or n_stages, n_stages)
    train = tuple(range(n_stages - count + 1, n_stages + 1))
    top = train[-recipe.top_stages:] if recipe.top_stages else ()
    return train, top
