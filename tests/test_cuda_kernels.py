"""The CUDA extension against the PyTorch reference on fresh random inputs: EXL2 and GPTQ matmul for every
bit mix, shapes the formats allow that are not multiples of 128, decode (M <= 16, several matrices per launch)
and prefill (M > 16) paths."""

import pytest
import torch

import exlcore
from exlcore.ext import extension
from exlcore.formats import gptq
from exlcore.formats.qmatrix import QMatmul, matmul
from test_exl2 import MIXES, random_linear
from test_gptq import make_gptq
from test_quantize import correlated_inputs, output_error
from tiny import max_error

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def ext():
    module = extension()
    assert module is not None, "the CUDA extension did not build"
    return module


@pytest.mark.parametrize("n", [96, 4128])
@pytest.mark.parametrize("mix", sorted(MIXES))
def test_dequantize_kernel_is_exact(ext, mix, n):
    lin = random_linear(MIXES[mix], n=n, seed=n)
    packed = {k: v.cuda() for k, v in lin.pack().items()}
    kernel = QMatmul.exl2(ext, packed, "layer", lin.codes.shape[0], n)
    assert torch.equal(kernel.weight().cpu(), lin.dequantize())


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 13, 16, 17, 300])
@pytest.mark.parametrize("mix", sorted(MIXES))
def test_matmul_matches_reference(ext, mix, m):
    lin = random_linear(MIXES[mix], n=224, seed=m)
    k = lin.codes.shape[0]
    kernel = QMatmul.exl2(ext, {s: v.cuda() for s, v in lin.pack().items()}, "layer", k, 224)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).half()
    expected = x.double() @ lin.dequantize().double().T
    # x as the head of a buffer that continues with NaN: a kernel reading past row m fails the check.
    poisoned = torch.cat([x, torch.full((16, k), float("nan")).half()]).cuda()
    got = kernel(poisoned[:m]).double().cpu()
    assert float((got - expected).norm() / expected.norm()) < 2e-3


