"""Recipe files (TOML), shipped inside the package as finetune_cli.recipes."""
