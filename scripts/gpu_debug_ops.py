import numpy as np, sys
sys.path.insert(0, '.')
from aquakv_gguf.quant import gaussian_grid
from aquakv_gguf.runtime.ops import encode_rows, decode_rows, split_rows
for C, G, n in ((128, 128, 16), (192, 64, 16)):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((4, C))).astype(np.float32)
    g = gaussian_grid(n)
    cpu = encode_rows(x, g, G); gpu = encode_rows(x, g, G, gpu=True)
    print("C", C, "G", G, "row bytes", cpu.shape[1])
    print(" norms", [np.linalg.norm(x[0, i:i+G]) for i in range(0, C, G)])
    c1, s1 = split_rows(cpu, C, G, 4); c2, s2 = split_rows(gpu, C, G, 4)
    print(" cpu scales", s1[:2]); print(" gpu scales", s2[:2])
    print(" codes equal", np.mean(c1 == c2))
    print(" cpu bytes", cpu[0].tolist()); print(" gpu bytes", gpu[0].tolist())
    d1 = decode_rows(cpu, g, C, G); d2 = decode_rows(cpu, g, C, G, gpu=True)
    print(" decode max diff", np.abs(d1 - d2).max(), "scale", np.abs(d1).max())
