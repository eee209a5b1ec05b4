"""The Keras transfer-learning guide's recipe, as the baseline for benchmarks/train.py.

Frozen base inside the model, global average pooling, dropout 0.2, dense
softmax, Adam 1e-3, 10 epochs through image_dataset_from_directory; then
accuracy on a held-out folder. Usage:
    python benchmarks/keras_guide_baseline.py TRAIN_DIR TEST_DIR BASE.keras [SIZE]
Prints "TEST_ACCURACY <float>".
"""

import sys

import keras

train_dir, test_dir, base_path = sys.argv[1:4]
size = int(sys.argv[4]) if len(sys.argv) > 4 else 224
kwargs = dict(image_size=(size, size), batch_size=32, label_mode="int")
train = keras.utils.image_dataset_from_directory(train_dir, validation_split=0.2, subset="training", seed=1, **kwargs)
val = keras.utils.image_dataset_from_directory(train_dir, validation_split=0.2, subset="validation", seed=1, **kwargs)
test = keras.utils.image_dataset_from_directory(test_dir, shuffle=False, **kwargs)
n_classes = len(train.class_names)

base = keras.saving.load_model(base_path)
base.trainable = False
inputs = keras.Input((size, size, 3))
x = base(inputs, training=False)
x = keras.layers.GlobalAveragePooling2D()(x)
x = keras.layers.Dropout(0.2)(x)
outputs = keras.layers.Dense(n_classes, activation="softmax")(x)
model = keras.Model(inputs, outputs)
model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
model.fit(train, validation_data=val, epochs=10, verbose=0)
print("TEST_ACCURACY", model.evaluate(test, verbose=0)[1])
