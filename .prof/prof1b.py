import time, torch, sys
from pathlib import Path
from exlcore.conversion import capture as C, measure as M, quant as Q, options
from exlcore.loader import read_model_config
from exlcore.weights import Weights
from exlcore.model import load_module
import exlcore.quantize as QZ
import exlcore.formats.exl2 as E
src = Path(sys.argv[1])
raw, spec, cfg = read_model_config(src)
model = spec.build(cfg)
dev = torch.device("cuda")
w = Weights(src, dev)
model.embed.load(w, torch.float32)
ids = torch.randint(0, 49000, (8, 1024))
states = [model.embed(c.to(dev)).float() for c in C.chunks(ids, 1024)]
block = model.layers[0]
load_module(block, w, torch.float32)
groups = C.groups(block, spec.calibration)
timers = {}
def wrap(mod, name):
    f = getattr(mod, name)
    def g(*a, **k):
        torch.cuda.synchronize(); t = time.time()
        r = f(*a, **k)
        torch.cuda.synchronize(); timers[name] = timers.get(name, 0) + time.time() - t
        return r
    setattr(mod, name, g)
for mod, name in [(QZ, "group_scales"), (QZ, "_inverse_factor"), (M, "gptq"), (M, "run"), (M, "capture"), (Q, "capture"), (Q, "gptq"), (Q, "run")]:
    wrap(mod, name)
with torch.inference_mode():
    torch.cuda.synchronize(); t = time.time()
    errs, _ = M.measure_block(block, model, states, groups, False, 0.01)
    torch.cuda.synchronize(); print("measure", time.time() - t, {k: round(v, 2) for k, v in timers.items()}, flush=True)
    timers.clear()
    strategy = {k: "4b_128g" for k in errs}
    t = time.time()
    Q.quantize_block(block, model, states, groups, False, strategy, 0.01)
    torch.cuda.synchronize(); print("quant", time.time() - t, {k: round(v, 2) for k, v in timers.items()})
    # row-loop cost alone
    h = torch.randn(8192, 8192, device=dev); h = h @ h.T
    ww = torch.randn(2048, 8192, device=dev)
    torch.cuda.synchronize(); t = time.time()
    QZ.gptq([ww], [options.layout("4b_128g", 8192)], h)
    torch.cuda.synchronize(); print("gptq down 1 option", time.time() - t, {k: round(v, 2) for k, v in timers.items()})
