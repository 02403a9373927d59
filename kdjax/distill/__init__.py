"""The distillation objective: terms (and the student modules they share) parsed from the config
(``terms``), one adapter per loss kind (``adapters``), and the weighted sum that the train step
minimises (``objective``)."""

from kdjax._extras import require

# Before the imports below: without the extra, one line says what to install.
require("train", by=__name__)

from kdjax.distill.adapters import (  # noqa: E402
    ADAPTERS, LossAdapter, TermCall, TermInputs, register)
from kdjax.distill.objective import (  # noqa: E402
    apply_student_modules, build_student_modules, build_term_modules, discriminator_loss,
    distillation_loss, init_term_states, metric_names, named_tensors, task_loss)
from kdjax.distill.terms import (  # noqa: E402
    STUDENT_MODULE_KINDS, STUDENT_MODULES, ObjectiveError, StudentModule, Term,
    parse_student_modules, parse_terms)

__all__ = [
    "ADAPTERS", "STUDENT_MODULES", "STUDENT_MODULE_KINDS", "LossAdapter", "ObjectiveError",
    "StudentModule", "Term", "TermCall", "TermInputs", "apply_student_modules",
    "build_student_modules", "build_term_modules", "discriminator_loss", "distillation_loss",
    "init_term_states", "metric_names", "named_tensors", "parse_student_modules", "parse_terms",
    "register", "task_loss",
]
