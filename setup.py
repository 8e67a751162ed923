from setuptools import find_packages, setup

setup(
    name="dicekern",
    version="0.1.0",
    description="DICE: data influence cascades in decentralized (gossip) learning",
    python_requires=">=3.11",
    packages=["dicekern", *(f"dicekern.{p}" for p in find_packages("dicekern")), "dicekern.kernels", "dicekern.bindings"],
    # kernels/ and bindings/ sit at the top level of the repository but install inside the
    # package, so they never claim the generic import names `kernels` and `bindings`.
    package_dir={"dicekern": "dicekern", "dicekern.kernels": "kernels", "dicekern.bindings": "bindings"},
    # the engine needs only these; the rest is imported where a feature first needs it (dicekern/extras.py)
    install_requires=["torch>=2.4", "numpy", "safetensors"],
    extras_require={
        "triton": ["triton"],  # the kernels
        "apps": ["networkx", "scikit-learn", "scipy", "matplotlib", "tqdm"],  # topologies, digits, analyses, pictures, CLI
        "test": ["pytest", "pytest-benchmark", "pytest-xdist"],
    },
)
