"""The shipped recipe files (``*.yaml``), installed as the package ``dropblock_inject.recipes``.

See ``README.md`` in this folder for the schema; load them with ``dropblock_inject.load_recipe``.
"""
