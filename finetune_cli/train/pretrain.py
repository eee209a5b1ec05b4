"""Denoising-autoencoder pretraining: unlabeled folder -> encoder file.

scan (flat or nested, the rules of `inspect`) -> held-out split -> autoencoder
-> reconstruction training (optionally greedy, layer by layer) with early
stopping on the held-out images -> ENCODER.keras and, beside it,
ENCODER.reconstructions.png, ENCODER.curves.png, ENCODER.history.csv and
ENCODER.pretrain.json.

The encoder is saved atomically each time the held-out loss improves, so an
interrupted run leaves the last good encoder.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

from finetune_cli.config import PRETRAIN, SCAN, PretrainConfig, ScanConfig
from finetune_cli.data.scan import scan_folder
from finetune_cli.errors import FolderError, OutputError, TrainingError
from finetune_cli.files import check_writable_folder, create_folder, remove_stale_temps, writing
from finetune_cli.models import autoencoder as models
from finetune_cli.models.files import save_model_atomic
from finetune_cli.pages.figures import figure_png, pretrain_curves_figure, reconstructions_figure
from finetune_cli.progress import QUIET, Reporter
from finetune_cli.train.engine import Diverged, Each, EarlyStopping, Group, NanGuard, Trainer


def companion(encoder_path: Path, suffix: str) -> Path:
    """A file beside the encoder: enc.keras -> enc.<suffix>."""
    return encoder_path.with_name(f"{encoder_path.stem}.{suffix}")


COMPANIONS = ("reconstructions.png", "curves.png", "history.csv", "pretrain.json")


def check_output(out, claimed: bool = False) -> Path:
    """The encoder path, refused when it or a companion file exists, or is not `.keras`.

    Args:
        claimed: `out` is the empty placeholder the default name was claimed with
            (`files.claim_numbered`, so that two pretrainings never pick one name): not refused.

    Raises:
        OutputError: with what to do instead.
    """
    path = Path(out).expanduser().absolute()
    if path.suffix != ".keras":
        raise OutputError(f"--out {path.name} must end in .keras (the encoder is saved as a Keras model file)")
    taken = [p for p in (path, *(companion(path, s) for s in COMPANIONS)) if p.exists() and not (claimed and p == path)]
    if taken:
        raise OutputError(f"{taken[0]} already exists: choose another --out or delete the old encoder and its files")
    if not path.parent.is_dir():
        create_folder(path.parent, command="pretrain", parents=True)
    check_writable_folder(path.parent)
    for name in (path.name, *(companion(path, s).name for s in COMPANIONS)):
        remove_stale_temps(path.parent, name)
    return path


def split_holdout(n: int, fraction: float, seed: int, most: int = PRETRAIN.max_holdout) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices): a seeded shuffle, at least 2 and at most `most` held out."""
    order = np.random.default_rng(seed).permutation(n)
    n_hold = int(min(most, max(2, round(n * fraction))))
    return np.sort(order[n_hold:]), np.sort(order[:n_hold])


def corrupt(x, generator, noise: float, kind: str):
    """Corrupt a batch of images in [0, 255]: Gaussian noise (std `noise` x 255) or whole pixels zeroed."""
    import tensorflow as tf

    if kind == "gaussian":
        return tf.clip_by_value(x + generator.normal(tf.shape(x)) * (noise * 255.0), 0.0, 255.0)
    shape = tf.concat([tf.shape(x)[:-1], [1]], 0)
    return x * tf.cast(generator.uniform(shape) >= noise, x.dtype)


def mask(h, generator, noise: float):
    """Masking noise on hidden activations (greedy layers after the first): a fraction `noise` zeroed."""
    import tensorflow as tf

    return h * tf.cast(generator.uniform(tf.shape(h)) >= noise, h.dtype)


def _weighted_mean(per_sample, weights):
    import tensorflow as tf

    return tf.reduce_sum(per_sample * weights) / tf.maximum(tf.reduce_sum(weights), 1.0)


