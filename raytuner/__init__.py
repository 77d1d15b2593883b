"""raytuner: LyCORIS LoKr fine-tuning of flow-matching image transformers on Ray."""

__version__ = "0.1.0"
