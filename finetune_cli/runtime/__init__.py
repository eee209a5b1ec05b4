"""Where TensorFlow runs: its quiet import and the CPU split (`keras`), devices (`devices`), threads."""
