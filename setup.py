from setuptools import find_packages, setup

setup(
    name="gptforge",
    version="0.1.0",
    description="A GPT trained from scratch, made fast: our own Triton kernels, DDP and DeepSpeed",
    python_requires=">=3.11",
    # One import name: everything lives under gptforge (tests/ and benchmarks/ are not installed).
    packages=find_packages(include=["gptforge", "gptforge.*"]),
    package_data={"gptforge.train": ["configs/*.toml", "slurm/*"]},
    entry_points={
        "console_scripts": [
            "gptforge-train = gptforge.train.__main__:main",
            "gptforge-data = gptforge.data.cli:main",
            "gptforge-sample = gptforge.gpt.sample:main",
        ],
    },
    install_requires=[
        "torch>=2.4",
        "triton; platform_system == 'Linux'",
        "tiktoken",
        "sentencepiece>=0.2",  # tokenizers trained on the user's corpus (gptforge/gpt/tokenizer_training.py)
        "tokenizers>=0.20",  # byte-level BPE; 0.20 brought encode_batch_fast
        "pyarrow",  # Parquet corpora (gptforge/data/inputs.py)
        "zstandard",  # .jsonl.zst corpora
        "deepspeed",
        "numpy",
        "safetensors",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        # the trackers' tests read TensorBoard's event files and W&B's offline run files back
        "dev": ["pytest", "pytest-xdist", "pytest-benchmark", "ruff", "transformers", "tensorboard", "wandb"],
        "flash": ["flash-attn"],
        "tensorboard": ["tensorboard"],  # --tensorboard_log
        "wandb": ["wandb"],  # --wandb_log
    },
)
