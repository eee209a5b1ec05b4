"""`python -m finetune_cli` runs the command-line tool."""

from finetune_cli.cli import main

if __name__ == "__main__":
    main()
