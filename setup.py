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
