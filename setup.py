from setuptools import setup

setup(
    name="dicekern",
    version="0.1.0",
    description="DICE: data influence cascades in decentralized (gossip) learning",
    python_requires=">=3.11",
    packages=["dicekern", "dicekern.engine", "dicekern.objectives", "dicekern.kernels", "dicekern.bindings"],
    # kernels/ and bindings/ sit at the top level of the repository but install inside the
    # package, so they never claim the generic import names `kernels` and `bindings`.
    package_dir={"dicekern": "dicekern", "dicekern.kernels": "kernels", "dicekern.bindings": "bindings"},
    install_requires=["torch>=2.4", "triton", "numpy", "networkx", "scikit-learn", "matplotlib", "tqdm", "safetensors"],
    extras_require={"test": ["pytest", "pytest-benchmark"]},
)
