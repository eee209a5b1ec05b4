"""`finetune pretrain --unlabeled RAW`: a denoising autoencoder's encoder, saved as a backbone file
(the fitting itself is `train.pretrain`).
"""

from __future__ import annotations

import os
from pathlib import Path

from finetune_cli.config import PRETRAIN, PretrainConfig, checked_pretrain_config
from finetune_cli.files import claim_numbered, drop_if_empty
from finetune_cli.progress import QUIET, Reporter
from finetune_cli.train.pretrain import pretrain as run_pretraining


def pretrain(
    unlabeled: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    settings: PretrainConfig | None = None,
    init_from: str | None = None,
    init_weights: str = "imagenet",
    greedy: bool = False,
    seed: int = 0,
    reporter: Reporter = QUIET,
) -> dict:
    """Pretrain a denoising autoencoder on unlabeled images; save its encoder as a backbone file.

    Args:
        out: the encoder file to create; None: a new `runs/<folder name>-encoder-<N>.keras`, claimed
            at once (two pretrainings started together never share a name).
        settings: from `pretrain_config(...)`; None for the defaults.
        init_from: a backbone whose early stages start the encoder.

    Returns:
        The summary also written to `<out stem>.pretrain.json` (its "encoder" is the path).

    Raises:
        FolderError, OutputError, BackboneError, WeightsUnavailableError, TrainingError.
    """
    config = checked_pretrain_config(settings or PRETRAIN)
    claimed = out is None  # the default name is claimed now, as an empty file: never shared with another run
    out = claim_numbered(f"{Path(unlabeled).resolve().name}-encoder", ".keras", file=True) if claimed else out
    with drop_if_empty(out if claimed else None):  # no encoder saved: the name is given back
        return run_pretraining(unlabeled, out, config=config, init_from=init_from, init_weights=init_weights,
                               greedy=greedy, seed=seed, reporter=reporter, claimed=claimed)


def pretrain_config(arch: str | None = None, noise: float | None = None, noise_type: str | None = None,
                    code_size: int | None = None, image_size: int | None = None,
                    epochs: int | None = None) -> PretrainConfig:
    """`PretrainConfig` with the given fields changed (None keeps a default), validated.

    Raises:
        SettingsError: a value out of range.
    """
    import dataclasses

    given = dict(arch=arch, noise=noise, noise_type=noise_type, code_size=code_size, image_size=image_size,
                 epochs=epochs)
    return checked_pretrain_config(dataclasses.replace(PRETRAIN, **{k: v for k, v in given.items() if v is not None}))
