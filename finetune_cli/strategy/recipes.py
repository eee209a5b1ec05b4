"""Recipes: the hyper-parameters of each strategy, in TOML files.

Shipped recipes live in `finetune_cli/recipes/` (also reachable as `recipes/`
at the top of a checkout);
`--recipe` takes one of their names or a path to a user's file. Every field
has its default here, in `Recipe`, and nowhere else.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from finetune_cli.config import RECIPE_MAX_BYTES
from finetune_cli.errors import RecipeError

STRATEGIES = ("linear", "partial", "full")
AUGMENTATIONS = ("none", "light", "strong")
OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class Recipe:
    """One strategy's hyper-parameters.

    Attributes:
        name: recipe name (file stem for shipped recipes).
        strategy: `linear` (frozen features + logistic regression), `partial`
            (top stages fine-tuned) or `full` (all stages fine-tuned).
        description: one line for users.
        feature_stage: linear only: `final`, `best` (cross-validated over
            stages) or a stage index, 1 (the earliest) to the backbone's
            number of stages (negative indices are refused).
        pooling: linear only: how a stage's map becomes a vector, `avg` or
            `max` over its spatial axes.
        linear_c: linear only: the logistic regression's inverse
            regularisation strength C, > 0; 0 chooses C by cross-validation
            over `LinearConfig.c_grid`.
        feature_views: augmented views (flip, crop 70-100 %) per training
            image, 0-16, cached once: of its frozen features (linear) or of
            its frozen-prefix activations (fine-tuning that leaves the lower
            stages frozen; each epoch draws one view per image slot).
        augmentation: on-line augmentation when fine-tuning end to end (every
            stage trains): `none`, `light` (flip, small shifts) or `strong`
            (also zoom, rotation, contrast).
        unfreeze_stages: fine-tuning: how many top stages train (0 = all).
        top_stages: of the unfrozen stages, how many count as "top".
        learning_rate: the new head's rate, > 0 (the NaN guard retries at /10 when too high).
        top_lr_factor: top stages train at learning_rate * this (about 1/10).
        intermediate_lr_factor: other unfrozen stages at learning_rate * this (about 1/100).
        optimizer: `adam` or `sgd`.
        momentum: SGD momentum, [0, 1).
        weight_decay: decoupled weight decay, >= 0.
        plateau_factor: multiply rates by this when validation loss stalls, (0, 1].
        epochs: fine-tuning epochs at most, 1-1000 (early stopping may end sooner).
        batch_size: images per step, 1-1024.
        dropout: before the head, [0, 1).
        l2: L2 penalty on the head's kernel, >= 0.
        patience: epochs without validation-loss improvement before stopping.
        mixup: fine-tuning: mixup's alpha, [0, 4]; each training batch is mixed with a shuffled copy of
            itself at a weight drawn from Beta(alpha, alpha), inputs and targets alike (Zhang et al. 2018);
            on cached activations this mixes the frozen prefix's maps. 0: off.
    """

    name: str = "custom"
    strategy: str = "linear"
    description: str = ""
    feature_stage: str = "final"
    feature_views: int = 0
    pooling: str = "avg"
    linear_c: float = 0.0
    augmentation: str = "none"
    unfreeze_stages: int = 2
    top_stages: int = 2
    learning_rate: float = 1e-3
    top_lr_factor: float = 0.1
    intermediate_lr_factor: float = 0.01
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    plateau_factor: float = 0.1
    epochs: int = 8
    batch_size: int = 32
    dropout: float = 0.2
    l2: float = 1e-4
    patience: int = 3
    mixup: float = 0.0

    def with_learning_rate(self, rate: float) -> "Recipe":
        return dataclasses.replace(self, learning_rate=rate)


_CHECKS = {
    "strategy": (lambda v: v in STRATEGIES, f"one of {STRATEGIES}"),
    "augmentation": (lambda v: v in AUGMENTATIONS, f"one of {AUGMENTATIONS}"),
    "optimizer": (lambda v: v in OPTIMIZERS, f"one of {OPTIMIZERS}"),
    "feature_stage": (lambda v: v in ("final", "best") or (re.fullmatch("[0-9]+", v) is not None and int(v) >= 1),
                      "'final', 'best' or a stage index from 1 (the earliest stage) to the backbone's last "
                      "(`finetune layers` lists them)"),
    "feature_views": (lambda v: 0 <= v <= 16, "between 0 and 16"),
    "pooling": (lambda v: v in ("avg", "max"), "'avg' or 'max'"),
    "linear_c": (lambda v: 0 <= v < float("inf"), "0 (cross-validated) or a positive number"),
    "unfreeze_stages": (lambda v: v >= 0, ">= 0"),
    "top_stages": (lambda v: v >= 0, ">= 0"),
    "learning_rate": (lambda v: 0 < v < float("inf"), "a positive number"),
    "top_lr_factor": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "intermediate_lr_factor": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "plateau_factor": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "epochs": (lambda v: 1 <= v <= 1000, "between 1 and 1000"),
    "batch_size": (lambda v: 1 <= v <= 1024, "between 1 and 1024"),
    "dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "l2": (lambda v: v >= 0, ">= 0"),
    "patience": (lambda v: v >= 1, ">= 1"),
    "mixup": (lambda v: 0 <= v <= 4, "in [0, 4] (0: off; 0.2-0.4 is usual)"),
}


def shipped() -> list[str]:
    """Names of the recipes that ship with the package."""
    folder = resources.files("finetune_cli.recipes")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def load(name_or_path: str) -> tuple[Recipe, str]:
    """A recipe by shipped name or file path, validated.

    Returns:
        (Recipe, the TOML text it came from).

    Raises:
        RecipeError: unknown name, unreadable or unparsable file, bad field.
    """
    path = Path(name_or_path).expanduser()
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise RecipeError(f"recipe file {path} does not exist")
        text, origin = _read_recipe(path), str(path)
    elif name_or_path in shipped():
        text = resources.files("finetune_cli.recipes").joinpath(f"{name_or_path}.toml").read_text("utf-8")
        origin = name_or_path
    else:
        raise RecipeError(f"unknown recipe '{name_or_path}': use one of {', '.join(shipped())} or a .toml path")
    return parse(text, origin), text


def _read_recipe(path: Path) -> str:
    """The file's text, at most `config.RECIPE_MAX_BYTES` (a larger file is refused unread)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(RECIPE_MAX_BYTES + 1)
        if len(data) > RECIPE_MAX_BYTES:
            raise RecipeError(f"recipe file {path} is larger than {RECIPE_MAX_BYTES // 1024} KB: a recipe is a few "
                              "lines of TOML; give the right file")
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"recipe file {path} is not UTF-8 text (byte {exc.start}): save it as UTF-8") from None
    except OSError as exc:
        raise RecipeError(f"cannot read recipe file {path}: {exc.strerror or exc}") from None


