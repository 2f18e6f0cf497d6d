"""exlcore.convert: a Hugging Face model folder of any registered architecture -> an EXL2 model at a target
average bits per weight, with bit widths mixed within and across linears where they matter most.

Stages, each recorded in WORK/job/job.json so that a rerun resumes (job.py):
  measure   per layer, on the unquantized model's hidden states: each linear's error under every option
  optimize  an option per linear: the least summed error within the bit budget (optimize.py)
  quantize  per layer, GPTQ on the quantized model's own hidden states (quant.py), then the head
  write     the output folder (output.py)
"""

import dataclasses
import json
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from exlcore.calibration import calibration_rows
from exlcore.conversion import options
from exlcore.conversion.capture import chunks, groups, quantizable, run
from exlcore.conversion.job import Job, make_writable_folder, write_json, write_tensors
from exlcore.conversion.measure import measure_block
from exlcore.conversion.optimize import Item, check_target, choose
from exlcore.conversion.output import write_model
from exlcore.conversion.progress import Progress
from exlcore.conversion.quant import quantize_block, quantize_head, set_quantized
from exlcore.errors import ExlError
from exlcore.loader import read_model_config, resolve_device
from exlcore.model import load_module
from exlcore.rope import RopeConfig
from exlcore.tokenizer import Tokenizer
from exlcore.weights import Weights

MEASUREMENT_VERSION = 1


@dataclass
class Settings:
    """What a conversion depends on; a resumed job must be given the same (job.py)."""

    in_dir: str
    out_dir: str
    compile_full: str | None = None
    bits: float = 4.125
    head_bits: int = 6
    cal_dataset: str | None = None
    rows: int = 100
    measurement_rows: int = 16
    length: int = 2048
    measurement_length: int = 2048
    measurement: str | None = None
    output_measurement: str | None = None
    shard_size: int = 8192
    rope_scale: float | None = None
    rope_alpha: float | None = None
    damping: float = 0.01


@dataclass
class Summary:
    output: Path | None
    bits: float  # achieved, over the decoder's quantized linears
    head_bits: float
    choice: dict[str, tuple[str, float]]  # linear -> its option and that option's bits per weight there
    seconds: dict[str, float]
    peak_vram: int  # bytes, 0 on the CPU
    peak_ram: int  # bytes
    measurement: Path | None = None


def _check(s: Settings):
    if s.head_bits not in options.HEAD:
        raise ExlError(f"-hb {s.head_bits}: head bits must be one of {', '.join(map(str, options.HEAD))}")
    if min(s.rows, s.measurement_rows) < 1 or min(s.length, s.measurement_length) < 16:
        raise ExlError("-r/-mr must be at least 1 and -l/-ml at least 16 tokens")
    if s.output_measurement and s.compile_full:
        raise ExlError("-om (measure only) cannot be combined with -cf; run the conversion with -m afterwards")
    if s.measurement and s.output_measurement:
        raise ExlError("-m (reuse a measurement) and -om (make one) exclude each other")
    if s.shard_size < 0 or not s.damping > 0:
        raise ExlError("-ss must be >= 0 (0: one file) and the damping > 0")
    for flag, value in (("-rs", s.rope_scale), ("-ra", s.rope_alpha)):
        if value is not None and not 0 < value <= 1000:
            raise ExlError(f"{flag} {value}: must be a positive factor (at most 1000)")
    if s.in_dir in (s.out_dir, s.compile_full):
        raise ExlError(f"{s.in_dir}: -o and -cf must not be the source folder; choose another folder")
    for flag, folder in (("-cf", s.compile_full), ("-om", s.output_measurement and str(Path(s.output_measurement).parent))):
        if folder:
            try:
                make_writable_folder(Path(folder))
            except OSError as e:
                raise ExlError(f"{flag} {folder}: cannot write there ({e.strerror}); choose a writable folder") from None


def _rope_override(rope: RopeConfig, s: Settings, head_dim: int) -> RopeConfig:
    """-rs (positions scaled down linearly, on top of the model's own scaling) and -ra (NTK alpha: a larger base)
    apply while calibrating only."""
    if s.rope_scale:
        rope = dataclasses.replace(rope, position_scale=s.rope_scale)
    if s.rope_alpha:
        rope = dataclasses.replace(rope, theta=rope.theta * s.rope_alpha ** (head_dim / (head_dim - 2)))
    return rope


