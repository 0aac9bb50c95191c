"""Interoperability with other implementations' checkpoints and configs."""
