"""The Keras transfer-learning guide's recipe, as the baseline for the benchmarks.

Frozen base inside the model, global average pooling, dropout 0.2, dense
softmax, Adam 1e-3, 10 epochs through image_dataset_from_directory; then
accuracy on a held-out folder. Usage:
    python benchmarks/keras_guide_baseline.py TRAIN_DIR TEST_DIR BASE.keras [SIZE] [--class-weight]
Prints "TEST_ACCURACY <float>", then "TEST_MACRO_F1 <float>" and
"TEST_MACRO_F1_PRIOR <float>": the macro-F1 of the same predictions, and of
the predictions after prior correction (each class's probability divided by
its share of the training split, the standard post-hoc remedy for
imbalance). With --class-weight, training weights each class by
n / (k * n_class), Keras' `class_weight` as the imbalanced-data tutorial does.
"""

import sys

import keras
import numpy as np

flags = [a for a in sys.argv[1:] if a.startswith("--")]
args = [a for a in sys.argv[1:] if not a.startswith("--")]
train_dir, test_dir, base_path = args[:3]
size = int(args[3]) if len(args) > 3 else 224
kwargs = dict(image_size=(size, size), batch_size=32, label_mode="int")
train = keras.utils.image_dataset_from_directory(train_dir, validation_split=0.2, subset="training", seed=1, **kwargs)
val = keras.utils.image_dataset_from_directory(train_dir, validation_split=0.2, subset="validation", seed=1, **kwargs)
test = keras.utils.image_dataset_from_directory(test_dir, shuffle=False, **kwargs)
n_classes = len(train.class_names)
counts = np.bincount(np.concatenate([y.numpy() for _, y in train]), minlength=n_classes)
weights = {c: counts.sum() / (n_classes * max(n, 1)) for c, n in enumerate(counts)} if "--class-weight" in flags else None

base = keras.saving.load_model(base_path)
base.trainable = False
inputs = keras.Input((size, size, 3))
x = base(inputs, training=False)
x = keras.layers.GlobalAveragePooling2D()(x)
x = keras.layers.Dropout(0.2)(x)
outputs = keras.layers.Dense(n_classes, activation="softmax")(x)
model = keras.Model(inputs, outputs)
model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
model.fit(train, validation_data=val, epochs=10, verbose=0, class_weight=weights)
print("TEST_ACCURACY", model.evaluate(test, verbose=0)[1])


def macro_f1(truth, guess):
    return float(np.mean([2 * ((truth == c) & (guess == c)).sum() / max((truth == c).sum() + (guess == c).sum(), 1)
                          for c in np.unique(truth)]))


truth = np.concatenate([y.numpy() for _, y in test])
probs = model.predict(test, verbose=0)
print("TEST_MACRO_F1", macro_f1(truth, probs.argmax(1)))
print("TEST_MACRO_F1_PRIOR", macro_f1(truth, (probs / (counts / counts.sum())).argmax(1)))
