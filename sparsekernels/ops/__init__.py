"""The ``sparsekernels`` operator library.

Front ends (``bsr_linear``, ``nm_linear``) take plain tensors, check them, and route to the backend
chosen for the input's device (sparsekernels.backend). The raw ops are ``torch.ops.sparsekernels.*``:

=============================  ==============================================================
``bsr_linear``                 block-sparse ``input @ W.T (+ bias)``
``bsr_linear_grad_input``      ``grad_output @ W`` through the transposed (CSC) index
``bsr_linear_grad_values``     gradient of the kept blocks only (sampled dense-dense product)
``nm_linear``                  N:M ``input @ W.T (+ bias)``
``nm_linear_grad_input``       ``grad_output @ W``
``nm_linear_grad_values``      gradient of the kept values only
``linear_bias_grad``           ``grad_output`` summed over leading dims, float32 accumulation
``nm_linear_transposable``     ``nm_linear`` for a transposable mask; its input gradient is the N:M
                               forward on ``W.T`` (ops/nm_transposable.py)
=============================  ==============================================================

Each has a fake kernel, the forward ops have autograd, and all are checked by
``torch.library.opcheck`` in the tests. ``OP_NAMES`` lists the ops declared in C++
(csrc/bindings/library.cpp), which every kernel backend implements (the Triton namespace mirrors
them); ``COMPOSITE_OP_NAMES`` the ops declared in Python that only compose those.
"""

from . import bias as _bias  # noqa: F401  (registers the fake kernel of linear_bias_grad)
from .bsr import bsr_linear
from .nm import nm_linear
from .nm_transposable import nm_linear_transposable

OP_NAMES = (
    "bsr_linear",
    "bsr_linear_grad_input",
    "bsr_linear_grad_values",
    "nm_linear",
    "nm_linear_grad_input",
    "nm_linear_grad_values",
    "linear_bias_grad",
)

# Declared in Python (torch.library.custom_op) on top of the ops above; no backend implements them.
COMPOSITE_OP_NAMES = ("nm_linear_transposable",)

__all__ = ["COMPOSITE_OP_NAMES", "OP_NAMES", "bsr_linear", "nm_linear", "nm_linear_transposable"]
