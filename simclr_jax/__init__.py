"""simclr_jax: SimCLR contrastive pretraining in JAX/Flax on CPU, GPU and TPU."""

__version__ = "0.1.0"