def whole_loss(ae):
    """Loss of the whole autoencoder: per-image MSE between reconstruction and clean image in [0, 1]."""
    import tensorflow as tf

    def loss(noisy, clean, weights, generator, training):
        reconstruction = ae.model(noisy, training=training)
        per_sample = tf.reduce_mean(tf.square(reconstruction - clean / 255.0), axis=[1, 2, 3])
        return _weighted_mean(per_sample, weights)

    return loss


def layer_loss(ae, index: int, noise: float):
    """Greedy loss for dense layer `index` (0 = nearest the pixels) of a tied mlp autoencoder.

    The layers below are fixed; layer `index` and its tied decoder learn to
    rebuild the clean activations below it from corrupted ones.
    """
    import tensorflow as tf

    dense, tied = ae.layers[index]
    below = [d for d, _ in ae.layers[:index]]

    def lower(x):
        h = tf.reshape(x / 255.0, (tf.shape(x)[0], -1))
        for layer in below:
            h = layer(h)
        return h

    def loss(noisy, clean, weights, generator, training):
        target = lower(clean)
        given = lower(noisy) if index == 0 else mask(target, generator, noise)
        per_sample = tf.reduce_mean(tf.square(tied(dense(given)) - target), axis=1)
        return _weighted_mean(per_sample, weights)

    return loss


@dataclasses.dataclass
class Phase:
    """One training phase: a loss over some variable groups, each with its own learning rate."""

    name: str
    loss: Callable
    groups: list  # [(variables, learning rate)]


def fit_phase(ae, phase: Phase, train_data, val_data, config: PretrainConfig, seed: int,
              on_best: Callable[[], None], reporter: Reporter = QUIET) -> list[dict]:
    """Train one phase with the engine and early stopping; the autoencoder ends holding the best weights.

    Returns:
        One dict per epoch: phase, epoch, loss, val_loss, seconds, images.

    Raises:
        TrainingError: a loss became NaN or infinite.
    """
    import tensorflow as tf

    from finetune_cli.data.pipeline import image_spec

    generator = tf.random.Generator.from_seed(seed)
    val_generator = tf.random.Generator.from_seed(seed + 1)

    def loss(x, w):
        noisy = corrupt(x, generator, config.noise, config.noise_type)
        return phase.loss(noisy, x, w, generator, True), tf.reduce_sum(w), {}

    @tf.function(input_signature=[image_spec(config.image_size, tf.float32), tf.TensorSpec((None,), tf.float32)])
    def held_out(x, w):
        noisy = corrupt(x, val_generator, config.noise, config.noise_type)
        return phase.loss(noisy, x, w, val_generator, False) * tf.reduce_sum(w), tf.reduce_sum(w)

    def validate() -> dict:
        val_generator.reset_from_seed(seed + 1)  # the same corruption every epoch: comparable losses
        sums = [held_out(x, w) for x, w in val_data]
        return {"val_loss": sum(float(a) for a, _ in sums) / max(sum(float(b) for _, b in sums), 1.0)}

    def record(trainer, state, logs):
        logs["phase"] = phase.name
        reporter.on_epoch(logs, config.epochs)

    callbacks = [NanGuard(), EarlyStopping(config.patience, config.min_improvement, relative=True,
                                           on_improve=lambda trainer: on_best()), Each(record)]
    groups = [Group(f"group{i}", list(vs), rate) for i, (vs, rate) in enumerate(phase.groups)]
    signature = [image_spec(config.image_size, tf.float32), tf.TensorSpec((None,), tf.float32)]
    trainer = Trainer(ae.model, loss, groups, signature, callbacks=callbacks)
    try:
        state = trainer.fit(train_data, validate, config.epochs)
    except Diverged:
        raise TrainingError("pretraining diverged (the loss became NaN or infinite): try a smaller --noise "
                            "or --code-size, or check the images with `finetune inspect`") from None
    keep = ("phase", "epoch", "loss", "val_loss", "seconds", "images")
    return [{k: row[k] for k in keep} for row in state.history]


