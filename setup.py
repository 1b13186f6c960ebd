from setuptools import find_packages, setup

setup(
    name="gpt-from-scratch",
    version="0.1.0",
    description="A GPT trained from scratch, made fast: our own Triton kernels, DDP and DeepSpeed",
    python_requires=">=3.10",
    packages=find_packages(include=["kernels", "kernels.*", "gpt", "gpt.*", "train", "train.*"]),
    package_data={"train": ["configs/*.toml"]},
    install_requires=[
        "torch>=2.4",
        "triton; platform_system == 'Linux'",
        "tiktoken",
        "sentencepiece>=0.2",  # tokenizers trained on the user's corpus (gpt/tokenizer_training.py)
        "tokenizers>=0.20",  # byte-level BPE; 0.20 brought encode_batch_fast
        "pyarrow",  # Parquet corpora (train/corpus.py)
        "zstandard",  # .jsonl.zst corpora
        "deepspeed",
        "numpy",
        "safetensors",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "dev": ["pytest", "pytest-benchmark", "ruff", "transformers"],
        "flash": ["flash-attn"],
    },
)
