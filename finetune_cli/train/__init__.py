"""The training machinery every task shares: the engine and its callbacks, the linear head, the prefix
cache, fine-tuning setup, and the session steps (`session`)."""
