"""Convolution and batch normalisation, the two operations whose fastest form depends on the
platform."""
