"""A whole training run: scan -> profile -> similarity -> plan -> train -> run folder."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import numpy as np

from finetune_cli.artifacts import RunFolder, confusion_figure, curves_figure
from finetune_cli.config import PRETRAIN, SCAN, ScanConfig
from finetune_cli.data.profile import profile_scan
from finetune_cli.data.scan import Scan, scan_folder
from finetune_cli.errors import BackboneError, FolderError, TrainingError
from finetune_cli.features import FeatureCache, extract_many
from finetune_cli.files import shown
from finetune_cli.models.backbones import Backbone, build, resolve
from finetune_cli.models.stages import find_stages, select_layer
from finetune_cli.predict import labelled_test_scan, probabilities, scores
from finetune_cli.strategy import recipes as recipe_files
from finetune_cli.strategy import similarity as sim
from finetune_cli.strategy.decide import Plan, decide, table_recipe
from finetune_cli.train.linear import fit_linear
from finetune_cli.train.resume import already_finished, check_unchanged, load_checkpoint, read_saved

#: report(event, info): "phase" {"name"}, "progress" {"done", "total"},
#: "epoch" {"epoch", "epochs", "loss", "val_loss", "val_accuracy"}, "note" {"text"}.
Report = Callable[[str, dict], None]

VAL_FRACTION = 0.2
MAX_RETRIES = 2
BEST_WEIGHTS = "best.weights.h5"


def _quiet(event: str, info: dict) -> None:
    pass


@dataclasses.dataclass
class Context:
    """What every step of a run shares."""

    run: RunFolder
    scan: Scan
    train: Scan
    val: Scan
    backbone: Backbone
    cache: FeatureCache | None
    config: ScanConfig
    report: Report
    seed: int
    batch_size: int = 32

    @property
    def classes(self) -> list[str]:
        return list(self.scan.classes)

    def features(self, scan: Scan, layers, view: int = 0):
        return extract_many(scan, self.backbone.ref, layers=layers, view=view, cache=self.cache,
                            batch_size=self.batch_size, config=self.config, backbone=self.backbone,
                            progress=lambda d, t: self.report("progress", {"done": d, "total": t}))


def split(scan: Scan, val_scan: Scan | None, fraction: float = VAL_FRACTION, seed: int = 0) -> tuple[Scan, Scan]:
    """(train, validation) scans: --val-dir's, or a stratified seeded split."""
    if val_scan is not None:
        if set(val_scan.classes) != set(scan.classes):
            raise FolderError(
                f"validation classes {sorted(val_scan.classes)} differ from training classes "
                f"{sorted(scan.classes)}: the --val-dir must hold the same class folders"
            )
        return scan, dataclasses.replace(val_scan, classes=scan.classes)
    from sklearn.model_selection import train_test_split

    labels = np.array(scan.label_indices())
    n_val = max(len(scan.classes), int(round(len(labels) * fraction)))
    train_idx, val_idx = train_test_split(np.arange(len(labels)), test_size=n_val, stratify=labels, random_state=seed)
    pick = lambda idx: dataclasses.replace(scan, images=tuple(scan.images[i] for i in sorted(idx)))
    return pick(train_idx), pick(val_idx)


def probe_layers(n_stages: int) -> list[int | None]:
    """The stages the similarity probe compares: the two before the last, and the final output (None)."""
    return [k for k in (n_stages - 2, n_stages - 1) if k >= 1] + [None]


def prefetch(ctx: Context, scans: list[Scan], layers: list) -> None:
    """Fill the feature cache for every image of `scans` in one backbone pass (one trace, one pipeline).

    Later per-scan requests for these layers are then cache reads, so the
    probe, the linear head and the test scores share one forward pass.
    """
    if ctx.cache is None:
        return
    seen, records = set(), []
    for scan in scans:
        for record in scan.images:
            if record.digest not in seen:
                seen.add(record.digest)
                records.append(dataclasses.replace(record, path=str(scan.root / record.path)))
    ctx.report("phase", {"name": f"features of {len(records)} images (stages {[k or 'final' for k in layers]})"})
    ctx.features(Scan(Path("/"), False, (), tuple(records), ()), layers)


