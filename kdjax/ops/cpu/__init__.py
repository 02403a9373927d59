"""CPU forms of the convolution and batch normalisation: the same maths as XLA's, arranged for
XLA's CPU backend."""
