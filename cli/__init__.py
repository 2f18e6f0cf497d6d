"""The `exl` command: parse arguments, call the library, print. User errors are one line and exit 1."""

import argparse
import sys

from exlcore.errors import ExlError


def parser() -> argparse.ArgumentParser:
    from exlcore import plugins
    from exlcore.cli import bench, convert, evaluate, generate, inspect

    p = argparse.ArgumentParser(prog="exl", description="Run LLMs (Hugging Face, EXL2, GPTQ folders) with exlcore.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (generate, inspect, evaluate, bench, convert):
        module.register(sub)
    plugins.manager().hook.register_commands(subparsers=sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except ExlError as e:
        print(f"exl: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except MemoryError:
        print("exl: error: out of memory; use a smaller model or shorter sequences", file=sys.stderr)
        return 1
    except OSError as e:  # a file the command writes (disk full, permissions) after its checks passed
        print(f"exl: error: {f'{e.filename}: ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        if "out of memory" not in str(e) and "can't allocate memory" not in str(e):
            raise
        print(f"exl: error: out of memory ({str(e).splitlines()[0]}); use a smaller model or shorter sequences",
              file=sys.stderr)
        return 1
