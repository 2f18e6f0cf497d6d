"""`exl info` (what a model folder holds) and `exl plugins` (who provides each architecture)."""

from exlcore import plugins


def register(sub):
    p = sub.add_parser("info", help="architecture, parameters, format, bits per weight, memory estimate")
    p.add_argument("-m", "--model", required=True, help="model folder")
    p.add_argument("--context", type=int, default=None, help="context length for the memory estimate")
    p.set_defaults(func=info)
    p = sub.add_parser("plugins", help="list architectures and the plugins providing them")
    p.set_defaults(func=list_plugins)


def info(args):
    from exlcore.cache import GROUP
    from exlcore.generator import default_seq_len
    from exlcore.info import inspect

    i = inspect(args.model)
    c = i.config
    context = args.context or default_seq_len(c)
    kv = i.kv_bytes_per_token() * context
    print(f"model         {i.folder}")
    print(f"architecture  {c.architecture} ({c.num_layers} layers, hidden {c.hidden_size}, "
          f"{c.num_heads} heads / {c.num_kv_heads} kv heads, vocab {c.vocab_size}"
          + (f", {c.num_experts} experts top-{c.num_experts_per_tok}" if c.num_experts else "") + ")")
    print(f"parameters    {i.parameters / 1e6:,.1f} M")
    print(f"format        {', '.join(sorted(i.formats))}")
    print("bits/weight   " + "; ".join(f"{role} {g.bits_per_weight:.2f}" for role, g in i.linears.items()
                                       if g.bytes))
    print(f"memory        weights {i.file_bytes / 2**30:.2f} GiB + KV cache {kv / 2**30:.2f} GiB "
          f"at {context} tokens (fp16) = {(i.file_bytes + kv) / 2**30:.2f} GiB")
    if c.head_dim % GROUP == 0:
        print("kv cache      " + ", ".join(f"{bits}-bit {i.kv_bytes_per_token(bits) * context / 2**30:.2f} GiB"
                                          for bits in (8, 4)) + " with --cache-bits")


def list_plugins(args):
    rows = sorted((arch, plugin) for arch, (_, plugin) in plugins.architectures().items())
    width = max((len(a) for a, _ in rows), default=0)
    for arch, plugin in rows:
        print(f"{arch:<{width}}  {plugin} ({plugins.plugin_source(plugin)})")
