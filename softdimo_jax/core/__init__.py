"""The method, pure JAX: masking, adapters, Di[M]O, optimisers, GAN, rewards, objectives, defaults."""
