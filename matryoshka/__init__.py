"""Matryoshka Diffusion Models: one diffusion process over a multi-resolution pyramid."""

__version__ = "0.1.0"
