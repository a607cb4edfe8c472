"""Running a model: KV caches, the CUDA-graph decode engine, generation and sampling."""
