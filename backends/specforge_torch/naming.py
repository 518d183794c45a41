"""Names shared by the model builder and the script builder (no torch import here)."""

from __future__ import annotations

from specforge.ir.graph import identifier_names

#: Neutral parameter name -> the attribute of the torch module that holds it.
TORCH_PARAM_NAMES = {"kernel": "weight", "bias": "bias", "gamma": "gamma", "beta": "beta",
                     "moving_mean": "moving_mean", "moving_var": "moving_var",
                     "alpha": "weight"}


#: Torch attribute names of the nodes (shared with every backend that needs identifiers).
attribute_names = identifier_names
