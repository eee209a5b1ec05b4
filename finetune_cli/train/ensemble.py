"""`train --ensemble N`: N members whose probabilities one `model.keras` averages.

    linear plans     member 0: exactly the plan's own linear head (its features chosen by
                     cross-validation where the plan compares them: a stage, stages
                     concatenated, raw pixels). Member i >= 1: logistic regression on the
                     cached features of the plan's stage (the probe's best for `best`) plus
                     `EnsembleConfig.linear_stage_offsets[i]` (cycling over the offsets that
                     fall inside the backbone), on i % (linear_max_views + 1) augmented
                     views, cross-validation folds seeded seed + i. Almost free: every
                     member reads the feature cache. The heads share one backbone graph:
                     one backbone pass at predict time.
    fine-tuning      `seeds`: N full fine-tunes (the backbone reset between them, seed + i):
                     N times the cost. `snapshots`: one run of N x `snapshot_cycle`
                     epochs with a cosine-restart rate (`train.averaging.CosineSnapshots`),
                     a member at each cycle's end: about the cost of one run. Members are
                     whole networks, so model.keras holds N copies of the backbone.

The ensemble is `keras.layers.Average` over the members' outputs, standard layers only
(model.keras loads with safe_mode=True). It is kept only when its validation
cross-entropy is at most the best single member's (`choose`); else that member is.
Members and the choice go into metrics["ensemble"] and plan.json.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from finetune_cli.config import ENSEMBLE, EnsembleConfig
from finetune_cli.errors import SettingsError
from finetune_cli.models.inference import probabilities
from finetune_cli.runtime.keras import import_keras
from finetune_cli.train.averaging import CosineSnapshots, cross_entropy
from finetune_cli.train.context import TrainResult
from finetune_cli.train.linear import candidate_sources, fit_linear_plan, fit_source
from finetune_cli.train.sources import StageSource


def checked_settings(settings, ensemble, ensemble_mode: str, average: str, resume: bool = False):
    """`settings` (a `config.TrainConfig`) with `ensemble` (1-10, or its text), `ensemble_mode`, `average`.

    Raises:
        SettingsError: a value out of range, averaging with an ensemble, either with --resume.
    """
    try:
        n = None if isinstance(ensemble, (bool, float)) else int(ensemble)
    except (TypeError, ValueError):
        n = None
    if n is None or not 1 <= n <= ENSEMBLE.max_members:
        raise SettingsError(f"--ensemble takes 1 to {ENSEMBLE.max_members} members (1: off). "
                            f"Received: ensemble={ensemble!r}")
    if ensemble_mode not in ENSEMBLE.modes:
        raise SettingsError(f"--ensemble-mode takes {' or '.join(ENSEMBLE.modes)}. Received: {ensemble_mode!r}")
    if average not in ENSEMBLE.averages:
        raise SettingsError(f"--average takes {', '.join(ENSEMBLE.averages)}. Received: {average!r}")
    if n > 1 and average != "none":
        raise SettingsError("--average and --ensemble cannot be combined: choose one")
    if resume and (n > 1 or average != "none"):
        raise SettingsError("--ensemble and --average cannot be combined with --resume")
    return dataclasses.replace(settings, ensemble=n, ensemble_mode=ensemble_mode, average=average)


def choose(member_probs: list, labels: np.ndarray, reference: int = 0) -> dict:
    """Members' and the ensemble's validation scores, and which to keep.

    The ensemble is compared with the single model the run would have made
    without `--ensemble` (member `reference`), not with the best of the other
    members: picking the luckiest of N on a few dozen validation images is
    itself overfitting (on digits-10 it chose a member 11 points worse on test).

    Args:
        member_probs: one (n, k) probability array per member; labels: (n,) int.
        reference: the plain run's member (linear and seeds: 0; snapshots: the last).

    Returns:
        {"members": [{"member", "val_accuracy", "val_loss"}], "ensemble_val_accuracy",
        "ensemble_val_loss", "fallback": reference, "kept": "ensemble" or "member R"}: the
        ensemble (the mean) is kept when its cross-entropy is <= the reference member's.
    """
    accuracy = lambda p: float((np.asarray(p).argmax(1) == labels).mean())  # noqa: E731
    members = [{"member": i, "val_accuracy": accuracy(p), "val_loss": cross_entropy(p, labels)}
               for i, p in enumerate(member_probs)]
    mean = np.mean(np.stack(member_probs), axis=0)
    loss = cross_entropy(mean, labels)
    kept = "ensemble" if loss <= members[reference]["val_loss"] else f"member {reference}"
    return {"members": members, "ensemble_val_accuracy": accuracy(mean), "ensemble_val_loss": loss,
            "fallback": reference, "kept": kept}


def average_model(members: list, name: str = "finetune_ensemble"):
    """One Keras model: raw pixels -> the mean of `members`' probabilities (B, k), by `keras.layers.Average`.

    Members built on one input tensor (heads on a shared backbone) are joined in
    that graph; otherwise each member is a nested model called on a new input.
    """
    keras = import_keras()
    if all(m.inputs[0] is members[0].inputs[0] for m in members):
        outputs = keras.layers.Average(name="ensemble_average")([m.outputs[0] for m in members])
        return keras.Model(members[0].inputs, outputs, name=name)
    inputs = keras.Input(tuple(members[0].input_shape[1:]), name="image")
    called = [m(inputs) for m in members]
    outputs = keras.layers.Average(name="ensemble_average")([c[0] if isinstance(c, list) else c for c in called])
    return keras.Model(inputs, outputs, name=name)


def record(ctx, mode: str, choice: dict, details: list[dict]) -> dict:
    """metrics["ensemble"]: the mode, each member's details and scores, the choice; also into plan.json; a note."""
    members = [{**d, **m} for d, m in zip(details, choice["members"])]
    facts = {"mode": mode, **choice, "members": members}
    ctx.reporter.on_note(f"ensemble of {len(members)} ({mode}): validation cross-entropy "
                         f"{choice['ensemble_val_loss']:.4f} vs the plain run's member {choice['fallback']} "
                         f"{members[choice['fallback']]['val_loss']:.4f}; kept the {choice['kept']}")
    path = ctx.run.file("plan.json") if ctx.run is not None else None
    if path is not None and path.exists():
        ctx.run.write_json("plan.json", {**ctx.run.read_json("plan.json"), "ensemble": {
            "mode": mode, "members": details, "kept": choice["kept"]}})
    return facts


