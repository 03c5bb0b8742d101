"""The instruction-level backend: guest code runs in Unicorn; the only package that imports unicorn."""
