"""EXL2 inference speed: exlcore's CUDA kernels against exllamav2 0.3.2, same files, same GPU, same run.

    python benchmarks/exl2.py --work DIR [--out DIR] [--quick] [--skip-exllamav2] [--profile]

The model is Llama-3-8B-shaped at about 4 bits per weight, written straight into EXL2 tensors (random codes,
scales and act-order permutations: every bit pattern is a valid code, and speed does not depend on values;
the head at 6 bits as exllamav2's default -hb 6 makes it). Both libraries load the same folder.

  decode   tokens/s per sequence (steps/s) for batch 1, 4, 16: a 128-token prefill, then 128 single-token steps
           with a KV cache. exlcore batch 1 runs through its Generator, batch 4 and 16 through
           exlcore.speed.decode_rate (`exl bench`): the same CUDA graphs, one token per sequence. exllamav2 runs plain
           forward loops (it has no graphs), with EXLLAMA_NO_SDPA=1 (its SDPA fallback drops the causal mask).
  long     batch-1 decode tokens/s after an 8000-token prompt (the same loops as decode): attention over a long
           cache in every step; also with the KV cache quantized to 8 and 4 bits (exllamav2: ExLlamaV2Cache_Q8, _Q4).
  prefill  tokens/s of one 2048-token forward into an empty cache (exllamav2: its matmul attention, no
           flash-attn here; exlcore: torch SDPA).
  ragged   generated tokens/s over the whole call (prefill included) of 16 text prompts of about 100 to 720 tokens, 128
           greedy tokens each, as one batch: exlcore's Generator.generate(list), exllamav2's generate_simple(list)
           (left padding; its dynamic generator batches only in paged mode, which needs flash-attn); and exlcore
           generating them one after another, the way without batching.
  GB/s     bytes of quantized weights read per decode step (every linear's tensors, the fp16 embedding row
           aside) x steps/s; compared with the measured 3.0 TB/s copy bandwidth.
  read     the step's packed q_weight tensors read by one torch.sum each, in model order, replayed from a CUDA
           graph: a library's reduction over the same bytes, one kernel per matrix, with no matmul at all.
  profile  (--profile) exlcore's GPU time per kernel over 16 batch-1 decode steps, from torch.profiler.
"""

import argparse
import json
import os
import re
import statistics
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from core import COPY_BANDWIDTH, LLAMA31_ROPE, write_tokenizer

import exlcore
from exlcore.cache import element_bytes
from exlcore.ext import extension
from exlcore.speed import decode_rate

SHAPE = dict(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
             intermediate_size=14336, vocab_size=128256)
QUICK = dict(num_hidden_layers=2, hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
             intermediate_size=512, vocab_size=512)
BODY = [(0.25, 5, 128), (0.5, 4, 128), (0.25, 3, 128)]  # about 4.1 bits per weight with scales and perm
HEAD = [(0.15, 8, 128), (0.85, 6, 128)]


