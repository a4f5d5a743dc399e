"""`python -m inference_engine.serve --model-path P [--port 30000 --api-key K ...EngineConfig / ServerConfig flags]`.

Binds 127.0.0.1 unless --host says otherwise. The admin routes (weight updates, update groups, pause /
continue, release / resume, flush, abort-all) are off unless --enable-admin-routes or an api key is set;
the key (--api-key, else the environment's KILN_API_KEY) is then required as `Authorization: Bearer <key>`
on every route but /health. See docs/security.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import logging
import os
import re
import sys
import typing
from pathlib import Path

from inference_engine.config import EngineConfig, ServerConfig
from kiln_common.dataclass_docs import field_docs
from kiln_common.logs import setup_logging

API_KEY_ENV = "KILN_API_KEY"
PROG = "python -m inference_engine.serve"
USAGE = "%(prog)s --model-path MODEL_FOLDER [--host HOST] [--port PORT] [--api-key KEY] [FLAG ...] (--help: every flag)"
log = logging.getLogger(__name__)


def _add_flags(parser: argparse.ArgumentParser, cls: type, group_title: str) -> None:
    """A flag per field of the dataclass (--model-path, --page-size, --api-key, ...), its help the field's comment."""
    group = parser.add_argument_group(group_title)
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls, wrapped_comments=True)
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        hint = hints[field.name]
        base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
        text = field.metadata.get("help", docs.get(field.name, "")).replace("%", "%%")
        if base is bool:
            group.add_argument(flag, action="store_true", default=field.default, help=text)
        elif field.default is dataclasses.MISSING:
            group.add_argument(flag, type=base, required=True, help=f"{text} (required)")
        else:
            group.add_argument(flag, type=base, default=field.default, help=f"{text} (default: {field.default})")


def build_parser() -> argparse.ArgumentParser:
    """A flag per EngineConfig field and per ServerConfig field (--host, --port, --api-key, ...), plus --log-level."""
    parser = argparse.ArgumentParser(prog=PROG, usage=USAGE, description="Kiln inference engine HTTP server")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="the server's and uvicorn's log level (default: info)")
    parser.add_argument("--debug", action="store_true",
                        help="show a bad flag value or a missing model folder as its traceback, not one line")
    _add_flags(parser, ServerConfig, "server (ServerConfig)")
    _add_flags(parser, EngineConfig, "engine (EngineConfig)")
    return parser


def parse_configs(argv: list[str] | None = None) -> tuple[EngineConfig, ServerConfig, str]:
    """(EngineConfig, ServerConfig, log level) from flags; the api key falls back to $KILN_API_KEY."""
    args = vars(build_parser().parse_args(argv))
    log_level = args.pop("log_level")
    args.pop("debug")
    server_fields = {f.name for f in dataclasses.fields(ServerConfig)}
    server = {k: args.pop(k) for k in list(args) if k in server_fields}
    if server["api_key"] is None:
        server["api_key"] = os.environ.get(API_KEY_ENV) or None
    return EngineConfig(**args), ServerConfig(**server), log_level


def main(argv: list[str] | None = None) -> None:
    """Parse flags, start the engine and serve it with uvicorn until interrupted."""
    import uvicorn

    from inference_engine.engine import Engine
    from inference_engine.server import create_app

    engine_config, server_config, log_level = _configs_or_exit(sys.argv[1:] if argv is None else list(argv))
    setup_logging(log_level, "%(asctime)s %(levelname)s %(name)s: %(message)s")
    if server_config.api_key is None and not _is_loopback(server_config.host):
        log.warning("serving on %s without an api key: anyone who reaches it can generate%s", server_config.host,
                    " and change the weights (--enable-admin-routes)" if server_config.enable_admin_routes else "")
    engine = Engine(config=engine_config)
    try:
        uvicorn.run(create_app(engine, server_config), host=server_config.host, port=server_config.port,
                    log_level=log_level)
    finally:
        engine.shutdown()


def _configs_or_exit(argv: list[str]) -> tuple[EngineConfig, ServerConfig, str]:
    """parse_configs, with a missing model folder or a bad value as one line on stderr and exit code 2 (the
    traceback with --debug)."""
    model_path = argv[argv.index("--model-path") + 1] if "--model-path" in argv[:-1] else None
    try:
        if model_path is not None and not Path(model_path).exists():
            raise ValueError(f"--model-path {model_path!r} does not exist; expected a local HF model folder "
                             f"(config.json, weights, tokenizer)")
        return parse_configs(argv)
    except (TypeError, ValueError) as e:
        if "--debug" in argv:
            raise
        fields = [f.name for cls in (EngineConfig, ServerConfig) for f in dataclasses.fields(cls) if "_" in f.name]
        message = " ".join(str(e).split())
        for name in sorted(fields, key=len, reverse=True):   # the flag a user typed, not the field behind it
            message = re.sub(rf"(?<![\w-]){name}\b", "--" + name.replace("_", "-"), message)
        print(f"{PROG}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


if __name__ == "__main__":
    main()
