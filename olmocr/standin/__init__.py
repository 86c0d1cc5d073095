"""A stand-in for `vllm serve` used by tests, the CPU demo and the benchmarks (see docs/standin.md)."""