def linear_members(plan, similarity, n: int, n_stages: int, config: EnsembleConfig = ENSEMBLE) -> list[dict]:
    """[{"stage": 1..n_stages, "views", "seed_offset"}] for n members of a linear plan (module docstring)."""
    if plan.feature_stage == "best":
        base = similarity.best_stage or n_stages
    else:
        base = n_stages if plan.feature_stage == "final" else int(plan.feature_stage)
    stages = [base + o for o in config.linear_stage_offsets if 1 <= base + o <= n_stages]
    views = lambda i: plan.feature_views if i == 0 else i % (config.linear_max_views + 1)  # noqa: E731
    return [{"stage": stages[i % len(stages)], "views": views(i), "seed_offset": i} for i in range(n)]


def fit_linear_ensemble(ctx, plan, similarity, n_stages: int, balanced: bool, recipe, n: int):
    """N linear heads averaged in one model; returns a `TrainResult`.

    Member 0 is exactly the plan's own linear head (`train.linear.fit_linear_plan`, with its
    cross-validated choice of features where the plan compares them), so the kept model is
    never worse on validation than a plain run; members 1.. follow `linear_members`.
    """
    pooling, c = (recipe.pooling, recipe.linear_c) if recipe is not None else ("avg", 0.0)
    own = fit_linear_plan(ctx, plan, similarity, n_stages, balanced, recipe)
    source = next(s for s in candidate_sources(plan, similarity, n_stages, pooling)
                  if s.name == own.metrics["features"])
    weights = own.model.get_layer("classifier").get_weights()
    specs = [{"stage": plan.feature_stage, "views": plan.feature_views, "seed_offset": 0,
              "features": source.name, "C": own.metrics["C"]}]
    sources, probs = [(source, *weights)], [own.val_probs]
    for spec in linear_members(plan, similarity, n, n_stages)[1:]:
        member = StageSource((None if spec["stage"] == n_stages else spec["stage"],), pooling)
        head = fit_source(dataclasses.replace(ctx, seed=ctx.seed + spec["seed_offset"]), member, spec["views"],
                           balanced, c)[1]
        val = member.rows(ctx, ctx.val)
        if not np.array_equal(ctx.labels(val.records), own.val_labels):
            raise RuntimeError("the members' validation features disagree on their images")
        specs.append({**spec, "features": member.name, "C": head.C})
        sources.append((member, head.kernel, head.bias))
        probs.append(head.probabilities(val.features))
    choice = choose(probs, own.val_labels)
    facts = record(ctx, "linear", choice, specs)
    metrics = {**own.metrics, "ensemble": facts}
    if choice["kept"] == "member 0":
        return dataclasses.replace(own, metrics=metrics)
    if choice["kept"] == "ensemble":
        model = average_model([member_head(ctx, *m, suffix=f"_m{i}") for i, m in enumerate(sources)])
        return _result(ctx, model, plan, own.history, np.mean(probs, axis=0), own.val_labels, metrics, own.notes)
    best = choice["fallback"]
    member, kernel, bias = sources[best]
    metrics.update(C=specs[best]["C"], features=member.name)
    return _result(ctx, member.model(ctx, kernel, bias), plan, own.history, probs[best], own.val_labels, metrics,
                   own.notes)


def member_head(ctx, source, kernel, bias, suffix: str):
    """`source`'s head (kernel (d, k), bias (k,)) on the backbone's own input tensor, its layer names + `suffix`,
    so that several heads join one graph (one backbone pass)."""
    backbone = ctx.backbone.model
    if hasattr(source, "layers"):  # stages, or stages beside pixels: their own model takes the suffix
        return source.model(ctx, kernel, bias, suffix)
    keras = import_keras()  # raw pixels: resized and flattened from the same input
    dense = keras.layers.Dense(len(ctx.classes), activation="softmax", name="classifier" + suffix)
    outputs = dense(source.flattened(backbone.input, suffix))
    dense.set_weights([kernel, bias])
    return keras.Model(backbone.input, outputs, name="finetune_pixel_classifier" + suffix)


