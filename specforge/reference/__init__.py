"""specforge's numpy reference: each IR op in float64, straight from its formula.

When two backends disagree, the reference says which one is wrong. It follows
:mod:`specforge.ir.ops` (the definitions) and nothing else; it is written for clarity, not
speed.
"""

from specforge.reference.forward import reference_forward

__all__ = ["reference_forward"]
