"""`python -m llama_cpp.server`, with the same AMX workaround the rbee worker applies.

Without it, llama-cpp-python segfaults on quantised models on Intel AMX CPUs
(llama.cpp#20824), so the comparison would not run there at all.
"""

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worker.engine import extra_buffer_types_wanted, model_params

with model_params(use_extra_bufts=extra_buffer_types_wanted("cpu")):
    runpy.run_module("llama_cpp.server", run_name="__main__")
