"""`exl eval ppl`: perplexity (and KL divergence against a reference model) on text or a parquet file."""

from pathlib import Path

from exlcore.cli.options import add_cache_bits_arg, add_model_args, load_model
from exlcore.errors import ExlError


def register(sub):
    ev = sub.add_parser("eval", help="evaluate a model").add_subparsers(dest="metric", required=True, metavar="METRIC")
    p = ev.add_parser("ppl", help="perplexity over non-overlapping windows (default: the built-in evaluation text)")
    add_model_args(p)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--text", type=Path, help="a UTF-8 text file")
    source.add_argument("--parquet", type=Path, help="a parquet file with a text column")
    p.add_argument("-l", "--length", type=int, default=2048, help="tokens per window")
    p.add_argument("--rows", type=int, default=16, help="windows to score")
    p.add_argument("--ref", default=None, help="reference model folder: also report KL(reference || model)")
    p.add_argument("--batch", type=int, default=1, help="windows per forward pass")
    add_cache_bits_arg(p)
    p.set_defaults(func=ppl)


def read_text(args) -> str:
    from exlcore.calibration import read_parquet_text
    from exlcore.evaluate import EVALUATION_TEXT

    if args.parquet is not None:
        return read_parquet_text(args.parquet)
    path = args.text or EVALUATION_TEXT
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ExlError(f"{path}: cannot be read as UTF-8 text ({e})") from None


def ppl(args):
    from exlcore.evaluate import evaluate, windows

    if args.length < 2 or args.rows < 1 or args.batch < 1:
        raise ExlError("-l must be at least 2, --rows and --batch at least 1")
    model = load_model(args)
    rows = windows(model.tokenizer.encode(read_text(args), add_bos=False), args.length, args.rows)
    reference = load_model(args, args.ref) if args.ref is not None else None
    result = evaluate(model, rows, reference, args.batch, args.cache_bits)
    line = f"perplexity {result.perplexity:.4f} over {result.tokens} tokens ({rows.shape[0]} x {args.length})"
    if result.kl_divergence is not None:
        line += f", KL divergence from {args.ref} {result.kl_divergence:.4f}"
    print(line)