@pytest.mark.parametrize("m", [1, 3, 4, 13, 16])
@pytest.mark.parametrize("k", [4096, 10240, 14336])
def test_matmul_split_over_many_slices(ext, k, m):
    """K long enough that each column tile is split over many slices (up to 56: 448 chunks, 8 at least per slice),
    whose partial sums the last slice in adds up, at M > 1 through groups of slices (the last one shorter at K =
    10240); N = 96 leaves part of a warp's columns past the end. Twice: the second call checks that the counters were
    left at zero."""
    lin = random_linear([(b, 128) for b in (6, 5, 4, 3) for _ in range(k // 512)], n=96, seed=k + m)
    kernel = QMatmul.exl2(ext, {s: v.cuda() for s, v in lin.pack().items()}, "layer", k, 96)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).half()
    expected = x.double() @ lin.dequantize().double().T
    for _ in range(2):
        got = kernel(x.cuda()).double().cpu()
        assert float((got - expected).norm() / expected.norm()) < 2e-3


@pytest.mark.parametrize("m", [1, 3, 16, 40])
@pytest.mark.parametrize("act", [0, 1], ids=["silu", "gelu"])
def test_gated_matmul(ext, act, m):
    """matmul with `up`: act(x) * up as the input, computed as the decode kernel gathers x (M <= 16) or by act_mul
    first (prefill): the same bits as act_mul and a plain matmul, and the reference within tolerance."""
    lin = random_linear(MIXES["4/3 g128"], n=224, seed=m + act)
    k = lin.codes.shape[0]
    kernel = QMatmul.exl2(ext, {s: v.cuda() for s, v in lin.pack().items()}, "down", k, 224)
    g = torch.Generator().manual_seed(m)
    gate, up = (torch.randn(2, m, k, generator=g) * 3).half().cuda()
    x = ext.act_mul(gate, up, act)
    got = matmul([kernel], gate, up, act)[0]
    assert torch.equal(got, kernel(x))
    expected = x.double().cpu() @ lin.dequantize().double().T
    assert float((got.double().cpu() - expected).norm() / expected.norm()) < 2e-3


def test_padded_head_and_batched_input(ext):
    """An lm_head whose vocab (200) is padded to 224 in the file: the padding never shows."""
    lin = random_linear(MIXES["4/3 g128"], n=224, seed=9)
    kernel = QMatmul.exl2(ext, {s: v.cuda() for s, v in lin.pack().items()}, "lm_head", 480, 200)
    x = torch.randn(2, 3, 480).half().cuda()
    y = kernel(x)
    assert y.shape == (2, 3, 200)
    expected = x.double().cpu() @ lin.dequantize()[:200].double().T
    assert float((y.double().cpu() - expected).norm() / expected.norm()) < 2e-3


# Matrices sharing one input (K = 448), as (layouts, widths): q/k/v-like, one of them split over many slices; and
# one so wide that each column tile is one work item over all of K (written straight out) beside a narrow one.
SHARED_INPUT = {
    "q/k/v-like": ([[(4, 128)] * 2 + [(3, 128), (3, 64)], [(8, 32), (6, 64), (5, 32), (4, 160), (2, 160)], [(6, 448)]],
                   [4096, 96, 224]),
    "wide and narrow": ([[(8, 32), (6, 64), (5, 32), (4, 160), (2, 160)], [(4, 192), (3, 256)]], [131072, 96]),
}


@pytest.mark.parametrize("m", [1, 4, 16, 40])
@pytest.mark.parametrize("case", sorted(SHARED_INPUT))
def test_matrices_sharing_an_input_in_one_launch(ext, case, m):
    """Every matrix right, twice: the second call checks that the slice counters were left at zero."""
    lins = [random_linear(layout, n=n, seed=n) for layout, n in zip(*SHARED_INPUT[case])]
    kernels = [QMatmul.exl2(ext, {s: v.cuda() for s, v in lin.pack().items()}, "layer", 448, lin.codes.shape[1])
               for lin in lins]
    x = torch.randn(m, 448, generator=torch.Generator().manual_seed(m)).half()
    for _ in range(2):
        for lin, y in zip(lins, matmul(kernels, x.cuda())):
            expected = x.double() @ lin.dequantize().double().T
            assert float((y.double().cpu() - expected).norm() / expected.norm()) < 2e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prefill_in_column_slices_and_bf16(ext, dtype):
    """K x N over 2^23 weights: prefill dequantizes a slice of columns at a time; bf16 activations (which the
    fp16 decode kernel cannot take) go the same way at any M."""
    lin = random_linear([(4, 128)] * 8 + [(3, 128)] * 8, n=4160, seed=3)
    kernel = QMatmul.exl2(ext, {s: v.cuda() for s, v in lin.pack().items()}, "layer", 2048, 4160)
    for m in (1, 40):
        x = torch.randn(m, 2048, generator=torch.Generator().manual_seed(m)).to(dtype)
        expected = x.double() @ lin.dequantize().double().T
        got = kernel(x.cuda())
        assert got.dtype == dtype
        assert float((got.double().cpu() - expected).norm() / expected.norm()) < 1e-2


@pytest.mark.parametrize("m", [1, 7, 33])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("v2", [False, True])
def test_gptq_matmul_matches_reference(ext, m, act_order, v2):
    tensors, *_ = make_gptq(1024, 160, 128, act_order, v2, seed=m)
    kernel = QMatmul.gptq(ext, {s: t.cuda() for s, t in tensors.items()}, "layer", 1024, 160, v2)
    w = gptq.dequantize(tensors, "layer", 1024, v2)
    assert torch.equal(kernel.weight().cpu(), w)
    x = torch.randn(m, 1024, generator=torch.Generator().manual_seed(m)).half()
    expected = x.double() @ w.double().T
    assert float((kernel(x.cuda()).double().cpu() - expected).norm() / expected.norm()) < 2e-3


def test_one_launch_takes_one_format(ext):
    """EXL2 and GPTQ matrices of one input cannot share a launch (the kernel is built for one format): one clear
    error, not wrong numbers."""
    lin = random_linear(MIXES["4/3 g128"], n=160, seed=1)
    k = lin.codes.shape[0]
    exl2_kernel = QMatmul.exl2(ext, {s: v.cuda() for s, v in lin.pack().items()}, "layer", k, 160)
    tensors, *_ = make_gptq(k, 160, 32, False, False)
    gptq_kernel = QMatmul.gptq(ext, {s: t.cuda() for s, t in tensors.items()}, "layer", k, 160, False)
    with pytest.raises(RuntimeError, match="all EXL2 or all GPTQ"):
        matmul([exl2_kernel, gptq_kernel], torch.randn(1, k).half().cuda())


def test_packed_linears_with_bias_sharing_one_launch(tmp_path, tiny_tokenizer_dir):
    """q/k/v and gate/up with biases go through one launch each (layers.project), biases added after."""
    from test_exl2 import to_exl2
    from tiny import make_tiny

    make_tiny("llama_bias_mha", tmp_path / "hf", tiny_tokenizer_dir)
    to_exl2(tmp_path / "hf", tmp_path / "exl2")
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(0))
    reference = exlcore.load(tmp_path / "exl2", device="cpu").forward(ids)
    model = exlcore.load(tmp_path / "exl2", device="cuda", dtype=torch.float16)
    assert model.layers[0].attn.q.kernel is not None and model.layers[0].attn.q.bias is not None
    got = model.forward(ids).cpu()
    assert max_error(got, reference) < 1e-2


@pytest.mark.parametrize("name", ["llama", "mixtral", "gemma2"])
def test_exl2_models_on_gpu_match_the_cpu_reference(name):
    from test_exl2_compat import FIXTURES
    from safetensors.torch import load_file

    ids = load_file(FIXTURES / name / "exllamav2_logits.safetensors")["ids"]
    reference = exlcore.load(FIXTURES / name, device="cpu").forward(ids)
    model = exlcore.load(FIXTURES / name, device="cuda", dtype=torch.float16)
    assert model.layers[0].attn.q.kernel is not None
    got = model.forward(ids).cpu()
    assert max_error(got, reference) < 1e-2
    # Greedy decoding (through CUDA graphs where the model allows them) picks, at every step, a token the
    # uncached forward over the whole sequence also ranks top (up to fp16 near-ties).
    prompt = ids[0, :16].tolist()
    tokens = list(exlcore.Generator(model, max_seq_len=300).tokens(prompt, 40, temperature=0, stop_ids=set()))
    full = model.forward(torch.tensor([prompt + tokens[:-1]]))[0, 15:]
    chosen = full.gather(-1, torch.tensor(tokens, device=full.device)[:, None])[:, 0]
    assert float((full.max(-1).values - chosen).max()) < 0.02 * float(full.abs().max())


DTYPES = [torch.float16, torch.bfloat16, torch.float32]
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}