def random_exl2(n: int, k: int, option, gen: torch.Generator) -> dict[str, torch.Tensor]:
    from exlcore.formats.exl2 import group_layout

    layout = group_layout(k, option)
    rows = sum(r * b // 32 for b, r in layout)
    starts = torch.tensor([0] + [r * b // 32 for b, r in layout]).cumsum(0)[:-1]
    groups = torch.stack([torch.tensor([b for b, _ in layout]), starts], 1).flatten().to(torch.int16)
    dev = gen.device
    return {"q_weight": torch.randint(-2**31, 2**31 - 1, (rows, n), dtype=torch.int32, device=dev, generator=gen),
            "q_groups": groups.to(dev),
            "q_scale": torch.randint(-2**31, 2**31 - 1, (len(layout), n // 8), dtype=torch.int32, device=dev, generator=gen),
            "q_scale_max": (torch.rand(len(layout), device=dev, generator=gen) * 0.002 + 0.001).half(),
            "q_invperm": torch.argsort(torch.randperm(k, device=dev, generator=gen)).to(torch.int32)}


def write_model(folder: Path, shape: dict) -> int:
    """Write the EXL2 folder (once); return the bytes a decode step reads (all linear tensors)."""
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", rms_norm_eps=1e-5,
                  rope_theta=500000.0, rope_scaling=LLAMA31_ROPE, max_position_embeddings=8192,
                  tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, torch_dtype="float16",
                  quantization_config={"quant_method": "exl2", "bits": 4.0, "head_bits": 6}, **shape)
    marker = folder / "linear_bytes.json"
    if marker.is_file() and json.loads((folder / "config.json").read_text()) == config:
        return json.loads(marker.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator("cuda" if torch.cuda.is_available() else "cpu").manual_seed(0)
    h, i, d = shape["hidden_size"], shape["intermediate_size"], shape["head_dim"]
    q, kv = shape["num_attention_heads"] * d, shape["num_key_value_heads"] * d
    linear_bytes, shard, n_shard = 0, {}, 0

    def add(name, tensors):
        nonlocal linear_bytes
        for suffix, t in tensors.items():
            shard[f"{name}.{suffix}"] = t.cpu()
            linear_bytes += t.numel() * t.element_size()

    def flush():
        nonlocal shard, n_shard
        n_shard += 1
        save_file(shard, folder / f"output-{n_shard:05d}.safetensors")
        shard = {}

    shard["model.embed_tokens.weight"] = (torch.randn(shape["vocab_size"], h, generator=gen, device=gen.device) * 0.02).half().cpu()
    for layer in range(shape["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        shard[f"{p}.input_layernorm.weight"] = torch.ones(h).half()
        shard[f"{p}.post_attention_layernorm.weight"] = torch.ones(h).half()
        for name, n, k in [("self_attn.q_proj", q, h), ("self_attn.k_proj", kv, h), ("self_attn.v_proj", kv, h),
                           ("self_attn.o_proj", h, q), ("mlp.gate_proj", i, h), ("mlp.up_proj", i, h),
                           ("mlp.down_proj", h, i)]:
            add(f"{p}.{name}", random_exl2(n, k, BODY, gen))
        if layer % 8 == 7:
            flush()
    shard["model.norm.weight"] = torch.ones(h).half()
    add("lm_head", random_exl2(shape["vocab_size"], h, HEAD, gen))
    flush()
    write_tokenizer(folder)
    marker.write_text(json.dumps(linear_bytes))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return linear_bytes


def timed(fn, repeats=3) -> float:
    """Median seconds of fn() after one warm-up, synchronised."""
    fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def decode_profile(g: "exlcore.Generator", prompt: list[int], steps: int = 16) -> str:
    """Where a batch-1 decode step's GPU time goes, in the generator's greedy decode: each kernel's share of the
    timeline (its end minus the end of the kernel before, as kernels overlap under programmatic launch), per step,
    from torch.profiler; and the GPU's idle time before it (waiting for the host)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    for _ in g.tokens(prompt, 2, temperature=0, stop_ids=set()):  # the prompt cached, so below one eager token
        pass
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in g.tokens(prompt, steps + 2, temperature=0, stop_ids=set()):
            pass
    kernels = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA), key=lambda e: e.time_range.start)
    # A step begins with the embedding; the first is the eager prompt token's, the last step's may be cut short.
    starts = [i for i, e in enumerate(kernels) if "indexSelect" in e.name]
    steps = len(starts) - 2
    matmuls = ["q/k/v", "o", "gate/up", "down"]
    share, calls, idle, end = {}, {}, {}, kernels[starts[1] - 1].time_range.end
    for s0, s1 in zip(starts[1:-1], starts[2:]):
        for i, e in enumerate(kernels[s0:s1]):
            name = re.sub(r"^void |\(anonymous namespace\)::|\(.*$|<.*$", "", e.name)[:40]
            if name == "gemv_kernel":
                k = sum("gemv_kernel" in k.name for k in kernels[s0:s0 + i])
                name = f"matmul {matmuls[k % 4] if k < 4 * len(g.model.layers) else 'head'}"
            share[name] = share.get(name, 0.0) + max(0.0, e.time_range.end - max(e.time_range.start, end))
            calls[name] = calls.get(name, 0) + 1
            idle[name] = idle.get(name, 0.0) + max(0.0, e.time_range.start - end)
            end = max(end, e.time_range.end)
    total = sum(share.values()) + sum(idle.values())
    lines = [f"decode step: {total / steps:.0f} us on the GPU timeline, {sum(idle.values()) / steps:.0f} us of it "
             f"idle ({steps} steps)",
             "| kernel | calls/step | us/step | share | idle before, us/step |", "|---|---:|---:|---:|---:|"]
    for name, us in sorted(share.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {name} | {calls[name] / steps:g} | {us / steps:.1f} | {us / total:.1%} | "
                     f"{idle[name] / steps:.1f} |")
    return "\n".join(lines)


def decode_rates(g: "exlcore.Generator", prompt: list[int], steps: int, rounds: int) -> list[float]:
    """Batch-1 decode tokens/s of `rounds` runs of `steps` tokens, each after a new prompt (the one before rotated: no
    cached prefix), following one run that captures the CUDA graphs."""
    rates = []
    for _ in range(rounds + 1):
        for _ in g.tokens(prompt, steps, temperature=0, stop_ids=set()):
            pass
        rates.append(g.stats.decode_tokens_per_second)
        prompt = prompt[1:] + prompt[:1]
    return rates[1:]


def torch_read(model) -> tuple[float, int]:
    """Seconds and bytes of reading every packed linear's q_weight with one torch.sum each, in model order, from a
    CUDA graph (median of 5 replays)."""
    from exlcore.layers import Linear

    weights = [m.kernel.tensors[0].view(torch.float32) for m in model.modules()
               if isinstance(m, Linear) and m.kernel is not None]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            w.sum()
    return timed(graph.replay, 5), sum(w.numel() * 4 for w in weights)


RAGGED, RAGGED_IDS, RAGGED_ROOM = 16, 512, 1024  # prompts; the most ids drawn for one; cache room for a prompt
LONG = 8000  # the long-context decode's prompt tokens
CACHE_BITS = (16, 8, 4)  # the long decode's KV caches


def ragged_prompts(folder: Path) -> list[str]:
    """RAGGED texts of 32 to RAGGED_IDS random ids (seeded, below the benchmark tokenizer's 512), decoded: they
    encode to about 100 to 720 tokens."""
    from exlcore.tokenizer import Tokenizer

    tokenizer = Tokenizer(folder, json.loads((folder / "config.json").read_text()))
    gen = torch.Generator().manual_seed(7)
    lengths = torch.randint(32, RAGGED_IDS + 1, (RAGGED,), generator=gen).tolist()
    return [tokenizer.decode(torch.randint(2, 512, (n,), generator=gen).tolist()) for n in lengths]


def bench_exlcore(folder: Path, vocab: int, steps: int, prefill: int, profile: bool = False) -> dict:
    extension()  # built, or found in its cache, before the clock starts: exllamav2 builds its own at import
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = exlcore.load(folder, device="cuda", dtype=torch.float16)
    torch.cuda.synchronize()
    r = {"load_s": time.perf_counter() - t0}
    gen = torch.Generator().manual_seed(1)
    g = exlcore.Generator(model, max_seq_len=128 + steps + 8)
    prompt = torch.randint(0, vocab, (128,), generator=gen).tolist()
    r["decode_1"] = decode_rates(g, prompt, steps, 1)[0]
    r["torch_read_s"], r["torch_read_bytes"] = torch_read(model)
    if profile:
        print(decode_profile(g, prompt), flush=True)
    for batch in (4, 16):  # each batch's cache and graphs are freed on return, before the next measurement
        r[f"decode_{batch}"] = decode_rate(model, batch, 128, steps)
    x = torch.randint(0, vocab, (1, prefill), generator=gen).cuda()
    r["prefill"] = prefill / timed(lambda: model.forward(x, model.new_cache(1, prefill), last_only=True))
    r["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9  # before the long and ragged runs' larger caches
    long_prompt = torch.randint(0, vocab, (LONG,), generator=gen).tolist()
    for bits in CACHE_BITS:
        g = exlcore.Generator(model, max_seq_len=LONG + steps + 8, cache_bits=bits)
        r[f"decode_long_{bits}"] = decode_rates(g, long_prompt, steps, 1)[0]
        del g
    prompts = ragged_prompts(folder)
    g = exlcore.Generator(model, max_seq_len=RAGGED_ROOM + steps)
    r["ragged"] = len(prompts) * steps / timed(lambda: g.generate(prompts, max_new_tokens=steps, temperature=0), 1)
    r["ragged_alone"] = len(prompts) * steps / timed(
        lambda: [g.generate(p, max_new_tokens=steps, temperature=0) for p in prompts], 1)
    return r


def bench_exllamav2(folder: Path, vocab: int, steps: int, prefill: int) -> dict:
    from exllamav2 import (ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Cache_Q4, ExLlamaV2Cache_Q8, ExLlamaV2Config,
                           ExLlamaV2Tokenizer)
    from exllamav2.generator import ExLlamaV2BaseGenerator, ExLlamaV2Sampler

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    config = ExLlamaV2Config(str(folder))
    config.max_seq_len = max(prefill, RAGGED_ROOM + steps)
    model = ExLlamaV2(config)
    model.load()
    torch.cuda.synchronize()
    r = {"load_s": time.perf_counter() - t0}
    gen = torch.Generator().manual_seed(1)
    for batch in (1, 4, 16):
        r[f"decode_{batch}"] = exllamav2_decode(model, torch.randint(0, vocab, (batch, 128), generator=gen), steps)
    cache = ExLlamaV2Cache(model, max_seq_len=prefill)
    x = torch.randint(0, vocab, (1, prefill), generator=gen)

    def full():
        cache.current_seq_len = 0
        model.forward(x, cache, last_id_only=True)

    r["prefill"] = prefill / timed(full)
    r["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9  # before the ragged batch's larger cache
    del cache
    tokenizer = ExLlamaV2Tokenizer(config)
    cache = ExLlamaV2Cache(model, batch_size=RAGGED, max_seq_len=RAGGED_ROOM + steps)
    generator = ExLlamaV2BaseGenerator(model, cache, tokenizer)
    prompts = ragged_prompts(folder)
    r["ragged"] = len(prompts) * steps / timed(
        lambda: generator.generate_simple(prompts, ExLlamaV2Sampler.Settings.greedy(), steps, stop_token=None), 1)
    model.unload()
    # The long prompt with a model loaded for its length: exllamav2 sizes buffers by max_seq_len at load, which
    # would otherwise count in the peak above.
    config.max_seq_len = LONG + steps + 8
    model = ExLlamaV2(config)
    model.load()
    long_prompt = torch.randint(0, vocab, (1, LONG), generator=gen)
    for bits, kind in zip(CACHE_BITS, (ExLlamaV2Cache, ExLlamaV2Cache_Q8, ExLlamaV2Cache_Q4)):
        r[f"decode_long_{bits}"] = exllamav2_decode(model, long_prompt, steps, kind)
    model.unload()
    return r


def exllamav2_decode(model, ids: torch.Tensor, steps: int, kind=None) -> float:
    """exllamav2's decode tokens/s per sequence: the prompts `ids` into a new cache (ExLlamaV2Cache, or the class
    `kind`), then `steps` single-token forwards, less the prompt's time."""
    from exllamav2 import ExLlamaV2Cache

    cache = (kind or ExLlamaV2Cache)(model, batch_size=ids.shape[0], max_seq_len=ids.shape[1] + steps + 8)

    def prefill_only():
        cache.current_seq_len = 0
        model.forward(ids, cache, last_id_only=True)

    def run():
        prefill_only()
        for _ in range(steps):
            model.forward(ids[:, :1], cache, last_id_only=True)

    return steps / (timed(run, 1) - timed(prefill_only, 1))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, default=os.environ.get("OUT"))
    p.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test")
    p.add_argument("--skip-exllamav2", action="store_true")
    p.add_argument("--profile", action="store_true", help="print exlcore's time per kernel in decode")
    args = p.parse_args()
    shape = QUICK if args.quick else SHAPE
    steps, prefill = (16, 64) if args.quick else (128, 2048)
    folder = args.work / ("exl2-quick" if args.quick else "exl2-llama8b")
    t0 = time.perf_counter()
    weight_bytes = write_model(folder, shape)
    print(f"model ready in {time.perf_counter() - t0:.0f} s: {weight_bytes / 1e9:.2f} GB of quantized linears",
          flush=True)
    rows = {"exlcore": bench_exlcore(folder, shape["vocab_size"], steps, prefill, args.profile)}
    print("exlcore", rows["exlcore"], flush=True)
    if not args.skip_exllamav2:
        rows["exllamav2"] = bench_exllamav2(folder, shape["vocab_size"], steps, prefill)
        print("exllamav2", rows["exllamav2"], flush=True)
    lines = ["| library | load s | peak GB | prefill tok/s | decode b1 tok/s | b1 GB/s | of 3.0 TB/s | b4 tok/s | b16 tok/s "
             f"| b1 after {LONG} tok/s | ragged 16 tok/s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        gbps = weight_bytes * r["decode_1"] / 1e9
        lines.append(f"| {name} | {r['load_s']:.1f} | {r['peak_gb']:.2f} | {r['prefill']:,.0f} | {r['decode_1']:.1f} | "
                     f"{gbps:.0f} | {gbps * 1e9 / COPY_BANDWIDTH:.1%} | {r['decode_4']:.1f} | {r['decode_16']:.1f} | "
                     f"{r['decode_long_16']:.1f} | {r['ragged']:,.0f} |")
    lines += [f"\nBatch-1 decode after {LONG} tokens by KV cache, tok/s:\n",
              "| cache | " + " | ".join(rows) + " | KV bytes per token |", "|---|" + "---:|" * (len(rows) + 1)]
    kv = 2 * shape["num_hidden_layers"] * shape["num_key_value_heads"] * shape["head_dim"]
    for bits in CACHE_BITS:
        per_token = kv * element_bytes(bits)
        lines.append(f"| {bits}-bit | " + " | ".join(f"{r[f'decode_long_{bits}']:.1f}" for r in rows.values())
                     + f" | {per_token / 1024:.0f} KiB |")
    ours = rows["exlcore"]
    lines.append(f"\nexlcore generating the ragged prompts one after another: {ours['ragged_alone']:,.0f} tok/s.")
    lines.append(f"\nThe step's q_weight tensors ({ours['torch_read_bytes'] / 1e9:.2f} GB) read by one torch.sum each "
                 f"take {ours['torch_read_s'] * 1e3:.2f} ms ({ours['torch_read_bytes'] / ours['torch_read_s'] / 1e9:.0f} "
                 f"GB/s); an exlcore batch-1 step takes {1e3 / ours['decode_1']:.2f} ms.")
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "exl2.md").write_text(table + "\n")
        (args.out / "exl2.json").write_text(json.dumps(dict(weight_bytes=weight_bytes, shape=shape, rows=rows,
                                                            device=torch.cuda.get_device_name()), indent=2))


if __name__ == "__main__":
    main()
