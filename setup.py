from setuptools import find_packages, setup

setup(
    name="minidl",
    version="0.1.0",
    description="A minimal, from-scratch deep learning framework on NumPy (CPU) or CuPy (GPU)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["minidl", "minidl.*"]),
    python_requires=">=3.10",
    # numpy 1.26's OpenBLAS falls back to a generic kernel on these CPUs (5.8x slower matmul)
    install_requires=["numpy>=2", "tqdm>=4.60"],
    extras_require={
        "gpu": ["cupy-cuda12x>=13"],
        "test": ["pytest>=7", "hypothesis>=6", "matplotlib>=3.6"],
        "viz": ["matplotlib>=3.6"],
        "onnx": ["onnx>=1.14", "onnxruntime>=1.16"],
        # MPI for data-parallel training; the mpich wheel brings mpiexec onto PATH;
        # threadpoolctl gives each rank its share of the cores for BLAS
        "dist": ["mpi4py>=4", "mpich", "threadpoolctl>=3"],
        "bench": ["threadpoolctl>=3"],
    },
    entry_points={"console_scripts": ["minidl=minidl.cli:main"]},
)
