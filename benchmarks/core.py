"""exlcore vs transformers on random-weight Llama models: load time, peak VRAM, prefill and decode speed.

    python benchmarks/core.py --work /tmp/bench [--out DIR] [--models smollm2,llama8b] [--quick]
                              [--no-cudnn-attention]

Each model is written once, as a Hugging Face
folder under --work (reused when its config.json matches): seeded random bf16 weights (normal, std 0.02;
norms 1.0), safetensors shards of ~5 GB with an index, config.json and a tiny byte-level BPE tokenizer.

  smollm2  SmolLM2-135M shapes: 30 layers, hidden 576, 9/3 heads, MLP 1536, vocab 49152, tied embeddings
  llama8b  Llama-3-8B shapes: 32 layers, hidden 4096, 32/8 heads, MLP 14336, vocab 128256, llama3 rope (3.1)

For each model, exlcore (exlcore.load) then transformers (from_pretrained(...).cuda(), sdpa), one at a time:
  load      wall seconds to a model ready on the GPU (files come from the page cache after the first run)
  peak      torch.cuda.max_memory_allocated over load, prefill and decode
  prefill   tokens/s of one forward over 2048 random token ids without a KV cache; median of 5 after 2
            warm-ups, timed with CUDA events
  decode    tokens/s at batch 1, greedy, 256 new tokens after a 128-token prompt, per forward step:
            exlcore: Generator.tokens(...).stats.decode_tokens_per_second ((new_tokens - 1) steps over
            decode_seconds); transformers: model.generate with its default dynamic cache, timed as
            (time(generate 256 tokens) - time(generate 1 token)) / 255, so prefill cancels out
  GB/s      weight bytes read per decoded token / seconds per token. The bytes are every parameter once,
            the embedding only where tied (then it is the head); the embedding lookup and the KV cache reads
            (0.2% more for the 8B, 2% for SmolLM2) are left out. The last column divides by 3.0 TB/s, the
            H100's measured device copy bandwidth.

Torch's SDPA picks cuDNN attention on Hopper for both frameworks; it builds a new plan for every KV length, which
dominates batch-1 decode. --no-cudnn-attention turns it off (SDPA then takes flash attention).

--quick swaps in tiny shapes and short sequences, in float32 on the CPU when there is no GPU: a smoke test.
Prints a markdown table; writes it as results.md, with the raw numbers as results.json, to --out ($OUT).
"""

import argparse
import gc
import json
import os
import random
import statistics
import time
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

import exlcore

COPY_BANDWIDTH = 3.0e12  # bytes/s, H100 device-to-device copy as measured on the benchmark machine
SHARD_BYTES = 5e9

LLAMA31_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)
MODELS = {
    "smollm2": dict(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                    intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
                    rope_scaling=None, max_position_embeddings=8192),
    "llama8b": dict(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                    head_dim=128, intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False,
                    rope_theta=500000.0, rope_scaling=LLAMA31_ROPE, max_position_embeddings=131072),
}
TINY = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            intermediate_size=128, vocab_size=512)

# (prefill tokens, prompt tokens, new tokens, timed prefill runs)
FULL_RUN, QUICK_RUN = (2048, 128, 256, 5), (64, 16, 16, 2)


def config_json(shape: dict) -> dict:
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", rms_norm_eps=1e-5,
                attention_bias=False, mlp_bias=False, bos_token_id=0, eos_token_id=1, torch_dtype="bfloat16",
                **shape)


