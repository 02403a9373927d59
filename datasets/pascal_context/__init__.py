"""Pascal Context (59 and 60 classes) TFDS builder."""
