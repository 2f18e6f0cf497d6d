"""`exl generate` (one prompt, streamed; several, as one batch) and `exl chat` (multi-turn, the model's chat
template, streamed)."""

import sys

from exlcore.cli.options import add_model_args, add_sampling_args, load_model, sampling_kwargs
from exlcore.errors import ExlError


def register(sub):
    p = sub.add_parser("generate", help="continue a prompt")
    add_model_args(p)
    p.add_argument("-p", "--prompt", required=True, action="append",
                   help="the prompt; repeat it to generate several prompts as one batch")
    add_sampling_args(p, temperature=0.0)
    p.set_defaults(func=generate)

    p = sub.add_parser("chat", help="chat with a model in the terminal")
    add_model_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--mode", default=None, help="force a registered prompt format (e.g. chatml, llama3, gemma)")
    add_sampling_args(p, temperature=0.7)
    p.set_defaults(func=chat)


def _stream(gen, prompt, args, add_bos=None) -> str:
    pieces = []
    for piece in gen.stream(prompt, add_bos=add_bos, **sampling_kwargs(args)):
        sys.stdout.write(piece)
        sys.stdout.flush()
        pieces.append(piece)
    print()
    s = gen.stats
    print(f"[{s.prompt_tokens} prompt tokens ({s.cached_tokens} cached) in {s.prefill_seconds:.2f} s, {s.new_tokens} new, "
          f"{s.decode_tokens_per_second:.1f} tokens/s]", file=sys.stderr)
    return "".join(pieces)


def generate(args):
    import exlcore

    gen = exlcore.Generator(load_model(args), args.max_seq_len, args.cache_bits)
    if len(args.prompt) == 1:
        _stream(gen, args.prompt[0], args)
        return
    for i, (text, s) in enumerate(zip(gen.generate(args.prompt, **sampling_kwargs(args)), gen.stats)):
        print(f"--- prompt {i + 1}: {s.prompt_tokens} tokens, {s.new_tokens} new ({s.stop_reason})")
        print(text)
    s = gen.stats[0]
    new = sum(st.new_tokens for st in gen.stats)
    print(f"[{len(args.prompt)} prompts in {s.prefill_seconds:.2f} s of prefill, {new} new tokens in "
          f"{s.decode_seconds:.2f} s: {new / max(s.decode_seconds, 1e-9):.1f} tokens/s]", file=sys.stderr)


def chat(args):
    import exlcore
    from exlcore import plugins

    template = None
    if args.mode is not None:
        templates = plugins.chat_templates()
        if args.mode not in templates:
            raise ExlError(f"--mode {args.mode!r} is unknown; registered modes: {', '.join(sorted(templates))}")
        template = templates[args.mode]
    model = load_model(args)
    tok = model.tokenizer
    if template is None and tok.chat_template is None:
        raise ExlError(f"{args.model}: the model has no chat template; pick one with --mode")
    gen = exlcore.Generator(model, args.max_seq_len, args.cache_bits)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print("Chat with the model; an empty line or Ctrl-D ends.", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        prompt = fit(messages, tok, template, gen.max_seq_len - args.max_new_tokens)
        messages.append({"role": "assistant", "content": _stream(gen, prompt, args, add_bos=False).strip()})


def fit(messages: list[dict], tok, template: str | None, budget: int) -> str:
    """The prompt for `messages`, dropping the oldest exchanges (never the system message or the new turn)
    until it fits in `budget` tokens."""
    first = 1 if messages[0]["role"] == "system" else 0
    while True:
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, template=template)
        if len(tok.encode(prompt, add_bos=False)) <= budget:
            return prompt
        if len(messages) - first <= 1:
            raise ExlError(f"the message does not fit in the context ({budget} tokens left after --max-new-tokens); "
                           "shorten it or raise --max-seq-len")
        del messages[first:first + 2]  # the oldest user turn and its answer
