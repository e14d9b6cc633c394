"""``python -m alfk_cli`` and ``torchrun -m alfk_cli``: the ``alfk`` command."""

from alfk_cli.cli.main import main

if __name__ == "__main__":
    main()
