"""The distillation objective: terms parsed from the config (``terms``), one adapter per loss
kind (``adapters``), and the weighted sum that the train step minimises (``objective``)."""

from kdjax.distill.adapters import ADAPTERS, LossAdapter, TermCall, TermInputs, register
from kdjax.distill.objective import (build_term_modules, discriminator_loss, distillation_loss,
                                     init_term_states, metric_names, named_tensors, task_loss)
from kdjax.distill.terms import ObjectiveError, Term, parse_terms

__all__ = [
    "ADAPTERS", "LossAdapter", "ObjectiveError", "Term", "TermCall", "TermInputs",
    "build_term_modules", "discriminator_loss", "distillation_loss", "init_term_states",
    "metric_names", "named_tensors", "parse_terms", "register", "task_loss",
]
