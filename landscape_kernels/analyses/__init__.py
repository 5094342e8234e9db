"""Reproductions of the published analyses, built on the kernels (one module per paper section)."""
