"""Data layer: shard writing, the embedded synthetic dataset and the streaming training loader."""
