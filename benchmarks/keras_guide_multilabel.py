"""The Keras transfer-learning guide's recipe with a sigmoid head: the multi-label baseline.

Frozen base inside the model, global average pooling, dropout 0.2, one sigmoid per label, binary
cross-entropy, Adam 1e-3, 10 epochs with 20 % of the training table held out for validation (as the
guide's `validation_split=0.2`), each label called at probability 0.5. Usage:
    python benchmarks/keras_guide_multilabel.py TRAIN.csv TEST.csv BASE.keras [SIZE]
The tables have `path` (relative to the table) and `label` (labels joined by ";") columns. Prints
"TEST_MAP <float>" (mean average precision) and "TEST_MACRO_F1 <float>" on the test table.
"""

import sys
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from sklearn.metrics import average_precision_score, f1_score

train_csv, test_csv, base_path = (Path(a) for a in sys.argv[1:4])
size = int(sys.argv[4]) if len(sys.argv) > 4 else 224
train_rows, test_rows = pd.read_csv(train_csv), pd.read_csv(test_csv)
labels = sorted({name for cell in train_rows["label"] for name in cell.split(";")})


def dataset(rows: pd.DataFrame, folder: Path, shuffle: bool):
    paths = [str(folder / p) for p in rows["path"]]
    truth = np.array([[name in cell.split(";") for name in labels] for cell in rows["label"]], np.float32)

    def load(path, y):
        image = tf.image.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        return tf.image.resize(image, (size, size)), y

    data = tf.data.Dataset.from_tensor_slices((paths, truth))
    if shuffle:
        data = data.shuffle(len(paths), seed=1)
    return data.map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(32).prefetch(2), truth


order = np.random.default_rng(1).permutation(len(train_rows))
cut = int(0.8 * len(order))
train, _ = dataset(train_rows.iloc[order[:cut]], train_csv.parent, True)
val, _ = dataset(train_rows.iloc[order[cut:]], train_csv.parent, False)
test, truth = dataset(test_rows, test_csv.parent, False)

base = keras.saving.load_model(base_path)
base.trainable = False
inputs = keras.Input((size, size, 3))
x = base(inputs, training=False)
x = keras.layers.GlobalAveragePooling2D()(x)
x = keras.layers.Dropout(0.2)(x)
outputs = keras.layers.Dense(len(labels), activation="sigmoid")(x)
model = keras.Model(inputs, outputs)
model.compile(keras.optimizers.Adam(1e-3), "binary_crossentropy")
model.fit(train, validation_data=val, epochs=10, verbose=0)
probs = model.predict(test, verbose=0)
present = truth.any(0)
print("TEST_MAP", float(np.mean([average_precision_score(truth[:, j], probs[:, j]) for j in np.flatnonzero(present)])))
print("TEST_MACRO_F1", float(f1_score(truth[:, present], probs[:, present] >= 0.5, average="macro", zero_division=0)))
