"""CamVid (SegNet version) TFDS builder."""
