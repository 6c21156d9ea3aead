"""`teleflm serve --model PATH`: an OpenAI-compatible HTTP server (completions, chat, embeddings), on
teleflm's own engine, or on vLLM with `--engine vllm` (options after `--` go to vLLM)."""

import socket
import subprocess
from pathlib import Path

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    p.add_argument("--model", required=True, metavar="PATH", help="export, official layout or checkpoint")
    p.add_argument("--host", default="127.0.0.1", help="default: loopback only")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", metavar="KEY", help="require `Authorization: Bearer KEY` on /v1 routes")
    p.add_argument(
        "--served-model-name", metavar="NAME", help="the model id clients send (default: folder name)"
    )
    p.add_argument("--max-batch", type=int, default=16, metavar="N", help="requests decoded together")
    p.add_argument("--pooling", choices=["mean", "last"], default="mean", help="for /v1/embeddings")
    p.add_argument("--dtype", choices=["bf16", "fp32"], help="default: bf16 on GPUs, fp32 on CPUs")
    p.add_argument("--engine", choices=["teleflm", "vllm"], default="teleflm", help="who decodes")
    p.add_argument("--vllm-python", metavar="PATH", help="with --engine vllm: an interpreter that has vllm")
    p.add_argument("vllm_args", nargs="*", metavar="-- VLLM_ARG", help="with --engine vllm: passed to vLLM")
    p.set_defaults(func=run)


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (as uvicorn binds one), before the model loads: a port in use is
    reported at once, not after the minutes a large model takes to load."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def run(args) -> int:
    import uvicorn

    from teleflm.serve.api import create_app
    from teleflm.serve.engine import Engine
    from teleflm.train.checkpoint import load_any_model

    if args.max_batch < 1:
        raise ValueError(f"--max-batch must be at least 1, got {args.max_batch}")
    if args.engine == "vllm":
        return run_vllm(args)
    if args.vllm_args or args.vllm_python:
        raise ValueError("--vllm-python and arguments after -- are for --engine vllm")
    sock = bind(args.host, args.port)
    model, tokenizer, _ = load_any_model(args.model, dtype=args.dtype)
    if tokenizer is None:
        raise FileNotFoundError(f"{args.model}: no tokenizer in the model folder")
    if args.host not in LOOPBACK and not args.api_key:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach it may use it")
    name = args.served_model_name or Path(args.model).resolve().name
    engine = Engine(model, tokenizer, max_batch=args.max_batch, pooling=args.pooling, normalize=True)
    config = uvicorn.Config(create_app(engine, name, args.api_key), log_level="info")
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def run_vllm(args) -> int:
    from teleflm.serve.vllm import vllm_command, vllm_python

    if not Path(args.model, "config.json").is_file():
        raise FileNotFoundError(f"{args.model}: --engine vllm serves an export (a folder with config.json)")
    bind(args.host, args.port).close()  # a port in use is reported now, not after vLLM's start
    if args.host not in LOOPBACK and not args.api_key:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach it may use it")
    name = args.served_model_name or Path(args.model).resolve().name
    command = vllm_command(
        vllm_python(args.vllm_python),
        args.model,
        name,
        args.host,
        args.port,
        args.api_key,
        args.max_batch,
        args.dtype,
        args.vllm_args,
    )
    return subprocess.call(command)
