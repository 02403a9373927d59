"""Convolution, batch normalisation and the losses' reductions: the operations whose fastest form
depends on the platform."""
