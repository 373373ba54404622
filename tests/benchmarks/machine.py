"""What machine a benchmark figure comes from: CPU model, vector extensions, cores, torch threads.
Ratios differ between the CPUs this project has run on (AVX2-only AMD, AVX-512/AMX Intel): every
benchmark prints this line beside its figures."""

from __future__ import annotations

import os
import platform

import torch

VECTOR_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_description() -> str:
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    vector = [flag for flag in VECTOR_FLAGS if flag in flags] or ["none of " + "/".join(VECTOR_FLAGS)]
    return (
        f"{model}; vector: {' '.join(vector)}; {os.cpu_count()} cores, torch {torch.__version__} "
        f"with {torch.get_num_threads()} threads"
    )
