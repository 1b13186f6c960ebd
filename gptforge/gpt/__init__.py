"""The GPT model, its tokenizers and generation. Knows nothing about distributed training."""
