"""Benchmarks of the proxy against real llama.cpp servers."""
