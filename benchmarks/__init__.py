"""Speed benchmarks of the decoders against transformers; run `python -m benchmarks.speed`."""
