"""Experiment configuration: every field with its default (``defaults``, ``data_defaults``),
loading ``get_config()`` files with their arguments and ``--config.key=value`` overrides
(``loading``), and the benchmark recipes and method terms that config files combine
(``recipes``)."""

from kdjax._extras import require

# Before the imports below: without the extra, one line says what to install.
require("train", by=__name__)

from kdjax.config.loading import ConfigError, load_config  # noqa: E402

__all__ = ["ConfigError", "load_config"]
