"""Root pytest configuration: skip collecting modules whose optional extra is not installed."""

import importlib.util

collect_ignore = [] if importlib.util.find_spec("lightning") else ["dropblock_inject/lightning.py"]
