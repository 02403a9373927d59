"""Cityscapes (fine annotations) TFDS builder."""
