"""`python -m llama_cpp.server`, with the same AMX workaround the rbee worker applies.

Without it, llama-cpp-python segfaults on quantised models on Intel AMX CPUs
(llama.cpp#20824), so the comparison would not run there at all. The workaround is for CPU
weights only: with --n_gpu_layers other than 0 the layers live on the GPU.
"""

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worker.engine import extra_buffer_types_wanted, model_params

args = sys.argv[1:]
gpu = "--n_gpu_layers" in args and args[args.index("--n_gpu_layers") + 1] != "0"
with model_params(use_extra_bufts=extra_buffer_types_wanted("cuda" if gpu else "cpu")):
    runpy.run_module("llama_cpp.server", run_name="__main__")
