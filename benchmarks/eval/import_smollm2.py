"""Time the real SmolLM2 GGUF import: python benchmarks/eval/import_smollm2.py CACHE_DIR"""
import sys
import time

t = time.time()
from solar_merge.embedded import embedded_model

p = embedded_model(sys.argv[1])
print(f"import: {time.time() - t:.1f} s -> {p}")
t = time.time()
p = embedded_model(sys.argv[1])
print(f"reuse: {time.time() - t:.3f} s")
