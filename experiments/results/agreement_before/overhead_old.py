import time, statistics, sys, torch
import schedmoe, schedmoe.layer as L
from schedmoe.testing import run_ranks

def rank_fn(rank, world, tokens, steps):
    torch.manual_seed(0)
    layer = schedmoe.MoELayer(512, 8, 1024, 2, 1.25)
    spent = []
    orig_ag, orig_fp = L.all_gather_ints, L.MoEConfig.fingerprint
    acc = [0.0]
    def ag(*a, **k):
        t = time.perf_counter(); r = orig_ag(*a, **k); acc[0] += time.perf_counter() - t; return r
    def fp(self):
        t = time.perf_counter(); r = orig_fp(self); acc[0] += time.perf_counter() - t; return r
    L.all_gather_ints = ag; L.MoEConfig.fingerprint = fp
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(tokens, 512, generator=g).requires_grad_()
    steps_ms, agree_ms = [], []
    for i in range(steps + 3):
        acc[0] = 0.0
        t0 = time.perf_counter()
        y = layer(x); (y.square().mean() + 0.01 * y.l_aux).backward()
        t1 = time.perf_counter()
        if i >= 3:
            steps_ms.append(1e3 * (t1 - t0)); agree_ms.append(1e3 * acc[0])
    return statistics.median(steps_ms), statistics.median(agree_ms)

if __name__ == "__main__":
    res = run_ranks(rank_fn, 4, int(sys.argv[1]), 20, timeout=600)
    for r in res: print("step %.2f ms, agreement %.3f ms (%.2f%%)" % (r[0], r[1], 100 * r[1] / r[0]))