def parameter_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    h, d, kv = c["hidden_size"], c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], h)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes |= {f"{p}.input_layernorm.weight": (h,),
                   f"{p}.self_attn.q_proj.weight": (c["num_attention_heads"] * d, h),
                   f"{p}.self_attn.k_proj.weight": (kv, h),
                   f"{p}.self_attn.v_proj.weight": (kv, h),
                   f"{p}.self_attn.o_proj.weight": (h, c["num_attention_heads"] * d),
                   f"{p}.post_attention_layernorm.weight": (h,),
                   f"{p}.mlp.gate_proj.weight": (c["intermediate_size"], h),
                   f"{p}.mlp.up_proj.weight": (c["intermediate_size"], h),
                   f"{p}.mlp.down_proj.weight": (h, c["intermediate_size"])}
    shapes["model.norm.weight"] = (h,)
    if not c["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (c["vocab_size"], h)
    return shapes


def decode_weight_bytes(c: dict) -> int:
    """Bytes of bf16 weights one decode step reads: all of them, less an untied embedding (a row lookup)."""
    return sum(2 * torch.Size(s).numel() for name, s in parameter_shapes(c).items()
               if name != "model.embed_tokens.weight" or c["tie_word_embeddings"])


def write_tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(0)
    words = ["".join(rng.choice("etaoinshrdlucmfwypvbgkqjxz") for _ in range(rng.randint(2, 9))) for _ in range(400)]
    text = [" ".join(rng.choices(words, k=40)) + "." for _ in range(100)]  # ~25 KB
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=512, special_tokens=["<|bos|>", "<|eos|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                      show_progress=False))
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "tokenizer_class": "PreTrainedTokenizerFast"}))


