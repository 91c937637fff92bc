"""The HEADLINE HOOK of benchmarks/gpu_suite.sh: the cost-of-a-memory pair (PlugLM-BERT-base
forward vs the dense forward, one memory layer vs the dense FFN) on the GPU, CUDA-event
timed in alternating calls; see pluglm/bench/headline.py for the cases and the contract.

    python3 benchmarks/gpu_headline.py OUT_JSON --budget-s S [--dry-run] [--device cpu --tiny]
"""
import sys

from pluglm.bench.headline import main

if __name__ == "__main__":
    sys.exit(main())
