"""Continual-learning recipes built on lightning-fisher's public API (run from a checkout).

``python -m recipes.demo`` (Split Digits, the demo), ``python -m recipes.run`` (one run from a
config in ``recipes/configs``) and ``python -m recipes.reproduce`` (van de Ven's EWC grid).
"""
