"""cmix_jax: CalibrateMix semi-supervised image classification in JAX/Flax."""

__version__ = "0.1.0"
