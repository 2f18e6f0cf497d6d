"""`exl convert`: a Hugging Face model folder -> EXL2, with ExLlamaV2's convert flags."""


def register(sub):
    p = sub.add_parser("convert", help="quantize a Hugging Face model to EXL2 at a target bits per weight")
    p.add_argument("-i", "--in_dir", required=True, help="source model folder (fp16/bf16/fp32 safetensors)")
    p.add_argument("-o", "--out_dir", required=True,
                   help="work folder (resumable state in job/); the model is written here unless -cf")
    p.add_argument("-cf", "--compile_full", default=None, help="write the finished model to this folder instead")
    p.add_argument("-b", "--bits", type=float, default=4.125, help="target bits per weight of the decoder layers")
    p.add_argument("-hb", "--head_bits", type=int, default=6, help="bits of the output head (2, 3, 4, 5, 6, 8)")
    p.add_argument("-c", "--cal_dataset", default=None, help="calibration parquet (default: the built-in set)")
    p.add_argument("-r", "--dataset_rows", dest="rows", type=int, default=100, help="calibration rows, quantization")
    p.add_argument("-mr", "--measurement_rows", type=int, default=16, help="calibration rows, measurement")
    p.add_argument("-l", "--length", type=int, default=2048, help="tokens per row, quantization")
    p.add_argument("-ml", "--measurement_length", type=int, default=2048, help="tokens per row, measurement")
    p.add_argument("-m", "--measurement", default=None, help="reuse this measurement.json; skip measuring")
    p.add_argument("-om", "--output_measurement", default=None, help="measure only, write measurement.json here")
    p.add_argument("-nr", "--no_resume", action="store_true", help="discard an earlier job in the work folder")
    p.add_argument("-ss", "--shard_size", type=int, default=8192, help="output shard size in MB (0: one file)")
    p.add_argument("-rs", "--rope_scale", type=float, default=None, help="linear RoPE scale while calibrating")
    p.add_argument("-ra", "--rope_alpha", type=float, default=None, help="NTK RoPE alpha while calibrating")
    p.add_argument("--damping", type=float, default=0.01, help="GPTQ damping, a fraction of the mean Hessian diagonal")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=convert)


def convert(args):
    import exlcore

    settings = {k: getattr(args, k) for k in ("compile_full", "bits", "head_bits", "cal_dataset", "rows",
                                              "measurement_rows", "length", "measurement_length", "measurement",
                                              "output_measurement", "shard_size", "rope_scale", "rope_alpha",
                                              "damping")}
    s = exlcore.convert(args.in_dir, args.out_dir, device=args.device, progress=not args.quiet,
                        restart=args.no_resume, **settings)
    print(summary(s))


def summary(s) -> str:
    """Achieved rate, each layer's linears with the bits per weight of their chosen options, time, memory."""
    import re

    gb = 1 << 30
    times = ", ".join(f"{k} {v:.1f} s" for k, v in s.seconds.items())
    memory = f"peak VRAM {s.peak_vram / gb:.2f} GB, peak RAM {s.peak_ram / gb:.2f} GB"
    if s.output is None:
        return f"measurement written to {s.measurement} ({times}; {memory})"
    lines = [f"converted to {s.output}: {s.bits:.3f} bits per weight in the layers, head {s.head_bits:.2f}",
             f"time: {times}; {memory}", "bits per weight of each linear's chosen option (`exl info` and OUT/job/job.json have more):"]
    layers: dict[str, list[str]] = {}
    for key, (_, bits) in s.choice.items():
        m = re.search(r"layers\.(\d+)\.(.*)", key)
        layers.setdefault(m.group(1) if m else "", []).append(f"{m.group(2) if m else key} {bits:.2f}")
    lines += [f"  layer {i:>3}: " + ", ".join(parts) for i, parts in layers.items()]
    return "\n".join(lines)