def _read_measurement(path: Path, shapes: dict[str, tuple[int, int]]) -> dict:
    try:
        m = json.loads(path.read_text())
        ok = m.get("version") == MEASUREMENT_VERSION and m["candidates"] == list(options.CANDIDATES)
        errors = {k: m["linears"][k] for k in shapes}
        ok = ok and all(len(e) == len(options.CANDIDATES) for e in errors.values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise ExlError(f"{path}: not an exlcore measurement of this model (made by `exl convert -om` from the same "
                       "model and exlcore version); measure again without -m")
    return errors


def _items(shapes: dict[str, tuple[int, int]], errors: dict[str, list[float]] | None) -> list[Item]:
    return [Item(k, n * kk, [options.bits(o, kk, n) for o in options.CANDIDATES],
                 errors[k] if errors else [0.0] * len(options.CANDIDATES)) for k, (n, kk) in shapes.items()]


def _embedded(model, weights: Weights, ids: torch.Tensor, length: int, device) -> list[torch.Tensor]:
    model.embed.load(weights, torch.float32)
    return [model.embed(c.to(device)).float() for c in chunks(ids, length)]


def _unload(module):
    for m in module.modules():
        for name in ("weight", "bias"):
            if isinstance(getattr(m, name, None), torch.Tensor):
                setattr(m, name, None)


def _check_finite(states: list[torch.Tensor], layer: int):
    if not all(bool(torch.isfinite(x).all()) for x in states):
        raise ExlError(f"layer {layer}: calibration hidden states are not finite; the source weights are damaged")


@torch.inference_mode()
def convert(in_dir, out_dir, device=None, progress: bool = True, restart: bool = False, **kwargs) -> Summary:
    """Convert (or resume converting) in_dir into EXL2. Keyword arguments are Settings' fields; `restart`
    discards an earlier job in out_dir (-nr). Returns what was made (see Summary)."""
    started = time.monotonic()
    try:
        s = Settings(str(Path(in_dir).resolve()), str(Path(out_dir).resolve()), **kwargs)
    except TypeError as e:
        raise ExlError(f"convert: {e}") from None
    for field in ("compile_full", "cal_dataset", "measurement", "output_measurement"):
        if getattr(s, field):
            setattr(s, field, str(Path(getattr(s, field)).resolve()))
    _check(s)
    src, work = Path(s.in_dir), Path(s.out_dir)
    raw, spec, cfg = read_model_config(src)
    longest = max(s.length, s.measurement_length)
    if longest > cfg.max_position_embeddings and s.rope_scale is None and s.rope_alpha is None:
        raise ExlError(f"-l/-ml {longest}: longer than the model's context ({cfg.max_position_embeddings} positions, "
                       "config.json max_position_embeddings); use at most that, or extend the context with -rs/-ra")
    device = resolve_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg.rope = _rope_override(cfg.rope, s, cfg.head_dim)
    if cfg.rope_local is not None:
        cfg.rope_local = _rope_override(cfg.rope_local, s, cfg.head_dim)
    weights = Weights(src, device)
    if any(k.endswith((".q_weight", ".qweight")) for k in weights.index):
        raise ExlError(f"{src}: already quantized (EXL2/GPTQ tensors); convert from the original fp16/bf16/fp32 model")
    tokenizer = Tokenizer(src, raw)
    model = spec.build(cfg)
    calib = spec.calibration
    block_groups = [groups(b, calib) for b in model.layers]
    shapes = {k: (m.out_features, m.in_features) for b in model.layers for k, m in quantizable(b, calib).items()}
    if not s.output_measurement:
        check_target(_items(shapes, None), s.bits)
    job = Job(work, dataclasses.asdict(s), restart)
    if job["stage"] == "done":
        raise ExlError(f"{work}: this conversion has finished already; add -nr to convert again")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bar = Progress(progress)
    seconds = {}

    cal_file = job.dir / "calibration.safetensors"
    if cal_file.is_file():
        cal = load_file(cal_file)
    else:
        parquet = Path(s.cal_dataset) if s.cal_dataset else None
        cal = {"measure": calibration_rows(tokenizer, s.measurement_rows, s.measurement_length, parquet),
               "quantize": calibration_rows(tokenizer, s.rows, s.length, parquet)}
        write_tensors(cal_file, cal)

    # Measure
    t0 = time.monotonic()
    measurement_file = job.dir / "measurement.json"
    if s.measurement:
        errors = _read_measurement(Path(s.measurement), shapes)
    else:
        done = json.loads(measurement_file.read_text())["linears"] if job["measured"] else {}
        if job["measured"] < len(model.layers):
            states = _embedded(model, weights, cal["measure"], s.measurement_length, device)
            with bar.stage("measuring", len(model.layers)) as step:
                for i, block in enumerate(model.layers):
                    load_module(block, weights, torch.float32)
                    if i < job["measured"]:  # resumed: recompute the states that layer passed on
                        states = run(block, model, states)
                    else:
                        errs, states = measure_block(block, model, states, block_groups[i],
                                                     calib.all_experts_see_tokens, s.damping)
                        _check_finite(states, i)
                        done.update(errs)
                        write_json(measurement_file, {"version": MEASUREMENT_VERSION,
                                                      "candidates": list(options.CANDIDATES), "linears": done})
                        job.advance(measured=i + 1)
                    _unload(block)
                    step(f"layer {i}")
        errors = {k: done[k] for k in shapes}
        if s.output_measurement:
            target = Path(s.output_measurement)
            target = target / "measurement.json" if target.is_dir() else target
            write_json(target, json.loads(measurement_file.read_text()))
            job.advance(stage="done")
            return Summary(None, 0.0, 0.0, {}, {"measure": time.monotonic() - t0}, _peak_vram(device), _peak_ram(),
                           target)
    seconds["measure"] = time.monotonic() - t0

    # Optimize
    items = _items(shapes, errors)
    strategy = {i.key: options.CANDIDATES[o] for i, o in zip(items, choose(items, s.bits))}
    if job.state.get("strategy") != strategy:
        job.advance(strategy=strategy)  # kept for the record, as ExLlamaV2's job file keeps its own

    # Quantize
    t0 = time.monotonic()
    n = len(model.layers)
    if job["quantized"] <= n:  # layers, then the head (as file n)
        states = _embedded(model, weights, cal["quantize"], s.length, device)
        with bar.stage("quantizing", n + 1) as step:
            for i, block in enumerate(model.layers):
                load_module(block, weights, torch.float32)
                if i < job["quantized"]:  # resumed: recompute the states the finished layer passed on
                    set_quantized(block, job.load_layer(i), device)
                    states = run(block, model, states)
                else:
                    packed, states = quantize_block(block, model, states, block_groups[i],
                                                    calib.all_experts_see_tokens, strategy, s.damping)
                    _check_finite(states, i)
                    job.save_layer(i, packed)
                    job.advance(quantized=i + 1)
                _unload(block)
                step(f"layer {i}")
            model.norm.load(weights, torch.float32)
            head = weights.get("lm_head.weight") if "lm_head.weight" in weights else model.embed.weight
            normed = [model.norm(x) for x in states]
            del states
            job.save_layer(n, quantize_head(head, normed, options.HEAD[s.head_bits], s.damping))
            job.advance(quantized=n + 1)
            step("head")
    seconds["quantize"] = time.monotonic() - t0

    # Write
    t0 = time.monotonic()
    out = Path(s.compile_full or s.out_dir)
    head = job.load_layer(n)
    replaced = {f"{k}.weight" for k in shapes} | {"lm_head.weight"}
    config = {"quant_method": "exl2", "version": f"exlcore {_version()}", "bits": s.bits, "head_bits": s.head_bits,
              "calibration": {"rows": s.rows, "length": s.length,
                              "dataset": Path(s.cal_dataset).name if s.cal_dataset else "(default)"}}
    with bar.stage("writing", 1) as step:
        write_model(src, out, job.layers(), replaced, config, s.shard_size)
        # Shipped beside the weights (as hub repos do) so other rates can be made with -m.
        write_json(out / "measurement.json", json.loads(Path(s.measurement or measurement_file).read_text()))
        step(str(out))
    seconds["write"] = time.monotonic() - t0
    job.advance(stage="done")
    job.drop_layers()  # the output holds them now
    seconds["total"] = time.monotonic() - started
    total_bits = sum(options.bits(strategy[k], kk, nn) for k, (nn, kk) in shapes.items())
    head_bits = sum(t.numel() * t.element_size() * 8 for t in head.values()) / (cfg.vocab_size * cfg.hidden_size)
    choice = {k: (o, options.bits(o, shapes[k][1], shapes[k][0]) / (shapes[k][0] * shapes[k][1]))
              for k, o in strategy.items()}
    return Summary(out, total_bits / sum(a * b for a, b in shapes.values()), head_bits, choice, seconds,
                   _peak_vram(device), _peak_ram())


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("exlcore")
    except PackageNotFoundError:
        return "dev"


def _peak_vram(device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def _peak_ram() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
