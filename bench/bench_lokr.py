"""LoKr: peftkit vs Hugging Face peft, side by side in one process (bench_vs_peft.py with LoKr's spec).

LoKr r=8 on all linear layers of bench_lora.py's Llama. PEFT builds the
dense kron(w1, w2) of every layer in every forward; peftkit applies the two
factors to the input instead (docs/methods/lokr.md).

Run: .venv/bin/python bench/bench_lokr.py [--repeats 7]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from bench_vs_peft import main  # noqa: E402

if __name__ == "__main__":
    main("lokr[r=8,alpha=16,init_weights=false,target_modules=all-linear]")
