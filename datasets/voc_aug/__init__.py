"""Pascal VOC 2012 segmentation with the SBD augmented training set, TFDS builder."""
