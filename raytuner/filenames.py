"""The names of the files a run writes that other tools read by name.

Kept in a module of their own, importing nothing: the names are needed where the code that writes
the files (LyCORIS, diffusers) must not be imported, such as Ray Train's controller.
"""

from __future__ import annotations

# What diffusers' ``load_lora_weights`` and the lycoris recipe SimpleTuner users run look for.
ADAPTER_FILENAME = "pytorch_lora_weights.safetensors"
