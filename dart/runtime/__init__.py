"""Runtimes that drive a patched model: the compiled decode loop (`fast`), export (`export`),
the torch-only package runner (`runner`) and plain HF generation (`generation`). Kept empty so
that `dart.runtime.runner` imports with torch alone."""
