"""``mdm serve``: a web demo of runs or checkpoints (gradio, imported only here).

mdm serve runs/emoji64 runs/emoji64-class --port 7860
"""

from __future__ import annotations

import argparse

from . import arguments


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``serve`` on the ``mdm`` sub-command parsers."""
    serve = subparsers.add_parser(
        "serve",
        help="a web demo (gradio) of runs or checkpoints",
        description=(
            "Serve a page (and an API endpoint `generate`) that samples the models named here, showing every "
            "level of the pyramid live. Only these models are reachable: nothing on the page names a file. "
            "Needs the `web` extra (gradio). See docs/web.md."
        ),
    )
    serve.add_argument(
        "models", nargs="+", metavar="RUN_OR_CHECKPOINT", help="run directories or checkpoint directories"
    )
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: this machine only; 0.0.0.0 lets anyone who can reach it in)",
    )
    serve.add_argument("--port", type=arguments.port, default=7860)
    serve.add_argument("--device", default="auto")
    serve.set_defaults(func=cmd_serve)
    return serve


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from ..serve.app import build_app
    except ImportError as error:
        raise ValueError(f"mdm serve needs gradio ({error}): pip install -c constraints.txt -e '.[web]'") from None
    from ..serve.catalog import load_models

    models = load_models(args.models, args.device)
    demo = build_app(models)
    print(f"serving {len(models)} model{'s' * (len(models) > 1)}: {', '.join(models)}", flush=True)
    try:
        demo.launch(server_name=args.host, server_port=args.port, show_error=False)
    except OSError as error:  # e.g. the port is taken
        raise ValueError(f"cannot listen on {args.host}:{args.port}: {error}") from None
    return 0
