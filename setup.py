"""demp: Demon Pruning in JAX: neurons die on purpose during training and are removed live."""

from setuptools import find_packages, setup

setup(
  name='demp',
  version='0.1.0',
  description='Demon Pruning (DemP): structured pruning during training in JAX/Flax.',
  long_description=open('README.md').read(),
  long_description_content_type='text/markdown',
  python_requires='>=3.12',
  # The library and its companion baselines; configs/ and scripts/ run from the repository
  # root (`python -m scripts.train --config configs/...`) and are never installed.
  packages=find_packages(include=['demp', 'demp.*', 'baselines', 'baselines.*']),
  # Lower bounds are the versions this project is tested with.
  install_requires=[
    'jax>=0.12.0',
    'flax>=0.12.12',
    'optax>=0.2.8',
    'ml-collections>=1.1.0',
    'orbax-checkpoint>=0.12.8',
    'absl-py>=2.5.1',
    'numpy>=2.5',
    'tensorflow-cpu>=2.21.0',
    'tensorflow-datasets>=4.9.10',
    'tensorboard>=2.21.0',
    'scikit-learn>=1.9.1',
    'matplotlib>=3.11.2',
    'tqdm>=4.70.1',
  ],
  extras_require={
    'test': ['pytest>=9.2.0', 'pytest-xdist>=3.8.0', 'ruff>=0.8'],
  },
)