def _result(ctx, model, plan, history, val_probs, labels, metrics, notes=()):
    """A `TrainResult` whose test scores are `model`'s own forward pass on raw pixels."""
    size = ctx.backbone.ref.image_size
    score = lambda scan: probabilities(model, scan, size, ctx.batch_size, ctx.config)  # noqa: E731
    return TrainResult(model, plan, history, np.asarray(val_probs, np.float32), labels, metrics, score, list(notes))


def copy_member(whole, i: int):
    """A standalone copy of `whole` (new layers, the same weights now), named `member_i`."""
    keras = import_keras()
    clone = keras.models.clone_model(whole)
    clone.set_weights(whole.get_weights())
    return keras.Model(clone.inputs[0], clone.outputs[0], name=f"member_{i}")


def fit_finetune_ensemble(ctx, plan, recipe, balanced: bool, settings, config: EnsembleConfig = ENSEMBLE):
    """`settings.ensemble` members by `settings.ensemble_mode` (module docstring); returns a `TrainResult`."""
    if settings.ensemble_mode == "snapshots":
        return _snapshots(ctx, plan, recipe, balanced, settings, config)
    return _seeds(ctx, plan, recipe, balanced, settings)


def _snapshots(ctx, plan, recipe, balanced: bool, settings, config: EnsembleConfig):
    """One run of N cosine cycles; each cycle's end is a member. The linear-head comparison follows as usual."""
    from finetune_cli.train.finetune import fit_finetune_plan
    from finetune_cli.train.setup import predict_batches

    n = settings.ensemble
    epochs = n * config.snapshot_cycle
    plan = dataclasses.replace(plan, epochs=epochs)
    recipe = dataclasses.replace(recipe, patience=10 ** 6)  # every cycle runs: no early stop, no plateau decay
    snapshots = CosineSnapshots(config.snapshot_cycle, config.snapshot_floor)
    ctx.reporter.on_note(f"snapshot ensemble: {n} cosine cycles of {config.snapshot_cycle} epochs ({epochs} epochs)")

    def members(result, trainable, val_data):
        models, probs = [], []
        for i, weights in enumerate(snapshots.snapshots):
            trainable.set_weights(weights)
            probs.append(predict_batches(trainable, val_data)[0])
            models.append(copy_member(result.model, i))
        labels = result.val_labels
        choice = choose(probs, labels, reference=len(probs) - 1)  # the last snapshot: what a plain run ends with
        details = [{"epoch": (i + 1) * config.snapshot_cycle} for i in range(len(models))]
        facts = record(ctx, "snapshots", choice, details)
        kept = np.mean(probs, axis=0) if choice["kept"] == "ensemble" else probs[choice["fallback"]]
        model = average_model(models) if choice["kept"] == "ensemble" else models[choice["fallback"]]
        trainable.set_weights(snapshots.snapshots[choice["fallback"]])
        fresh = _result(ctx, model, result.plan, result.history, kept, labels, {**result.metrics, "ensemble": facts})
        return dataclasses.replace(fresh, notes=result.notes)

    return fit_finetune_plan(ctx, plan, recipe, balanced, False, settings, callbacks=[snapshots], after=members)


def _seeds(ctx, plan, recipe, balanced: bool, settings):
    """N full fine-tunes from the same start, seeds seed + i; not compared with the linear head (a note says so)."""
    from finetune_cli.train.finetune import fit_finetune_plan

    n, start = settings.ensemble, ctx.backbone.model.get_weights()
    each = dataclasses.replace(settings, keep_better=False, ensemble=1, learning_curve=False)
    models, results = [], []
    for i in range(n):
        ctx.reporter.on_phase(f"ensemble member {i + 1} of {n} (seed {ctx.seed + i}): a full fine-tune")
        ctx.backbone.model.set_weights(start)
        import_keras().utils.set_random_seed(ctx.seed + i)
        results.append(fit_finetune_plan(dataclasses.replace(ctx, seed=ctx.seed + i), plan, recipe, balanced,
                                         False, each))
        models.append(copy_member(results[-1].model, i))
    labels = results[0].val_labels
    choice = choose([r.val_probs for r in results], labels)
    facts = record(ctx, "seeds", choice, [{"seed": ctx.seed + i} for i in range(n)])
    best = choice["fallback"]
    if choice["kept"] == "ensemble":
        model, probs = average_model(models), np.mean([r.val_probs for r in results], axis=0)
    else:
        model, probs = models[best], results[best].val_probs
    note = f"seed ensemble: {n} full fine-tunes, not compared with the linear head"
    ctx.reporter.on_note(note)
    return _result(ctx, model, results[best].plan, results[best].history, probs, labels,
                   {**results[best].metrics, "ensemble": facts}, results[best].notes + [note])
