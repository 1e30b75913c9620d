"""Side-by-side benchmarks against PyTorch (needs the torch extra)."""
