"""`exl bench`: prefill and decode speed of a model on this machine (exlcore.speed)."""

from exlcore.cli.options import add_cache_bits_arg, add_model_args, load_model


def register(sub):
    p = sub.add_parser("bench", help="prefill and decode tokens/s, and peak GPU memory")
    add_model_args(p)
    p.add_argument("-p", "--prompt-tokens", type=int, default=512, help="prefill length, and the prompt before decode")
    p.add_argument("-n", "--new-tokens", type=int, default=128, help="decode steps per sequence")
    p.add_argument("-b", "--batch", type=int, nargs="+", default=[1], help="batch sizes to decode at")
    add_cache_bits_arg(p)
    p.set_defaults(func=bench)


def bench(args):
    from exlcore.speed import measure

    speed = measure(load_model(args), args.prompt_tokens, args.new_tokens, tuple(args.batch), args.cache_bits)
    print(f"prefill: {speed.prefill_tokens_per_second:,.0f} tokens/s ({args.prompt_tokens} tokens)")
    for batch, rate in speed.decode_steps_per_second.items():
        print(f"decode, batch {batch}: {rate:,.1f} tokens/s per sequence, {batch * rate:,.1f} in all")
    if speed.peak_bytes is not None:
        print(f"peak GPU memory: {speed.peak_bytes / 2**30:.2f} GiB")
