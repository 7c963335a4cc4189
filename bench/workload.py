"""S-LoRA's synthetic workload: gamma (Poisson when cv=1) arrivals, power-law adapter
popularity, uniform input and output lengths (S-LoRA benchmarks/trace.py, re-derived)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Request:
    index: int
    arrival: float  # seconds after the start of the run
    adapter: int  # adapter index
    prompt: list[int]
    output_len: int


@dataclass(frozen=True)
class WorkloadSpec:
    num_requests: int = 200
    num_adapters: int = 100
    rate: float = 10.0  # requests per second
    cv: float = 1.0  # coefficient of variation of the gaps; 1 is Poisson
    alpha: float = 1.0  # popularity: adapter = floor(power(alpha) * n); 1 is uniform
    input_range: tuple[int, int] = (8, 64)  # uniform in [lo, hi)
    output_range: tuple[int, int] = (8, 64)
    vocab: int = 4096
    seed: int = 0


def generate(spec: WorkloadSpec) -> list[Request]:
    rng = np.random.default_rng(spec.seed)
    shape = 1.0 / spec.cv**2
    gaps = rng.gamma(shape, spec.cv**2 / spec.rate, size=spec.num_requests)
    arrivals = np.cumsum(gaps) - gaps[0]
    adapters = np.minimum(
        (rng.power(spec.alpha, size=spec.num_requests) * spec.num_adapters).astype(int),
        spec.num_adapters - 1,
    )
    ins = rng.integers(*spec.input_range, size=spec.num_requests)
    outs = rng.integers(*spec.output_range, size=spec.num_requests)
    requests = []
    for i in range(spec.num_requests):
        # Token 1 is BOS; the rest avoids the special ids 0-2.
        prompt = [1, *rng.integers(3, spec.vocab, size=int(ins[i]) - 1).tolist()]
        requests.append(Request(i, float(arrivals[i]), int(adapters[i]), prompt, int(outs[i])))
    return requests