def measure_similarity(ctx: Context, n_stages: int) -> sim.Similarity:
    """Probe the final stage and the two before it on a stratified sample (see `strategy.similarity`)."""
    labels = np.array(ctx.train.label_indices())
    keep = sim.sample_indices(labels, seed=ctx.seed)
    sample = dataclasses.replace(ctx.train, images=tuple(ctx.train.images[i] for i in keep))
    layers = probe_layers(n_stages)
    tables = ctx.features(sample, layers)
    y = np.array(sample.label_indices())
    accuracy = {k or n_stages: sim.probe_accuracy(t.features, y, ctx.seed) for k, t in zip(layers, tables)}
    accuracy = {k: v for k, v in accuracy.items() if np.isfinite(v)} or {n_stages: 0.0}
    confidence = None
    if ctx.backbone.classifier is not None:
        from finetune_cli.data.pipeline import batched_images

        probs = [ctx.backbone.classifier(x, training=False).numpy().max(1)
                 for x, _ in batched_images(sample.paths(), ctx.backbone.ref.image_size, ctx.batch_size, ctx.config)]
        confidence = float(np.concatenate(probs).mean())
    return sim.judge(accuracy, confidence, len(keep))


def class_weights(labels: np.ndarray, n_classes: int, balanced: bool) -> np.ndarray:
    """Per-class weight, n / (k * n_c) when balanced, else ones."""
    counts = np.bincount(labels, minlength=n_classes).astype(float)
    if not balanced:
        return np.ones(n_classes)
    return len(labels) / (n_classes * np.maximum(counts, 1))


def train_linear(ctx: Context, plan: Plan, similarity: sim.Similarity, n_stages: int, balanced: bool):
    """Logistic regression on cached features of the plan's stage; returns (model, history, val probs)."""
    from finetune_cli.models.heads import classifier

    stage = plan.feature_stage
    layer = None if stage == "final" else (similarity.best_stage if stage == "best" else int(stage))
    if layer == n_stages:
        layer = None
    ctx.report("phase", {"name": f"features from {'the final stage' if layer is None else f'stage {layer}'}"})
    tables = [ctx.features(ctx.train, [layer], view)[0] for view in range(plan.feature_views + 1)]
    val_table = ctx.features(ctx.val, [layer])[0]
    index = {name: i for i, name in enumerate(ctx.classes)}
    x = np.concatenate([t.features for t in tables])
    y = np.concatenate([[index[r.label] for r in t.records] for t in tables])
    groups = np.concatenate([[r.digest for r in t.records] for t in tables])
    ctx.report("phase", {"name": "fitting the linear head (cross-validated C)"})
    head = fit_linear(x, y, len(ctx.classes), groups=np.unique(groups, return_inverse=True)[1],
                      balanced=balanced, seed=ctx.seed)
    name = select_layer(ctx.backbone.model, layer)
    model = classifier(ctx.backbone.model, name, len(ctx.classes), kernel=head.kernel, bias=head.bias)
    val_labels = np.array([index[r.label] for r in val_table.records])
    train_acc = float((head.probabilities(x).argmax(1) == y).mean())

    def score(scan: Scan):
        """(probabilities, ok) for scan.images through cached features and the head: the model's own math."""
        table = ctx.features(scan, [layer])[0]
        rows = {r.path: i for i, r in enumerate(table.records)}
        ok = np.array([r.path in rows for r in scan.images])
        probs = np.zeros((len(scan.images), len(ctx.classes)), np.float32)
        probs[ok] = head.probabilities(table.features)[[rows[r.path] for r in scan.images if r.path in rows]]
        return probs, ok

    extra = {"train_accuracy": train_acc, "C": head.C}
    return model, head.scores, head.probabilities(val_table.features), val_labels, extra, score


