"""The decision table and recipes: pure functions, table-driven."""

from __future__ import annotations

import pytest

from finetune_cli.errors import RecipeError
from finetune_cli.strategy import recipes
from finetune_cli.strategy.decide import decide, table_recipe
from finetune_cli.strategy.similarity import judge


@pytest.mark.parametrize(
    "size, similarity, recipe, strategy, stages, top, feature_stage, views",
    [
        ("small", "similar", "linear", "linear", (), (), "final", 0),
        ("large", "similar", "partial", "partial", (5,), (5,), "final", 2),
        ("large", "different", "full", "full", (1, 2, 3, 4, 5), (4, 5), "final", 0),
        ("small", "different", "trouble", "linear", (), (), "best", 4),
    ],
)
def test_table(size, similarity, recipe, strategy, stages, top, feature_stage, views):
    name = table_recipe(size, similarity)
    assert name == recipe
    plan = decide(size, similarity, 5, recipes.load(name)[0])
    assert (plan.strategy, plan.train_stages, plan.top_stages) == (strategy, stages, top)
    assert (plan.feature_stage, plan.feature_views) == (feature_stage, views)
    assert plan.reason and plan.size_category == size and plan.similarity == similarity


def test_discriminative_rates_are_tenth_and_hundredth():
    plan = decide("large", "different", 5, recipes.load("full")[0])
    rates = plan.learning_rates
    assert rates["top"] == pytest.approx(rates["head"] / 10)
    assert rates["intermediate"] == pytest.approx(rates["head"] / 100)


def test_trouble_suggests_pretraining_and_override_is_said():
    plan = decide("small", "different", 5, recipes.load("trouble")[0])
    assert any("finetune pretrain" in s for s in plan.suggestions)
    forced = decide("small", "similar", 5, recipes.load("full")[0], overridden=True)
    assert forced.strategy == "full" and forced.reason.startswith("recipe 'full' chosen by you")
    assert table_recipe("small", "similar", "partial") == "partial"


@pytest.mark.parametrize("best, overridden, stages", [
    (3, False, (3, 4, 5)),  # the probe's best earlier stage and above train; 1-2 stay frozen (a cached prefix)
    (2, False, (2, 3, 4, 5)),
    (3, True, (1, 2, 3, 4, 5)),  # a recipe or --strategy the user forced trains as it says
    (5, False, (1, 2, 3, 4, 5)),  # the final stage best: no earlier stage to freeze up to
    (1, False, (1, 2, 3, 4, 5)),
    (None, False, (1, 2, 3, 4, 5)),  # nothing measured (a forced verdict)
])
def test_full_trains_from_the_probes_best_stage_up(best, overridden, stages):
    plan = decide("large", "different", 5, recipes.load("full")[0], best_stage=best, overridden=overridden)
    assert plan.train_stages == stages and plan.top_stages == (4, 5)
    assert ("stay frozen" in plan.reason or "stays frozen" in plan.reason) is (stages[0] > 1)
    partial = decide("large", "similar", 5, recipes.load("partial")[0], best_stage=best)
    assert partial.train_stages == (5,) and "frozen" not in partial.reason


def test_partial_on_a_shallow_backbone_caps_stages():
    plan = decide("large", "similar", 1, recipes.load("partial")[0])
    assert plan.train_stages == (1,)


@pytest.mark.parametrize(
    "accuracy, confidence, verdict, best",
    [
        ({3: 0.9, 4: 0.8, 5: 0.7}, None, "different", 3),
        ({3: 0.7, 4: 0.8, 5: 0.9}, None, "similar", 5),
        ({3: 0.9, 4: 0.9, 5: 0.89}, 0.05, "different", 4),
        ({3: 0.9, 4: 0.9, 5: 0.89}, 0.6, "similar", 4),
    ],
)
def test_similarity_rule(accuracy, confidence, verdict, best):
    result = judge(accuracy, confidence, 100)
    assert result.verdict == verdict and result.best_stage == best


def test_every_shipped_recipe_is_valid():
    assert {"linear", "partial", "full", "trouble", "classic-sgd"} <= set(recipes.shipped())
    for name in recipes.shipped():
        recipe, text = recipes.load(name)
        assert recipe.name == name and text.strip()


@pytest.mark.parametrize(
    "text, message",
    [
        ("strategy = 'magic'", "strategy must be one of"),
        ("epochs = 'ten'", "epochs must be a int"),
        ("dropout = 1.5", r"dropout must be in \[0, 1\)"),
        ("learning_rate = -1.0", "learning_rate must be a positive number"),
        ("wat = 3", "unknown field.*wat"),
        ("epochs = ", "not valid TOML"),
    ],
)
def test_recipe_validation(tmp_path, text, message):
    path = tmp_path / "r.toml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=message):
        recipes.load(str(path))


def test_unknown_recipe_name():
    with pytest.raises(RecipeError, match="unknown recipe 'fast'.*classic-sgd"):
        recipes.load("fast")
