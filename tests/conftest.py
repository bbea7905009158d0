import os

# Tests launch mpirun themselves (integration tests) and run under it (tests/mpi).
os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")

# tests/support.py (Horovod skip marker, backend parameter, launch helpers) is imported by
# tests in every subdirectory.
import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
