"""A Flax LLaMA written per tensor-parallel rank, its HF loader and its decode loops."""
