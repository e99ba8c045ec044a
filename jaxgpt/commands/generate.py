"""Generate text from a GPT: `python scripts/generate.py --help`.

Examples:
  python scripts/generate.py --model tiny --prompt "Every effort moves you" --max-new-tokens 20
  python scripts/generate.py --weights runs/default --prompt "Hello" --prompt "The" \\
      --temperature 1.4 --top-k 25 --seed 123 --json
  python scripts/generate.py --weights gpt2_model.pth --prompt "Once" --num-beams 4 --eos endoftext
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, NoReturn

import jax

from jaxgpt.cli import Parser
from jaxgpt.config import PRESETS, GPTConfig, get_preset
from jaxgpt.model import GPT, Params, init_cache, init_params
from jaxgpt.sampling import check_generate_args, generate, select_tokens
from jaxgpt.tokenizer import ENDOFTEXT_ID, decode, encode


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--weights",
        help="anything jaxgpt's load reads: a training run folder, a .npz params file, the "
        "book's .pth, an OpenAI or Hugging Face GPT-2 folder",
    )
    src.add_argument("--model", help=f"random weights of a preset, one of {sorted(PRESETS)}")
    p.add_argument(
        "--prompt",
        action="append",
        help="prompt text; repeat for a batch (default: 'Every effort moves you')",
    )
    p.add_argument("--max-new-tokens", type=int, default=50, help="tokens to add (default: 50)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: 0)")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--num-beams", type=int, default=1, help="beam search width (default: 1)")
    p.add_argument(
        "--length-penalty", type=float, default=1.0, help="beam score exponent (default: 1.0)"
    )
    p.add_argument("--eos", help="end-of-text token id, or 'endoftext' for <|endoftext|>")
    p.add_argument("--seed", type=int, default=123, help="seed of random weights and sampling")
    p.add_argument("--stream", action="store_true", help="print tokens as they come (1 prompt)")
    p.add_argument("--json", action="store_true", help="print ids and text of each prompt as JSON")
    return p


def load_model(args: argparse.Namespace) -> tuple[GPTConfig, Params]:
    """(config, params) from --weights (jaxgpt's loaders, imported lazily) or a --model preset."""
    if args.weights:
        try:
            from jaxgpt.interop import load
        except ImportError:  # interop not installed in this checkout: jaxgpt's own files only
            from jaxgpt.checkpoint import load
        return load(args.weights)
    config = get_preset(args.model or "small")
    return config, init_params(config, jax.random.key(args.seed))


def parse_eos(value: str | None) -> int | None:
    if value is None:
        return None
    if value in ("endoftext", "<|endoftext|>"):
        return ENDOFTEXT_ID
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"--eos={value!r} is neither a token id nor 'endoftext'") from None


def stream(
    params: Params, config: GPTConfig, ids: list[int], args: argparse.Namespace, eos: int | None
) -> list[int]:
    """Greedy or sampled decoding of one prompt, printing each token as it comes.

    A host loop over jitted single steps on the KV cache: one dispatch per token is the price
    of printing it at once. Within the context only; longer runs use the batched `generate`.
    """
    model = GPT(config)
    cache = init_cache(config, 1)
    step = jax.jit(lambda p, c, t, q: model.apply({"params": p}, t, c, q, method=GPT.decode))
    logits, cache = step(params, cache, jax.numpy.asarray([ids]), jax.numpy.arange(len(ids))[None])
    key = jax.random.key(args.seed)
    out = list(ids)
    for i in range(args.max_new_tokens):
        tok = int(
            select_tokens(
                logits[:, -1],
                temperature=args.temperature,
                top_k=args.top_k,
                top_p=args.top_p,
                key=jax.random.fold_in(key, i),
            )[0]
        )
        out.append(tok)
        print(decode([tok]), end="", flush=True)
        if tok == eos or len(out) >= config.context_length:
            break
        pos = jax.numpy.asarray([[len(out) - 1]])
        logits, cache = step(params, cache, jax.numpy.asarray([[tok]]), pos)
    print()
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    prompts = args.prompt or ["Every effort moves you"]
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens={args.max_new_tokens} must be >= 1")
    eos = parse_eos(args.eos)
    if args.stream and (len(prompts) != 1 or args.num_beams != 1 or args.json):
        raise ValueError("--stream takes one --prompt, no --num-beams and no --json")
    if args.model is not None:
        get_preset(args.model)  # fail on a bad name before anything slow
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"--prompt number {i + 1} is empty; pass some text to continue")
    ids = [encode(p) for p in prompts]
    key = jax.random.key(args.seed) if args.temperature > 0 else None
    # Check the sampling flags before loading weights, with a stand-in vocabulary.
    vocab = get_preset(args.model).vocab_size if args.model else 50257
    check_generate_args(
        GPTConfig(vocab_size=vocab),
        ids,
        args.max_new_tokens,
        args.temperature,
        args.top_k,
        args.top_p,
        eos,
        args.num_beams,
        key,
        args.length_penalty,
    )
    config, params = load_model(args)
    for i, p in enumerate(ids):
        if len(p) > config.context_length:  # generate crops as the book does; say so
            sys.stderr.write(
                f"generate.py: warning: prompt {i + 1} has {len(p)} tokens, more than the "
                f"context of {config.context_length}; the model sees its last "
                f"{config.context_length} (as the book crops)\n"
            )
    if args.stream and len(ids[0]) + args.max_new_tokens <= config.context_length:
        print(prompts[0], end="", flush=True)
        outs = [stream(params, config, ids[0], args, eos)]
        return {"results": [{"prompt": prompts[0], "ids": outs[0]}]}
    outs = generate(
        params,
        config,
        ids,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        eos_id=eos,
        num_beams=args.num_beams,
        length_penalty=args.length_penalty,
        key=key,
    )
    results = [
        {"prompt": p, "ids": o, "new_ids": o[len(i) :], "text": decode(o)}
        for p, i, o in zip(prompts, ids, outs, strict=True)
    ]
    if args.json:
        print(json.dumps({"results": results}))
    else:
        for r in results:
            print(r["text"])
    return {"results": results}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as e:
        sys.stderr.write(f"generate.py: error: {e}\n")
        return 2
    return 0


def cli(argv: list[str] | None = None) -> NoReturn:
    """`python scripts/generate.py`, `jaxgpt generate`: run `main` and exit with its status."""
    sys.exit(main(argv))
