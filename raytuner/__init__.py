"""raytuner: LyCORIS LoKr fine-tuning of flow-matching image transformers on Ray.

Importing raytuner changes nothing in the process (no logger level, no environment variable):
each process sets up its logging where it starts (``raytuner/logs.py``).
"""

__version__ = "0.1.0"
