import sys

from pipeline.cli import main

# Guarded: the MLflow writer process is started with `spawn`, which imports this module again.
if __name__ == "__main__":
    sys.exit(main())