def train_finetune(ctx: Context, plan: Plan, recipe, balanced: bool, resume: bool, notes: list[str]):
    """Head on cached features, then the plan's stages, with NaN retries at lr / 10."""
    from finetune_cli.data.pipeline import augmenter, labelled_batches
    from finetune_cli.models.heads import classifier
    from finetune_cli.train.loop import Diverged, fit, predict_batches

    index = {name: i for i, name in enumerate(ctx.classes)}
    y_train = np.array([index[r.label] for r in ctx.train.images])
    weights = class_weights(y_train, len(ctx.classes), balanced)
    if resume and ctx.run.file("checkpoint.keras").exists():
        model, state = load_checkpoint(ctx.run)
        ctx.report("note", {"text": f"resuming after epoch {state.epoch} (optimizer state starts afresh)"})
    else:
        ctx.report("phase", {"name": "phase 1: linear head on frozen final features"})
        table = ctx.features(ctx.train, [None])[0]
        labels = np.array([index[r.label] for r in table.records])
        head = fit_linear(table.features, labels, len(ctx.classes), balanced=balanced, seed=ctx.seed)
        model = classifier(ctx.backbone.model, ctx.backbone.model.layers[-1].name, len(ctx.classes),
                           dropout=recipe.dropout, l2=recipe.l2, kernel=head.kernel, bias=head.bias)
        state = None
    size = ctx.backbone.ref.image_size
    train_data = labelled_batches(ctx.train.paths(), y_train, weights[y_train], size, recipe.batch_size,
                                  shuffle_seed=ctx.seed, augment=augmenter(plan.augmentation), config=ctx.config)
    y_val = np.array([index[r.label] for r in ctx.val.images])
    val_data = labelled_batches(ctx.val.paths(), y_val, np.ones(len(y_val)), size, recipe.batch_size, config=ctx.config)

    def checkpoint(model, state, improved: bool):
        if improved:
            ctx.run.save_weights(model, BEST_WEIGHTS)
        ctx.run.save_model(model, "checkpoint.keras")
        ctx.run.write_json("state.json", dataclasses.asdict(state))

    def restore_best(model):
        ctx.report("note", {"text": f"restoring the best epoch's weights from {BEST_WEIGHTS}"})
        model.load_weights(ctx.run.file(BEST_WEIGHTS))

    start_weights = model.get_weights()
    for attempt in range(MAX_RETRIES + 1):
        ctx.report("phase", {"name": f"phase 2: fine-tuning stages {list(plan.train_stages)} "
                             f"(head lr {plan.learning_rates['head']:.2g}, top {plan.learning_rates['top']:.2g}, "
                             f"intermediate {plan.learning_rates['intermediate']:.2g})"})
        try:
            state = fit(model, plan, recipe, train_data, val_data, state=state, checkpoint=checkpoint,
                        restore_best=restore_best, progress=lambda s, total: ctx.report("epoch", {**s.history[-1], "epochs": total}))
            break
        except Diverged as exc:
            if attempt == MAX_RETRIES:
                raise TrainingError(f"{exc} even at head lr {plan.learning_rates['head']:.2g}: the learning rate "
                                    "is too high or the data is broken; lower learning_rate in a --recipe file") from None
            lowered = {k: v / 10 for k, v in plan.learning_rates.items()}
            note = (f"{exc}: learning rate too high; retrying at lr/10 (head {lowered['head']:.2g})")
            notes.append(note)
            ctx.report("note", {"text": note})
            plan = dataclasses.replace(plan, learning_rates=lowered)
            model.set_weights(start_weights)
            state = None
    history = state.history
    if len(history) >= 2 and history[0]["val_loss"] > 0:
        moved = (history[0]["val_loss"] - min(h["val_loss"] for h in history)) / history[0]["val_loss"]
        if abs(moved) < 0.01 and history[-1]["accuracy"] < 0.9:
            notes.append("validation loss barely moved: the learning rate may be too low for this data")
    probs, labels = predict_batches(model, val_data)
    return model, history, probs, labels, {"train_accuracy": history[-1]["accuracy"], "best_epoch": state.best_epoch}, plan


