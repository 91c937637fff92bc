"""pytest-benchmark machine record: the versions and hardware a number was measured on."""
from __future__ import annotations

import platform

import torch


def pytest_benchmark_update_machine_info(config, machine_info):
    info = {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cpu_model": platform.processor() or platform.machine()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        import faiss

        info["faiss"] = faiss.__version__
    except ImportError:
        pass
    try:
        import pluglm_kernels._C as ext

        info["pluglm_openmp_threads"] = ext.openmp_max_threads()
    except ImportError:
        pass
    machine_info["pluglm"] = info
