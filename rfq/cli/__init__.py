"""The command line (``python -m rfq``, the ``rfq`` script), the demo and the pipeline they share.

    main.py      argument parsing and the subcommands
    pipeline.py  after training: load a run, evaluate configs, search budgets, table, plot
    demo.py      README command 1
    showcase.py  the ops in a small model of your own (``rfq showcase``)
"""

from rfq.cli.main import main

__all__ = ["main"]