def train(
    root, base: str | None, *, out, weights: str = "imagenet", image_size: int | None = None,
    similarity: str = "auto", strategy: str = "auto", recipe: str | None = None,
    val_dir=None, seed: int = 0, resume: bool = False, cache_dir=None, use_cache: bool = True,
    batch_size: int = 32, config: ScanConfig = SCAN, report: Report | None = None,
    unlabeled=None, pretrain_config=None, greedy: bool = False, test_dir=None,
) -> dict:
    """Train a classifier on `root`'s class folders; returns metrics (also in RUN/metrics.json).

    With `unlabeled`, a denoising autoencoder is first pretrained on those
    images into RUN/encoder.keras (starting from `base`'s early stages when
    a base is given) and training starts from that encoder. With
    `test_dir`, the trained model is evaluated on that labelled folder in the
    same process (metrics["test"], as `evaluate` returns it). With `resume`,
    see `train.resume` for what is checked; a finished run is left as it is.

    If training fails before anything worth resuming exists, the files it
    wrote (and the folder, if it made it) are removed.
    """
    report = report or _quiet
    clock = {"start": time.perf_counter()}
    if base is None and unlabeled is None:
        raise BackboneError("--base is required (a name from `finetune bases` or a .keras file), "
                            "unless --unlabeled pretrains an encoder first")
    if recipe is not None:
        recipe_files.load(recipe)  # validate before any work
    cache = FeatureCache.at(cache_dir, write=True) if use_cache else None
    run = RunFolder(out, resume=resume)
    if resume and run.finished:
        report("note", {"text": f"the run in {run.path} is finished: nothing to resume, nothing changed "
                                "(to train again, choose a new --out)"})
        return already_finished(run)
    saved = read_saved(run) if resume else None
    with run.guarded():
        pretrained = None
        if unlabeled is not None:
            pretrained = pretrain_encoder(run, unlabeled, base=base, weights=weights, image_size=image_size,
                                          seed=seed, config=pretrain_config, greedy=greedy, scan_config=config,
                                          report=report)
            base, weights, image_size = str(run.file("encoder.keras")), "imagenet", pretrained["image_size"]
            similarity = "similar" if similarity == "auto" else similarity
        report("phase", {"name": "scanning"})
        scan = scan_folder(root, labelled=True, config=config)
        profile = profile_scan(scan, config)
        ref = resolve(base, weights, image_size or (saved.image_size if saved else None), seed)
        if saved:
            check_unchanged(saved, scan.classes, ref, recipe)
        val_scan = scan_folder(val_dir, labelled=True, config=config) if val_dir else None
        test_scan = labelled_test_scan(test_dir, list(scan.classes), config) if test_dir else None
        train_scan, val_scan = split(scan, val_scan, seed=seed)
        report("phase", {"name": f"building {ref.label} ({ref.weights} weights, {ref.image_size} px)"})
        backbone = build(ref)
        n_stages = len(find_stages(backbone.model))
        ctx = Context(run, scan, train_scan, val_scan, backbone, cache, config, report, seed, batch_size)
        clock["prepared"] = time.perf_counter()
        if saved:
            plan, evidence, recipe_obj = saved.plan, saved.evidence, saved.recipe
        else:
            plan, evidence, recipe_obj = decide_and_record(ctx, profile, n_stages, similarity, strategy, recipe,
                                                           pretrained, test_scan)
        report("plan", {"plan": plan, "similarity": evidence})
        clock["planned"] = time.perf_counter()
        return fit_and_finish(ctx, profile, plan, evidence, recipe_obj, n_stages, resume, pretrained,
                              test_scan, clock)


