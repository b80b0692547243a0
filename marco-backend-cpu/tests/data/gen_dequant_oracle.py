"""Regenerates dequant_oracle.json: random ggml blocks decoded by gguf-py (the ggml project's own
numpy codecs, an implementation independent of this crate), and smollm2_q4_1_oracle.json:
statistics of real tensors of the default model decoded the same way.

Usage: python gen_dequant_oracle.py [path/to/SmolLM2-135M-Instruct.Q4_1.gguf]
Requires: pip install gguf==0.19.0 numpy
"""
import json
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

rng = np.random.default_rng(20261126)

# (type, byte offsets of f16 scale fields to overwrite with sane values)
F16_FIELDS = {
    T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
    T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
}


def random_blocks(ty, n_blocks):
    block_size, type_size = gguf.GGML_QUANT_SIZES[ty]
    if ty == T.F32:
        return rng.standard_normal(n_blocks).astype("<f4").tobytes()
    if ty == T.F16:
        return rng.standard_normal(n_blocks).astype("<f2").tobytes()
    if ty == T.BF16:
        bits = rng.standard_normal(n_blocks).astype("<f4").view("<u4") >> 16
        return bits.astype("<u2").tobytes()
    raw = bytearray(rng.integers(0, 256, size=n_blocks * type_size, dtype=np.uint8).tobytes())
    for b in range(n_blocks):
        for off in F16_FIELDS[ty]:
            v = np.float16(rng.uniform(-0.1, 0.1)).tobytes()
            raw[b * type_size + off: b * type_size + off + 2] = v
    return bytes(raw)


cases = []
for ty in [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0,
           T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]:
    block_size, type_size = gguf.GGML_QUANT_SIZES[ty]
    n_blocks = 3 if block_size > 1 else 40
    data = random_blocks(ty, n_blocks)
    values = dequantize(np.frombuffer(data, dtype=np.uint8), ty).astype(np.float32).reshape(-1)
    cases.append({"type": ty.name, "id": int(ty), "n_elements": n_blocks * block_size,
                  "hex": data.hex(), "values": [float(v) for v in values]})
with open("dequant_oracle.json", "w") as f:
    json.dump({"generator": "gguf-py " + "0.19.0", "cases": cases}, f)

if len(sys.argv) > 1:
    r = gguf.GGUFReader(sys.argv[1])
    tensors = []
    for t in r.tensors:
        if t.name not in ("token_embd.weight", "blk.0.ffn_down.weight", "blk.29.attn_q.weight",
                          "blk.0.attn_norm.weight", "output_norm.weight"):
            continue
        values = dequantize(t.data, t.tensor_type).astype(np.float64).reshape(-1)
        tensors.append({"name": t.name, "type": t.tensor_type.name, "n_elements": int(t.n_elements),
                        "data_offset": int(t.data_offset), "n_bytes": int(t.n_bytes),
                        "first": [float(v) for v in values[:64].astype(np.float32)],
                        "sum": float(values.sum()), "sum_sq": float((values * values).sum()),
                        "min": float(values.min()), "max": float(values.max())})
    with open("smollm2_q4_1_oracle.json", "w") as f:
        json.dump({"sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                   "tensors": tensors}, f, indent=1)
