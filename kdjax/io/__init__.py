"""What runs read and write: train checkpoints (``checkpoints``), model directories
(``model_dir``) and the networks built from them for a config (``networks``). Every path goes
through ``etils.epath``, so a location may be local or ``gs://``."""
