"""`train --resume`: read what an interrupted run saved, and refuse to mix two runs.

Rules:
- A finished run (metrics.json written) is reported and left untouched.
- Every saved file is read and checked before any work; a damaged one is a
  one-line error that names it.
- The classes, image size, backbone and recipe must be those of the saved run;
  a change is refused, naming what changed.
- The end result is the best epoch's weights, as in an uninterrupted run
  (see `loop.fit`'s `restore_best`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from finetune_cli.errors import ModelFileError, SettingsError
from finetune_cli.models.files import archive_json, load_model_file
from finetune_cli.runs.folder import RunFolder
from finetune_cli.strategy import recipes as recipe_files
from finetune_cli.strategy import similarity as sim
from finetune_cli.strategy.decide import Plan
from finetune_cli.train.engine import LoopState


@dataclass(frozen=True)
class Saved:
    """What an interrupted run left: its plan, evidence, recipe, classes and input."""

    plan: Plan
    evidence: sim.Similarity
    recipe: recipe_files.Recipe
    classes: tuple[str, ...]
    base: str
    weights: str
    image_size: int


def _damaged(run: RunFolder, name: str, why: str) -> ModelFileError:
    return ModelFileError(f"cannot resume {run.path}: {name} is damaged ({why}); its other files are "
                          "untouched: start a new run with another --out")


def read_saved(run: RunFolder) -> Saved:
    """The saved plan, recipe and classes, and a check that the checkpoint is whole.

    Raises:
        ModelFileError: a file is missing, truncated or malformed.
    """
    try:
        saved = run.read_json("plan.json")
        plan = Plan(**saved["plan"])
        plan = dataclasses.replace(plan, train_stages=tuple(plan.train_stages), top_stages=tuple(plan.top_stages),
                                   suggestions=tuple(plan.suggestions))
        evidence = sim.Similarity(**saved["similarity"])
        base, weights, size = saved["base"], saved["weights"], int(saved["image_size"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _damaged(run, "plan.json", f"{type(exc).__name__}: {exc}") from None
    try:
        recipe = recipe_files.parse(run.file("recipe.toml").read_text("utf-8"), "recipe.toml")
        classes = run.read_json("labels.json")
    except (OSError, ValueError) as exc:
        raise _damaged(run, "recipe.toml or labels.json", str(exc)) from None
    except recipe_files.RecipeError as exc:
        raise _damaged(run, "recipe.toml", str(exc)) from None
    if not isinstance(classes, list):
        raise _damaged(run, "labels.json", "not a list of class names")
    if run.file("checkpoint.keras").exists():
        archive_json(run.file("checkpoint.keras"), "config.json", ModelFileError)
        read_state(run)
    return Saved(plan, evidence, recipe, tuple(classes), base, weights, size)


def read_state(run: RunFolder):
    """The `LoopState` saved beside the checkpoint.

    Raises:
        ModelFileError: state.json is missing or malformed.
    """
    try:
        state = LoopState(**run.read_json("state.json"))
        if not isinstance(state.epoch, int) or not isinstance(state.history, list):
            raise ValueError("epoch must be a number and history a list")
        return state
    except (OSError, ValueError, TypeError) as exc:
        raise _damaged(run, "state.json", str(exc)) from None


def check_unchanged(saved: Saved, classes, ref, recipe: str | None) -> None:
    """Refuse a resume whose classes, image size, backbone or recipe differ from the saved run.

    Args:
        classes: the class names found in the training folder now.
        ref: the resolved `BaseRef` for this call.
        recipe: the `--recipe` given now, or None (the saved one is used).

    Raises:
        SettingsError: naming what changed and what to do.
    """
    changes = []
    if tuple(classes) != saved.classes:
        changes.append(f"classes {list(classes)} (the run has {list(saved.classes)})")
    if ref.image_size != saved.image_size:
        changes.append(f"image size {ref.image_size} (the run has {saved.image_size})")
    if (ref.label, ref.weights) != (saved.base, saved.weights):
        changes.append(f"base {ref.label} with {ref.weights} weights (the run has {saved.base} with {saved.weights})")
    if recipe is not None:
        given, _ = recipe_files.load(recipe)
        if dataclasses.replace(given, name="") != dataclasses.replace(saved.recipe, name=""):
            changes.append(f"recipe {recipe} (it differs from the run's recipe.toml)")
    if changes:
        raise SettingsError("cannot resume: " + "; ".join(changes) + ". Resume with the run's settings, "
                            "or start a new run with another --out")


def load_checkpoint(run: RunFolder):
    """(model, LoopState) from the last completed epoch.

    Raises:
        ModelFileError: the checkpoint or its state is damaged.
    """
    state = read_state(run)
    return load_model_file(run.file("checkpoint.keras"), ModelFileError), state


def already_finished(run: RunFolder) -> dict:
    """The metrics of a finished run, read without changing anything.

    Raises:
        ModelFileError: metrics.json is damaged.
    """
    try:
        return run.read_json("metrics.json")
    except (OSError, ValueError) as exc:
        raise _damaged(run, "metrics.json", str(exc)) from None
