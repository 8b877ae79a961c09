"""Experiment configs shipped with the package: `--config=NAME[:arg]` resolves `NAME.py` here.

Each module defines `get_config(arg)` returning an `ml_collections.ConfigDict` (and may define
`sweep(arg)`). In a checkout, `configs/` at the repository root is a link to this folder, so
`--config=configs/quickstart.py` and `--config=quickstart` name the same file.
"""
