"""Tooling around the library, not installed with it: sweeps, reports, figures,
benchmarks, the accelerator check and the CIFAR-10 subset builder. Importable
from the repository root (``python -m scripts.<tool>`` are the entry points).
"""
