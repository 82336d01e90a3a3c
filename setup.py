"""mmjax: fine-tuning vision, language and vision-language models in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="mmjax",
    version="0.1.0",
    description="JAX/Flax fine-tuning of LLaMA-style, ViT and VLM models with hand-written LoRA.",
    packages=find_packages(include=["mmjax", "mmjax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7",
        "flax>=0.11",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.12",
        "ml-collections>=1.0",
        "absl-py",
        "numpy",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "tensorboardX>=2.6",
        "tqdm",
        "jinja2",
        "pillow",
        "matplotlib",
        "scipy",
        "av",  # PyAV: video files (mp4, webm, avi, mkv) decoded into frames
    ],
    extras_require={
        "cuda12": ["jax[cuda12]"],
        "tfds": ["tensorflow-datasets>=4.9"],
        # torch 2.13.0 is the CPU build; a looser pin pulls a multi-GB CUDA wheel.
        "test": ["pytest>=8", "pytest-xdist", "chex", "torch==2.13.0", "transformers>=4.50", "peft>=0.15"],
    },
)
