"""Sparse training: gradual pruning, dynamic sparse training (RigL, SET), straight-through N:M.

* ``GradualPruner``: cubic (Zhu and Gupta) density schedule, re-compressing block-sparse layers.
* ``RigL`` / ``SET``: drop the weakest kept blocks (or N:M positions) and regrow as many, by dense
  gradient (RigL) or at random (SET); the number of kept weights never changes.
* ``SRSTELinear``: dense weights, N:M mask recomputed every step, straight-through gradient with
  SR-STE decay of the pruned weights; ``sparsify_ste_`` / ``finalize_ste_`` swap layers in and out.
* ``remap_optimizer_state``: moves optimizer state along with a pattern change.

See docs/training.md for the design and the guarantees.
"""

from .dynamic import RigL, SET
from .gradual import GradualPruner
from .optim import remap_optimizer_state
from .schedules import cosine_decay, cubic_density
from .ste import SRSTELinear, finalize_ste_, sparsify_ste_

__all__ = [
    "GradualPruner",
    "RigL",
    "SET",
    "SRSTELinear",
    "cosine_decay",
    "cubic_density",
    "finalize_ste_",
    "remap_optimizer_state",
    "sparsify_ste_",
]
