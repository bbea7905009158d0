"""hpcaccel: data-parallel PyTorch training over MPI ranks.

Importing the package has no side effects: MPI is initialised only by the functions that
need it (env.detect, the reducers, the train entry point).
"""
from .comm import Reducer, make_reducer
from .config import TrainConfig
from .errors import UsageError

__version__ = "0.1.0"
__all__ = ["Reducer", "make_reducer", "TrainConfig", "UsageError", "__version__"]
