"""Training: corpora, tokenizers, token shards, the training loop and its run folders, adapters,
prefix reparameterisation, data parallelism."""
