"""Training objectives, one module each, found by name in :data:`METHODS`.

Each module is imported here explicitly, which registers its method (no star
imports): ``ce``, ``kd``, ``hallucination``, ``messy``, ``cotrain``,
``modalimmune`` and ``basis-realloc``. Beside them, no method of their own:
``base`` (the interface and the registry), ``teacher_probes`` (what the teacher
objectives and the teacher evaluation share) and ``tuned_kd`` (the KD α × T grid).
"""

from synesthesia.config import MethodConfig
from synesthesia.methods import basis_realloc, ce, cotrain, hallucination, kd, messy, modalimmune
from synesthesia.methods.base import METHODS, Method, MethodContext


def build_method(cfg: MethodConfig, ctx: MethodContext) -> Method:
    """The method named ``cfg.name``, built for the student/teacher described by ``ctx``."""
    return METHODS.get(cfg.name)(cfg, ctx)


__all__ = [
    "METHODS",
    "Method",
    "MethodContext",
    "basis_realloc",
    "build_method",
    "ce",
    "cotrain",
    "hallucination",
    "kd",
    "messy",
    "modalimmune",
]
