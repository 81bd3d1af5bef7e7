"""python -m engine.demo [models_dir]: write the FLUX.1-dev random demo (default folder ./models)."""
import sys
import time

from .flux1 import write_demo_model

t0 = time.time()
path = write_demo_model(sys.argv[1] if len(sys.argv) > 1 else "models")
print(f"{path} ({time.time() - t0:.1f}s)")
