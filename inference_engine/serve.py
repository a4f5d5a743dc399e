"""`python -m inference_engine.serve --model-path P [--port 30000 --host 127.0.0.1 ...EngineConfig flags]`."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import typing

from inference_engine.config import EngineConfig


def build_parser() -> argparse.ArgumentParser:
    """A flag per EngineConfig field (--model-path, --page-size, ...) plus --host / --port / --log-level."""
    parser = argparse.ArgumentParser(description="Kiln inference engine HTTP server")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    hints = typing.get_type_hints(EngineConfig)
    for field in dataclasses.fields(EngineConfig):
        flag = "--" + field.name.replace("_", "-")
        hint = hints[field.name]
        base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
        if base is bool:
            parser.add_argument(flag, action="store_true", default=field.default)
        elif field.default is dataclasses.MISSING:
            parser.add_argument(flag, type=base, required=True)
        else:
            parser.add_argument(flag, type=base, default=field.default)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Parse flags, start the engine and serve it with uvicorn until interrupted."""
    import uvicorn

    from inference_engine.engine import Engine
    from inference_engine.server import create_app

    args = vars(build_parser().parse_args(argv))
    host, port, log_level = args.pop("host"), args.pop("port"), args.pop("log_level")
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = Engine(config=EngineConfig(**args))
    try:
        uvicorn.run(create_app(engine), host=host, port=port, log_level=log_level)
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()