def decide_and_record(ctx: Context, profile, n_stages: int, similarity: str, strategy: str, recipe: str | None,
                      pretrained: dict | None, test_scan: Scan | None):
    """Choose the plan (see `choose`) and write plan.json, recipe.toml, labels.json, skipped.csv.

    Returns:
        (Plan, Similarity, Recipe).
    """
    import pandas as pd

    if recipe is None and (strategy == "linear" or (strategy == "auto" and profile.size_category == "small")):
        # A linear head is all but certain: one pass now serves the probe, the head, validation and test.
        prefetch(ctx, [ctx.train, ctx.val] + ([test_scan] if test_scan else []), probe_layers(n_stages))
    evidence, plan, recipe_obj, recipe_text = choose(ctx, profile, n_stages, similarity, strategy, recipe,
                                                     pretrained is not None)
    ref, run = ctx.backbone.ref, ctx.run
    run.write_json("plan.json", {"plan": plan.to_dict(), "similarity": evidence.to_dict(),
                                 "base": ref.label, "weights": ref.weights, "image_size": ref.image_size,
                                 "pretrained": pretrained})
    run.write_text("recipe.toml", recipe_text)
    run.write_json("labels.json", ctx.classes)
    skipped = [{"path": shown(s.path), "reason": shown(s.reason)} for s in ctx.scan.skipped]
    run.write_frame("skipped.csv", pd.DataFrame(skipped, columns=["path", "reason"]))
    return plan, evidence, recipe_obj


def fit_and_finish(ctx: Context, profile, plan, evidence, recipe_obj, n_stages: int, resume: bool,
                   pretrained: dict | None, test_scan: Scan | None, clock: dict) -> dict:
    """Train what the plan says, score the test folder if any, and write the results."""
    balanced = profile.imbalance >= ctx.config.imbalance_warn_ratio
    notes: list[str] = []
    if plan.strategy == "linear":
        model, history, probs, labels, extra, score = train_linear(ctx, plan, evidence, n_stages, balanced)
    else:
        model, history, probs, labels, extra, plan = train_finetune(ctx, plan, recipe_obj, balanced, resume, notes)
        score = lambda scan: probabilities(model, scan, ctx.backbone.ref.image_size, ctx.batch_size, ctx.config)
    clock["trained"] = time.perf_counter()
    if not np.isfinite(probs).all():
        raise TrainingError("the trained model gives NaN or infinite outputs on the validation images: "
                            "nothing was saved; lower learning_rate in a --recipe file")
    if pretrained is not None:
        extra["pretrained"] = pretrained
    if test_scan is not None:
        ctx.report("phase", {"name": f"evaluating on {len(test_scan.images)} test images"})
        extra["test"] = scores(*score(test_scan), test_scan, ctx.classes)
        extra["test_accuracy"] = extra["test"]["accuracy"]
    return _finish(ctx, plan, evidence, profile, model, history, probs, labels, extra, notes, clock)


def _finish(ctx, plan, evidence, profile, model, history, probs, labels, extra, notes, clock) -> dict:
    """Write model, metrics, history and plots to the run folder."""
    import pandas as pd
    from sklearn.metrics import confusion_matrix

    run = ctx.run
    ctx.report("phase", {"name": f"saving to {run.path}"})
    run.save_model(model, facts={"classes": ctx.classes, "image_size": ctx.backbone.ref.image_size})
    matrix = confusion_matrix(labels, probs.argmax(1), labels=list(range(len(ctx.classes))))
    run.write_frame("history.csv", pd.DataFrame(history))
    run.save_figure("curves.png", curves_figure(history))
    run.save_figure("confusion.png", confusion_figure(matrix, ctx.classes))
    metrics = {
        "strategy": plan.strategy,
        "recipe": plan.recipe,
        "similarity": evidence.verdict,
        "size_category": profile.size_category,
        "val_accuracy": float((probs.argmax(1) == labels).mean()),
        **extra,
        "n_train": len(ctx.train.images),
        "n_val": len(ctx.val.images),
        "n_skipped": len(ctx.scan.skipped),
        "classes": ctx.classes,
        "learning_rates": plan.learning_rates,
        "notes": notes,
        "timings_s": {
            "prepare": round(clock["prepared"] - clock["start"], 3),
            "plan": round(clock["planned"] - clock["prepared"], 3),
            "train": round(clock["trained"] - clock["planned"], 3),
            "total": round(time.perf_counter() - clock["start"], 3),
        },
    }
    run.write_json("metrics.json", metrics)
    return metrics


