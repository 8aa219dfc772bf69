"""saesteer: steer generative models through sparse autoencoders, served over HTTP."""

__version__ = "0.1.0"