def rel(a, b) -> float:
    return float((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dim", [64, 576, 4096, 5000, 12288, 32768, 40000])
def test_rms_norm(ext, dtype, dim):
    x = torch.randn(3, 7, dim, dtype=dtype) * 3
    w = torch.randn(dim) + 1
    xf = x.double()
    expected = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
    assert rel(ext.rms_norm(x.cuda(), w.cuda(), 1e-5), expected) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dim", [16, 64, 128, 256])
def test_rotary(ext, dtype, dim):
    from exlcore.rope import RopeConfig, Rotary, apply_rotary

    rotary = Rotary(RopeConfig(theta=10000.0), dim)
    rotary.prepare(600, torch.device("cpu"))
    x = torch.randn(2, 5, 3, dim, dtype=dtype)
    positions = torch.randint(0, 600, (2, 5))
    expected = apply_rotary(x.double(), rotary.cos[positions][:, :, None].double(), rotary.sin[positions][:, :, None].double())
    got = x.cuda()
    ext.rotary_(got, rotary.cos.cuda(), rotary.sin.cuda(), positions.cuda())
    assert rel(got, expected) < TOL[dtype]


SHAPES = [(1, 1), (3, 1), (1, 5), (3, 5)]  # (B, T): decode and prefill, one sequence and several


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,T", SHAPES)
@pytest.mark.parametrize("heads,kv_heads,dim", [(8, 2, 64), (4, 1, 256), (3, 3, 64)])
def test_rotary_cache(ext, dtype, B, T, heads, kv_heads, dim):
    """Rotary on q and k and the KV-cache write in one launch: the same bits as the launches it replaces
    (rotary_ on q and k, KVCache.update's indexed write of k and v), and the float64 reference within rounding.
    The rows of positions differ: each rotates by its own and writes its own slots; every other cache slot is left
    as it was."""
    from exlcore.rope import RopeConfig, Rotary, apply_rotary

    S = 600
    g = torch.Generator().manual_seed(B * 100 + T * 10 + dim)
    rotary = Rotary(RopeConfig(theta=10000.0), dim)
    rotary.prepare(S, torch.device("cuda"))
    positions = torch.stack([torch.randperm(S, generator=g)[:T] for _ in range(B)])
    q = torch.randn(B, T, heads, dim, generator=g).to(dtype)
    k, v = torch.randn(2, B, T, kv_heads, dim, generator=g).to(dtype)
    caches = torch.randn(2, B, kv_heads, S, dim, generator=g).to(dtype)
    q, k, v, caches, positions = q.cuda(), k.cuda(), v.cuda(), caches.cuda(), positions.cuda()
    rows = torch.arange(B, device="cuda")[:, None]

    q_ref, k_ref, k_cache_ref, v_cache_ref = q.clone(), k.clone(), caches[0].clone(), caches[1].clone()
    ext.rotary_(q_ref, rotary.cos, rotary.sin, positions)
    ext.rotary_(k_ref, rotary.cos, rotary.sin, positions)
    k_cache_ref[rows, :, positions] = k_ref
    v_cache_ref[rows, :, positions] = v
    q_in = q.clone()
    ext.rotary_cache_(q, k, v, rotary.cos, rotary.sin, positions, caches[0], caches[1])
    assert torch.equal(q, q_ref) and torch.equal(caches[0], k_cache_ref) and torch.equal(caches[1], v_cache_ref)

    cos, sin = rotary.cos[positions][:, :, None].double(), rotary.sin[positions][:, :, None].double()
    assert rel(q, apply_rotary(q_in.double(), cos, sin)) < TOL[dtype]
    assert rel(caches[0][rows, :, positions], apply_rotary(k.double(), cos, sin)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 5, 4096, 4097, 128256])
def test_argmax(ext, dtype, n):
    """Greedy sampling's argmax is torch.argmax's, ties and NaN included: rows of random values, of repeated
    maxima (the first wins), of -inf only, and with NaN (the first NaN wins)."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(6, n, generator=g).to(dtype)
    x[1] = x[1].round()  # many ties at the maximum
    x[1, n // 2:] = x[1].max()
    x[2] = float("-inf")
    x[3, torch.randint(0, n, (2,), generator=g)] = float("nan")
    x[4, -1] = float("inf")
    x[5, 0] = x[5].max()  # the maximum at index 0 and again elsewhere
    x = x.cuda()
    assert torch.equal(ext.argmax(x), x.argmax(-1))


@pytest.mark.parametrize("dtypes", [(t, t) for t in DTYPES] + [(torch.float32, torch.float16),
                                                                (torch.float32, torch.bfloat16)], ids=str)
@pytest.mark.parametrize("B,T", SHAPES)
@pytest.mark.parametrize("dim", [64, 576, 4096, 5000, 12288, 32768, 40000])
def test_add_rms_norm(ext, dtypes, B, T, dim):
    """RMSNorm.add_forward, x + h and the norm of the rounded sum in one launch (x fp32 under fp16/bf16 h is
    Gemma's residual stream; rows past 32768 elements in ATen): the same bits as the add, rms_norm and .to it
    replaces, x left as it was, and the CPU reference within rounding (its fp32 sum of squares runs in another
    order)."""
    from exlcore.layers import RMSNorm

    x_dtype, h_dtype = dtypes
    g = torch.Generator().manual_seed(B * 10000 + T * 1000 + dim)
    x = (torch.randn(B, T, dim, generator=g) * 3).to(x_dtype)
    h = (torch.randn(B, T, dim, generator=g) * 3).to(h_dtype)
    norm = RMSNorm("norm", dim, 1e-5)
    norm.weight = torch.randn(dim, generator=g) + 1
    ref_sum, ref_out = norm.add_forward(x, h)
    x, h, norm.weight = x.cuda(), h.cuda(), norm.weight.cuda()
    x_in = x.clone()
    s, out = norm.add_forward(x, h)
    assert s.dtype == x_dtype and out.dtype == h_dtype and torch.equal(x, x_in)

    unfused = x + h.to(x_dtype)
    assert torch.equal(s, unfused) and torch.equal(out, ext.rms_norm(unfused, norm.weight, 1e-5).to(h_dtype))
    assert rel(s, ref_sum) < TOL[x_dtype] and rel(out, ref_out) < TOL[h_dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", [0, 1])
def test_act_mul(ext, dtype, act):
    gate, up = torch.randn(2, 3, 1000, dtype=dtype) * 3, torch.randn(2, 3, 1000, dtype=dtype)
    g = gate.double()
    a = torch.nn.functional.silu(g) if act == 0 else torch.nn.functional.gelu(g, approximate="tanh")
    assert rel(ext.act_mul(gate.cuda(), up.cuda(), act), a * up.double()) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads,kv_heads,dim,window,softcap,kv_len", [
    (4, 4, 64, 0, 0.0, 256), (8, 2, 128, 0, 0.0, 1000), (9, 3, 64, 7, 0.0, 256), (4, 2, 256, 0, 20.0, 1000),
    (8, 1, 128, 300, 0.0, 1000), (24, 2, 80, 0, 0.0, 100), (4, 2, 64, 0, 0.0, 32), (8, 2, 128, 5, 0.0, 17),
    (4, 4, 64, 0, 0.0, 1), (8, 2, 128, 0, 0.0, 5000), (8, 2, 128, 3000, 0.0, 20000), (4, 4, 128, 0, 0.0, 1024),
    (9, 3, 64, 0, 20.0, 1500), (24, 2, 80, 0, 0.0, 2000), (4, 2, 256, 0, 0.0, 3000), (8, 2, 72, 0, 0.0, 600),
])
@pytest.mark.parametrize("rotary", [True, False], ids=["rotary", "no-rotary"])
def test_decode_attention(ext, dtype, heads, kv_heads, dim, window, softcap, kv_len, rotary):
    """The new token's q and k rotated and its k and v written to the caches at its position (the same bits as
    rotary_ and a copy; nothing else in the caches changes), then attention split over keys, with splits that see no
    key, windows that cross splits, and 1, 2, 3, 4, 8 and 12 query heads per KV head (each size the scalar kernel is
    unrolled for, one short of it, and over 8, taken in slices). fp32, fp16 rows of 72 and rows of 256 under 1024
    keys take the scalar kernel, in blocks of 64 keys and more (32 for rows of 256, all that shared memory holds;
    kv_len within one block: one block, which writes the output itself); other fp16 and bf16 rows the tensor-core
    one, in blocks of 64-key tiles (4 to 32 splits; 20000 keys: 10 tiles through a ring of 3, a window across them).
    Twice: the kernel must leave its counters at zero."""
    from exlcore.attention import explicit_attention
    from exlcore.rope import RopeConfig, Rotary

    B, S = 3, kv_len + 64
    g = torch.Generator().manual_seed(kv_len * 1000 + heads * 10 + dim)
    q = torch.randn(B, heads, dim, generator=g).to(dtype)
    k_new, v_new = torch.randn(2, B, kv_heads, dim, generator=g).to(dtype)
    k, v = torch.randn(2, B, kv_heads, S, dim, generator=g).to(dtype)
    positions = torch.tensor([0, kv_len // 2, kv_len - 1])
    tables, q_rot, k_rot = (None, None), q.cuda(), k_new.cuda()
    if rotary:
        rope = Rotary(RopeConfig(theta=10000.0), dim)
        rope.prepare(S, torch.device("cuda"))
        tables = (rope.cos, rope.sin)
        for x in (q_rot, k_rot):
            ext.rotary_(x[:, None], rope.cos, rope.sin, positions[:, None].cuda())
    k_expected, v_expected = k.clone(), v.clone()
    k_expected[torch.arange(B), :, positions] = k_rot.cpu()
    v_expected[torch.arange(B), :, positions] = v_new
    j = torch.arange(kv_len)
    mask = j <= positions[:, None]
    if window:
        mask &= j > positions[:, None] - window
    scale = dim**-0.5
    expected = explicit_attention(q_rot.cpu().double()[:, :, None], k_expected[:, :, :kv_len].double(),
                                  v_expected[:, :, :kv_len].double(), mask[:, None, None], scale, softcap or None)[:, :, 0]
    counters = torch.zeros(B * heads, dtype=torch.int32, device="cuda")
    for _ in range(2):
        k_cache, v_cache = k.cuda(), v.cuda()
        got = ext.decode_attention(q.cuda(), k_new.cuda(), v_new.cuda(), k_cache, v_cache, *tables, positions.cuda(),
                                   kv_len, window, scale, softcap, counters)
        assert torch.equal(k_cache.cpu(), k_expected) and torch.equal(v_cache.cpu(), v_expected)
        assert rel(got, expected) < TOL[dtype]
        assert not counters.any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("heads,kv_heads,dim,window,softcap,kv_len", [
    (8, 2, 128, 0, 0.0, 1000), (4, 4, 64, 0, 0.0, 1), (9, 3, 64, 7, 0.0, 256), (8, 1, 128, 300, 0.0, 1000),
    (4, 2, 256, 0, 20.0, 200), (8, 2, 128, 0, 0.0, 8001), (4, 2, 96, 0, 0.0, 600), (8, 2, 128, 5, 0.0, 17),
])
def test_decode_attention_quantized_cache(ext, dtype, bits, heads, kv_heads, dim, window, softcap, kv_len):
    """Over a quantized cache (exlcore.cache's format): the new token's rotated k and v written as
    exlcore.cache.quantize codes them (bit for bit; nothing else changes), and attention over what the cache
    holds, dequantize's keys and values, within the dtype's tolerance of the reference. Rows of 64 to 256, 1 to
    8001 keys (32 splits through a ring of three tiles), windows and soft-capping; twice, for the counters."""
    from exlcore.attention import explicit_attention
    from exlcore.cache import dequantize, quantize
    from exlcore.rope import RopeConfig, Rotary

    B, S = 3, -(-(kv_len + 1) // 64) * 64
    g = torch.Generator().manual_seed(kv_len * 1000 + heads * 10 + dim + bits)
    q = torch.randn(B, heads, dim, generator=g).to(dtype)
    k_new, v_new = torch.randn(2, B, kv_heads, dim, generator=g).to(dtype)
    k_new[..., 3] *= 20  # an outlier channel, as rotated keys have
    caches = [quantize(torch.randn(B, kv_heads, S, dim, generator=g), bits) for _ in range(2)]
    positions = torch.tensor([0, kv_len // 2, kv_len - 1])
    rope = Rotary(RopeConfig(theta=10000.0), dim)
    rope.prepare(S, torch.device("cuda"))
    q_rot, k_rot = q.cuda(), k_new.cuda()
    for x in (q_rot, k_rot):
        ext.rotary_(x[:, None], rope.cos, rope.sin, positions[:, None].cuda())
    rows = torch.arange(B)
    expected_caches = [(c.clone(), s.clone()) for c, s in caches]
    for (c, s), new in zip(expected_caches, (k_rot.cpu(), v_new)):
        c[rows, :, positions], s[rows, :, positions] = quantize(new, bits)
    k_ref, v_ref = (dequantize(c[:, :, :kv_len], s[:, :, :kv_len], bits, torch.float64) for c, s in expected_caches)
    j = torch.arange(kv_len)
    mask = j <= positions[:, None]
    if window:
        mask &= j > positions[:, None] - window
    expected = explicit_attention(q_rot.cpu().double()[:, :, None], k_ref, v_ref, mask[:, None, None], dim**-0.5,
                                  softcap or None)[:, :, 0]
    counters = torch.zeros(B * heads, dtype=torch.int32, device="cuda")
    for _ in range(2):
        (kc, ks), (vc, vs) = [(c.cuda(), s.cuda()) for c, s in caches]
        got = ext.decode_attention(q.cuda(), k_new.cuda(), v_new.cuda(), kc, vc, rope.cos, rope.sin,
                                   positions.cuda(), kv_len, window, dim**-0.5, softcap, counters, ks, vs)
        for got_cache, want in zip((kc, ks, vc, vs), (t for pair in expected_caches for t in pair)):
            assert torch.equal(got_cache.cpu(), want)
        assert rel(got, expected) < 2 * TOL[dtype]
        assert not counters.any()


@pytest.mark.parametrize("option", ["4b_128g", "0.05:8b_32g/0.2:3b_64g/0.75:2b_64g", "0.3:6b_32g/0.7:5b_128g"])
def test_gptq_kernels_follow_the_reference(ext, option):
    """GPTQ's row loop and the scale search as kernels against the PyTorch loop on the CPU: the same codes
    bar rare rounding ties, the same output error. K = 352 ends in a group the row steps split unevenly."""
    from exlcore.formats.exl2 import group_layout, parse_option
    from exlcore.quantize import gptq, hessian

    k = 352
    x = correlated_inputs(2048, k, seed=len(option))
    g = torch.Generator().manual_seed(len(option))
    ws = [torch.randn(n, k, generator=g) * 0.05 for n in (96, 64)]
    layouts = [group_layout(k, parse_option(option)), group_layout(k, parse_option("0.1:4b_64g/0.9:3b_32g"))]
    h = hessian(x)
    cpu = gptq(ws, layouts, h)
    gpu = gptq([w.cuda() for w in ws], layouts, h.cuda())
    for w, a, b in zip(ws, cpu, gpu):
        assert (a.codes == b.codes.cpu()).float().mean() > 0.99
        assert output_error(b, w, x) == pytest.approx(output_error(a, w, x), rel=0.02)


def test_scale_search_kernel_matches_reference(ext):
    from exlcore.formats.exl2 import group_scales

    g = torch.Generator().manual_seed(3)
    w = torch.randn(96, 640, generator=g) * torch.rand(640, generator=g)
    seg = torch.arange(640) // 160
    for bits in (2, 3, 4, 5, 6, 8):
        codes, smax = group_scales(w, bits, seg, 4)
        codes_gpu, smax_gpu = group_scales(w.cuda(), bits, seg.cuda(), 4)
        assert torch.equal(codes, codes_gpu.cpu())
        assert torch.allclose(smax.float(), smax_gpu.cpu().float(), rtol=2e-2)  # a tie may pick a neighbour