def build_autoencoder(config: PretrainConfig, init_ref, seed: int, reporter: Reporter):
    """(Autoencoder, phases, facts for the summary); `init_ref` is the resolved `--init-from` base or None."""
    rate = config.learning_rate
    if init_ref is not None:
        from finetune_cli.models.backbones import build

        reporter.on_phase(f"building {init_ref.label} ({init_ref.weights} weights) to adapt")
        ae, stage, n_stages = models.adapted_autoencoder(build(init_ref).model, config.image_size,
                                                         config.conv_filters, seed)
        facts = {"init_from": init_ref.label, "init_weights": init_ref.weights,
                 "init_stage": stage, "init_stages_total": n_stages}
        groups = [(ae.encoder_variables, rate * config.adapt_factor), (ae.decoder_variables, rate)]
        return ae, [Phase("end to end", whole_loss(ae), groups)], facts
    if config.arch == "mlp":
        ae = models.mlp_autoencoder(config.image_size, config.mlp_hidden, config.code_size, seed)
    else:
        ae = models.conv_autoencoder(config.image_size, config.conv_filters, config.code_size, seed)
    return ae, [Phase("end to end", whole_loss(ae), [(ae.model.trainable_variables, rate)])], {}


def greedy_phases(ae, config: PretrainConfig) -> list[Phase]:
    """One phase per dense layer of a tied mlp autoencoder, from the pixels inward."""
    phases = []
    for i, (dense, tied) in enumerate(ae.layers):
        phases.append(Phase(f"layer {i + 1} ({dense.name})", layer_loss(ae, i, config.noise),
                            [([dense.kernel, dense.bias, tied.bias], config.learning_rate)]))
    return phases


def pretrain(
    unlabeled, out, *, config: PretrainConfig = PRETRAIN, init_from: str | None = None,
    init_weights: str = "imagenet", greedy: bool = False, seed: int = 0,
    scan_config: ScanConfig = SCAN, reporter: Reporter = QUIET, claimed: bool = False,
) -> dict:
    """Pretrain a denoising autoencoder on the images under `unlabeled`; save its encoder at `out`.

    Args:
        unlabeled: a folder of images, flat or in subfolders (labels are ignored).
        out: the encoder file to create (.keras); companion files go beside it.
        claimed: `out` is an empty placeholder claimed for the default name (see `check_output`).
        config: architecture and training settings (see `PretrainConfig`).
        init_from: a registry name or .keras file whose early stages start the encoder.
        greedy: for `mlp`, train layer by layer before the whole stack.

    Returns:
        The summary written to ENCODER.pretrain.json.

    Raises:
        FolderError, OutputError, BackboneError, WeightsUnavailableError.
    """
    started = time.perf_counter()
    path = check_output(out, claimed)
    reporter.on_phase(f"encoder: {path}")
    ref = None
    if init_from is not None:
        from finetune_cli.models.backbones import resolve

        ref = resolve(init_from, init_weights, config.image_size, seed)
    reporter.on_phase("scanning the unlabeled images")
    scan = scan_folder(unlabeled, labelled=False, config=scan_config)
    if len(scan.images) < config.min_images:
        raise FolderError(f"{scan.root} has {len(scan.images)} usable images; pretraining needs at least "
                          f"{config.min_images} (more is better: hundreds to thousands)")
    paths = scan.paths()
    train_idx, hold_idx = split_holdout(len(paths), config.holdout, seed)
    ae, phases, facts = build_autoencoder(config, ref, seed, reporter)
    if greedy and ae.arch == "mlp":
        phases = greedy_phases(ae, config) + phases
    elif greedy:
        reporter.on_note("--greedy applies to --arch mlp only; training the whole autoencoder at once")
    train_data, val_data, in_memory = _datasets(paths, train_idx, hold_idx, config, seed, scan_config)
    history = []
    save = lambda: _save_encoder(ae.encoder, path)
    for phase in phases:
        reporter.on_phase(f"pretraining {ae.arch} autoencoder: {phase.name} on {len(train_idx)} images, "
                          f"{len(hold_idx)} held out")
        history += fit_phase(ae, phase, train_data, val_data, config, seed, save, reporter)
    save()
    summary = _summary(ae, config, scan, train_idx, hold_idx, history, facts, greedy, in_memory, started)
    summary["identity_val_loss"], examples = _examples(ae, val_data, config, seed)
    summary["encoder"] = str(path)
    _write_companions(path, history, summary, examples)
    return summary


