"""The injection pipeline, in the order it runs: trace -> analyse -> plan -> rewrite.

``layers`` holds the layer-type knowledge (which modules are convolutions, norms, activations
and identity slots) that every stage shares; no stage knows a model family by name.
"""
