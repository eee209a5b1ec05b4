"""`finetune tune`: the search space (`space`), the trials file (`files`), and the linear-head and
fine-tuning searches (`linear`, `finetune`)."""