def _datasets(paths, train_idx, hold_idx, config: PretrainConfig, seed: int, scan_config: ScanConfig):
    from finetune_cli.data.pipeline import image_batches

    in_memory = len(paths) * config.image_size**2 * 3 <= config.memory_cache_mb * 1e6
    pick = lambda idx: [paths[i] for i in idx]
    train_data = image_batches(pick(train_idx), config.image_size, config.batch_size, shuffle_seed=seed,
                               in_memory=in_memory, config=scan_config)
    if -(-len(train_idx) // config.batch_size) < config.min_steps:
        train_data = train_data.repeat().take(config.min_steps)
    val_data = image_batches(pick(hold_idx), config.image_size, config.batch_size, in_memory=in_memory,
                             config=scan_config)
    return train_data, val_data, in_memory


def _save_encoder(encoder, path: Path) -> None:
    save_model_atomic(encoder, path)


def _examples(ae, val_data, config: PretrainConfig, seed: int):
    """(held-out loss of the corrupted input itself, (clean, noisy, reconstructed) examples)."""
    import tensorflow as tf

    generator = tf.random.Generator.from_seed(seed + 1)
    total, seen, shown = 0.0, 0.0, None
    for x, w in val_data:
        noisy = corrupt(x, generator, config.noise, config.noise_type)
        per_sample = tf.reduce_mean(tf.square(noisy / 255.0 - x / 255.0), axis=[1, 2, 3])
        total, seen = total + float(tf.reduce_sum(per_sample * w)), seen + float(tf.reduce_sum(w))
        if shown is None:
            k = min(config.n_examples, len(x))
            shown = (x[:k].numpy(), noisy[:k].numpy(), ae.model(noisy[:k], training=False).numpy())
    return total / max(seen, 1.0), shown


def _summary(ae, config, scan, train_idx, hold_idx, history, facts, greedy, in_memory, started) -> dict:
    final = [h for h in history if h["phase"] == "end to end"]
    best = min(final, key=lambda h: h["val_loss"])
    images = sum(h["images"] for h in history)
    seconds = sum(h["seconds"] for h in history)
    steady = [h for h in history if h["epoch"] > 1] or history  # the first epoch of a phase also traces
    return {
        **{k: v for k, v in dataclasses.asdict(config).items() if k not in ("min_images", "memory_cache_mb")},
        "arch": ae.arch,
        "greedy": bool(greedy and ae.arch == "mlp"),
        **facts,
        "encoder_output": list(ae.encoder.output_shape[1:]),
        "encoder_params": int(ae.encoder.count_params()),
        "n_images": len(scan.images),
        "n_train": len(train_idx),
        "n_holdout": len(hold_idx),
        "n_skipped": len(scan.skipped),
        "in_memory": in_memory,
        "epochs_run": len(history),
        "best_epoch": best["epoch"],
        "best_val_loss": best["val_loss"],
        "train_images_per_s": round(images / max(seconds, 1e-9), 1),
        "steady_images_per_s": round(sum(h["images"] for h in steady) / max(sum(h["seconds"] for h in steady), 1e-9), 1),
        "seconds": round(time.perf_counter() - started, 2),
    }


def _write_companions(path: Path, history: list[dict], summary: dict, examples) -> None:
    import pandas as pd

    files = {
        "history.csv": pd.DataFrame(history).to_csv(index=False).encode(),
        "curves.png": figure_png(pretrain_curves_figure(history)),
        "reconstructions.png": figure_png(reconstructions_figure(*examples)),
        "pretrain.json": (json.dumps(summary, indent=2) + "\n").encode(),
    }
    for suffix, data in files.items():
        with writing(companion(path, suffix)) as tmp:
            tmp.write_bytes(data)
