from pathlib import Path

from setuptools import find_packages, setup

EXAMPLES = ["tqdm", "tensorboard", "scikit-learn>=1.3", "scikit-image>=0.22"]
DEV = ["pytest>=8", "hypothesis>=6", "scipy>=1.10", *EXAMPLES]  # scipy: the reference spline in tests/test_transfer.py

setup(
    name="simmim_hf",
    version="0.1.0.dev0",
    description="SimMIM masked image modeling (ViT and Swin) as HuggingFace transformers models, "
    "with accelerate pretraining and fine-tuning scripts",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["simmim_hf", "simmim_hf.*"]),
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "transformers>=5,<6",
        "datasets>=3",
        "accelerate>=1.0",
        "evaluate>=0.4",
        "huggingface-hub>=1.0",
        "safetensors>=0.4",
        "pillow>=10",
        "simplejpeg>=1.6",  # libjpeg-turbo JPEG decoding straight into numpy (the input pipeline's fast path)
        "numpy>=1.24",
        "kornia>=0.7",
    ],
    extras_require={"examples": EXAMPLES, "dev": DEV},
    # The jobs are package modules (`accelerate launch -m simmim_hf.run_pretraining`, or examples/ launchers), so an
    # installed package runs them without the source tree.
    entry_points={"console_scripts": [
        "simmim-pretrain = simmim_hf.run_pretraining:main",
        "simmim-finetune = simmim_hf.run_finetune:main",
        "simmim-convert = simmim_hf.convert:main",
        "simmim-export = simmim_hf.export:main",
    ]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
