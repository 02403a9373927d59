"""The ``kdjax`` command: ``main`` parses the arguments and dispatches to one module per command
(``train``, ``evaluate``, ``compare``, ``convert``, ``loss_demo``; ``data show`` lives with the
data). Commands use the library rooms and never import each other."""
