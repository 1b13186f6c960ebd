"""GPT from scratch, made fast: one import name for the whole project.

The parts import one way only, each from the ones below it:

    gptforge.kernels  custom kernels (Triton, SDPA, flash-attn) behind one interface
    gptforge.gpt      the model, tokenizers, KV-cached generation, GPT-2 weights in and out
    gptforge.data     datasets and sharded corpora: download, prepare, manifests, verify
    gptforge.train    the training loop, strategies, checkpoints and the command line

Nothing is imported here, so ``python -m gptforge.train --help`` answers without loading torch.
"""

__version__ = "0.1.0"
