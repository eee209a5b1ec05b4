"""`finetune inspect DIR`: what is in a labelled folder, what is broken.
"""

from __future__ import annotations

import os

from finetune_cli.config import SCAN, ScanConfig
from finetune_cli.data.profile import profile_scan
from finetune_cli.data.scan import Progress, scan_folder


def inspect(
    root: str | os.PathLike,
    *,
    config: ScanConfig = SCAN,
    progress: Progress | None = None,
):
    """Scan and profile a class-per-subfolder image folder, or a label table (a multi-label one too: its
    counts are per label).

    Returns:
        A `data.profile.Profile`; `profile.to_dict()` is the `inspect --json` contract.

    Raises:
        FolderError: the folder is unusable (see `scan_folder`).
    """
    return profile_scan(scan_folder(root, labelled=True, config=config, progress=progress, multi_label=True), config)