def parse(text: str, origin: str = "recipe") -> Recipe:
    """Validate TOML text into a `Recipe` (see `load`).

    Every field is checked: its type, a finite value for every number (inf and nan are refused by
    name), and its range (`_CHECKS`).

    Raises:
        RecipeError: not TOML (or nested too deeply to read), an unknown field, a bad value; naming it.
    """
    try:
        values = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{origin} is not valid TOML: {exc}") from None
    except RecursionError:
        raise RecipeError(f"{origin} is not a recipe: its TOML is nested too deeply to read (an array or table "
                          "hundreds of levels deep); a recipe holds only plain values") from None
    fields = {f.name: f for f in dataclasses.fields(Recipe)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise RecipeError(f"{origin}: unknown field(s) {', '.join(unknown)}; valid fields: {', '.join(fields)}")
    for key, value in values.items():
        values[key] = _checked(key, value, origin)
    values.setdefault("name", Path(origin).stem)
    return Recipe(**values)


def _checked(key: str, value, origin: str):
    """One field's value, converted (an int where a float is expected, a stage index as text) and checked.

    Raises:
        RecipeError: a wrong type, a number that is not finite, or a value out of `_CHECKS`' range.
    """
    expected = type(getattr(Recipe(), key))
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value) if abs(value) < 2**1023 else math.inf  # a 400-digit integer is no finite float
    if key == "feature_stage" and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # feature_stage = 2 and "2" alike
    if not isinstance(value, expected) or isinstance(value, bool):
        raise RecipeError(f"{origin}: {key} must be a {expected.__name__}. Received: {key}={_shown(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise RecipeError(f"{origin}: {key} must be a finite number, not {value}. Received: {key}={value!r}")
    check, wanted = _CHECKS.get(key, (lambda v: True, ""))
    if not check(value):
        raise RecipeError(f"{origin}: {key} must be {wanted}. Received: {key}={_shown(value)}")
    return value


def _shown(value) -> str:
    """repr of a value, at most 80 characters (a nested array may be long, or too deep for repr)."""
    try:
        text = repr(value)
    except RecursionError:
        text = f"a {type(value).__name__} nested too deeply"
    return text if len(text) <= 80 else text[:77] + "..."
