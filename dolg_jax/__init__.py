"""DOLG in JAX/Flax: deep orthogonal fusion of local and global features for image retrieval."""