def write_model(folder: Path, config: dict, device: str):
    """Seeded random weights made on `device`, saved shard by shard; config.json last marks the folder complete."""
    if (folder / "config.json").is_file() and json.loads((folder / "config.json").read_text()) == config:
        return
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("model*.safetensors*"):  # shards and index of an older shape
        old.unlink()
    shards, size = [[]], 0
    for name, shape in parameter_shapes(config).items():
        nbytes = 2 * torch.Size(shape).numel()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    gen = torch.Generator(device).manual_seed(0)
    weight_map = {}
    for i, shard in enumerate(shards):
        file = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard:
            t = torch.empty(shape, dtype=torch.bfloat16, device=device)
            tensors[name] = (t.fill_(1.0) if name.endswith("norm.weight") else t.normal_(0, 0.02, generator=gen)).cpu()
            weight_map[name] = file
        save_file(tensors, folder / file, metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        total = sum(2 * torch.Size(s).numel() for s in parameter_shapes(config).values())
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    write_tokenizer(folder)
    (folder / "config.json").write_text(json.dumps(config, indent=2))


class Bench:
    def __init__(self, device: str, dtype: torch.dtype, run: tuple[int, int, int, int]):
        self.device, self.dtype = device, dtype
        self.prefill_len, self.prompt_len, self.new_tokens, self.repeats = run
        self.cuda = device == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def seconds(self, fn) -> float:
        """Time one call of fn: CUDA events on the GPU, the host clock on the CPU."""
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    def median_seconds(self, fn, warmup: int = 2) -> float:
        for _ in range(warmup):
            fn()
        return statistics.median(self.seconds(fn) for _ in range(self.repeats))

    def load(self, fn):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        self.sync()
        t0 = time.perf_counter()
        model = fn()
        self.sync()
        return model, time.perf_counter() - t0

    def peak_gb(self) -> float | None:
        return torch.cuda.max_memory_allocated() / 1e9 if self.cuda else None

    def exlcore(self, folder: Path, ids: torch.Tensor, prompts: list[list[int]]) -> dict:
        model, load_s = self.load(lambda: exlcore.load(folder, device=self.device, dtype=self.dtype))
        prefill_s = self.median_seconds(lambda: model.forward(ids))

        gen = exlcore.Generator(model, max_seq_len=self.prompt_len + self.new_tokens)

        def decode(prompt: list[int], n: int) -> float:
            for _ in gen.tokens(prompt, max_new_tokens=n, temperature=0, stop_ids=set()):
                pass
            return gen.stats.decode_tokens_per_second

        decode(prompts[0], self.new_tokens)  # warm-up over the same lengths: captures every CUDA graph used
        decode_tps = decode(prompts[1], self.new_tokens)
        return dict(load_s=load_s, peak_gb=self.peak_gb(), prefill_s=prefill_s, decode_tps=decode_tps)

    def transformers(self, folder: Path, ids: torch.Tensor, prompts: list[list[int]]) -> dict:
        def load():
            model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=self.dtype, attn_implementation="sdpa")
            return model.to(self.device).eval()

        model, load_s = self.load(load)
        with torch.inference_mode():
            prefill_s = self.median_seconds(lambda: model(ids, use_cache=False))

            def generate(prompt: list[int], n: int):
                prompt = torch.tensor([prompt], device=self.device)
                return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                      min_new_tokens=n, do_sample=False, pad_token_id=0)

            generate(prompts[0], 8)  # warm-up
            one = self.median_seconds(lambda: generate(prompts[1], 1), warmup=0)
            full = self.seconds(lambda: generate(prompts[1], self.new_tokens))
        return dict(load_s=load_s, peak_gb=self.peak_gb(), prefill_s=prefill_s,
                    decode_tps=(self.new_tokens - 1) / (full - one))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, required=True, help="folder for the generated model folders (reused)")
    p.add_argument("--out", type=Path, default=os.environ.get("OUT"), help="where results.md/.json go ($OUT)")
    p.add_argument("--models", default="smollm2,llama8b", help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument("--quick", action="store_true", help="tiny shapes and short runs: a smoke test, CPU-friendly")
    p.add_argument("--no-cudnn-attention", action="store_true",
                   help="turn off SDPA's cuDNN backend for both frameworks (it re-plans at every new KV length)")
    args = p.parse_args()
    if args.no_cudnn_attention:
        torch.backends.cuda.enable_cudnn_sdp(False)
    transformers.AutoModelForCausalLM, transformers.LlamaForCausalLM  # import now, not in the first timed load

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    bench = Bench(device, dtype, QUICK_RUN if args.quick else FULL_RUN)
    print(f"device {torch.cuda.get_device_name() if bench.cuda else 'cpu'}, torch {torch.__version__}, {dtype}")

    rows = []
    for name in args.models.split(","):
        config = config_json({**MODELS[name], **(TINY if args.quick else {})})
        folder = args.work / (f"{name}-quick" if args.quick else name)
        t0 = time.perf_counter()
        write_model(folder, config, device)
        print(f"{name}: folder ready in {time.perf_counter() - t0:.1f} s ({folder})")
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(0, config["vocab_size"], (1, bench.prefill_len), generator=gen).to(device)
        prompts = [torch.randint(0, config["vocab_size"], (bench.prompt_len,), generator=gen).tolist() for _ in range(2)]
        weight_bytes = decode_weight_bytes(config)
        for framework in ("exlcore", "transformers"):
            r = getattr(bench, framework)(folder, ids, prompts)  # the model is freed on return
            gc.collect()
            if bench.cuda:
                torch.cuda.empty_cache()
            r |= dict(model=name, framework=framework, weight_bytes=weight_bytes,
                      prefill_tps=bench.prefill_len / r["prefill_s"],
                      decode_gbps=weight_bytes * r["decode_tps"] / 1e9)
            r["decode_of_peak"] = r["decode_gbps"] * 1e9 / COPY_BANDWIDTH
            print(f"  {framework}: {r}", flush=True)
            rows.append(r)

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    table = "\n".join(
        ["| model | framework | load s | peak GB | prefill tok/s | decode tok/s | decode GB/s | of 3.0 TB/s |",
         "|---|---|---:|---:|---:|---:|---:|---:|"]
        + [f"| {r['model']} | {r['framework']} | {r['load_s']:.1f} | {fmt(r['peak_gb'], '.2f')} | "
           f"{r['prefill_tps']:,.0f} | {r['decode_tps']:.1f} | {r['decode_gbps']:.0f} | {r['decode_of_peak']:.1%} |"
           for r in rows])
    run = dict(zip(("prefill_tokens", "prompt_tokens", "new_tokens", "prefill_repeats"),
                   QUICK_RUN if args.quick else FULL_RUN))
    meta = dict(device=torch.cuda.get_device_name() if bench.cuda else "cpu", torch=torch.__version__,
                transformers=transformers.__version__, dtype=str(dtype), quick=args.quick, run=run,
                cudnn_attention=not args.no_cudnn_attention)
    print("\n" + table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.md").write_text(table + "\n")
        (args.out / "results.json").write_text(json.dumps(dict(meta, results=rows), indent=2))


if __name__ == "__main__":
    main()
