"""``mdm serve``: a gradio demo over :mod:`matryoshka.pipeline` (see docs/web.md).

The top floor of the package: nothing below imports it, and gradio is only imported by
:mod:`matryoshka.serve.app`, so ``import matryoshka`` stays light.
"""
