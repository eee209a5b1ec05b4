"""The extractor a user writes by hand, as the baseline for benchmarks/extract.py.

keras.utils.load_img per file, model.predict in batches of 32, mean pooling
over the spatial axes, pandas to_parquet. Usage:
    python benchmarks/handwritten_extract.py FOLDER MODEL.keras OUT.parquet [SIZE]
"""

import sys
from pathlib import Path

import keras
import numpy as np
import pandas as pd

folder, model_path, out = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
size = int(sys.argv[4]) if len(sys.argv) > 4 else 224
model = keras.saving.load_model(model_path)
paths = sorted(p for p in folder.rglob("*") if p.is_file())
rows = []
for start in range(0, len(paths), 32):
    batch = np.stack([
        keras.utils.img_to_array(keras.utils.load_img(p, target_size=(size, size)))
        for p in paths[start : start + 32]
    ])
    maps = model.predict(batch, verbose=0)
    rows.append(maps.mean(axis=(1, 2)))
features = np.concatenate(rows)
frame = pd.DataFrame(features, columns=[f"f{i}" for i in range(features.shape[1])])
frame.insert(0, "label", [p.parent.name for p in paths])
frame.insert(0, "path", [str(p.relative_to(folder)) for p in paths])
frame.to_parquet(out)
