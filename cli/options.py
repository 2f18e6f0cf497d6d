"""Arguments shared by several commands."""

import argparse


def add_model_args(p: argparse.ArgumentParser):
    p.add_argument("-m", "--model", required=True, help="model folder")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--dtype", default=None, help="float16, bfloat16 or float32 (default: per model and device)")


def load_model(args, folder=None):
    """The model of -m (or `folder`) on --device with --dtype."""
    import exlcore

    kwargs = {"dtype": args.dtype}
    if args.device:
        kwargs["device"] = args.device
    return exlcore.load(folder or args.model, **kwargs)


def add_cache_bits_arg(p: argparse.ArgumentParser):
    p.add_argument("--cache-bits", type=int, default=16, choices=(16, 8, 4),
                   help="KV cache precision: 16, or 8 or 4 bits (quantized: more tokens in the same memory)")


def add_sampling_args(p: argparse.ArgumentParser, temperature: float):
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--max-seq-len", type=int, default=None, help="cache size in tokens (default: model's, <= 8192)")
    add_cache_bits_arg(p)
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def sampling_kwargs(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                stop=args.stop)