def pretrain_encoder(run: RunFolder, unlabeled, *, base, weights, image_size, seed, config, greedy,
                     scan_config: ScanConfig, report: Report) -> dict:
    """Pretrain RUN/encoder.keras on the unlabeled images (or reuse it on --resume); returns its summary."""
    from finetune_cli.train.pretrain import companion, pretrain

    path = run.file("encoder.keras")
    if path.exists() and companion(path, "pretrain.json").exists():
        report("note", {"text": f"reusing the encoder pretrained earlier in {path}"})
        return run.read_json(companion(path, "pretrain.json").name)
    config = config or PRETRAIN
    if image_size:
        config = dataclasses.replace(config, image_size=image_size)
    return pretrain(unlabeled, path, config=config, init_from=base, init_weights=weights, greedy=greedy,
                    seed=seed, scan_config=scan_config, report=report)


def choose(ctx: Context, profile, n_stages: int, similarity: str, strategy: str, recipe: str | None,
           own_encoder: bool = False):
    """Similarity evidence -> recipe -> plan: the decision `train` and `inspect --base` share.

    A forced verdict skips the measurement unless the plan needs the best
    earlier stage, which only the probe can tell. `own_encoder`: the base
    was just pretrained on this domain's unlabeled images.

    Returns:
        (Similarity, Plan, Recipe, recipe text).
    """
    if similarity == "auto":
        ctx.report("phase", {"name": "measuring similarity to the pretraining data"})
        evidence = measure_similarity(ctx, n_stages)
    elif own_encoder and similarity == "similar":
        evidence = sim.forced(similarity, "the encoder was pretrained on unlabeled images of this domain")
    else:
        evidence = sim.forced(similarity)
    recipe_obj, recipe_text = recipe_files.load(recipe or table_recipe(profile.size_category, evidence.verdict, strategy))
    plan = decide(profile.size_category, evidence.verdict, n_stages, recipe_obj,
                  overridden=recipe is not None or strategy != "auto",
                  source="the encoder's own pretraining images" if own_encoder else "ImageNet")
    if plan.feature_stage == "best" and not evidence.best_stage:
        ctx.report("phase", {"name": "probing stages for the best features"})
        probed = measure_similarity(ctx, n_stages)
        evidence = dataclasses.replace(evidence, stage_accuracy=probed.stage_accuracy,
                                       best_stage=probed.best_stage, n_sample=probed.n_sample)
    return evidence, plan, recipe_obj, recipe_text


def plan_for(
    root, base: str, *, weights: str = "imagenet", image_size: int | None = None, similarity: str = "auto",
    strategy: str = "auto", recipe: str | None = None, seed: int = 0, cache_dir=None, use_cache: bool = True,
    config: ScanConfig = SCAN, report: Report | None = None,
):
    """What `train` would decide, without training: (profile, similarity, plan)."""
    report = report or _quiet
    scan = scan_folder(root, labelled=True, config=config)
    profile = profile_scan(scan, config)
    backbone = build(resolve(base, weights, image_size, seed))
    n_stages = len(find_stages(backbone.model))
    cache = FeatureCache.at(cache_dir, write=True) if use_cache else None
    ctx = Context(None, scan, scan, scan, backbone, cache, config, report, seed)
    evidence, plan, _, _ = choose(ctx, profile, n_stages, similarity, strategy, recipe)
    return profile, evidence, plan
