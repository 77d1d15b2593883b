"""raytuner: LyCORIS LoKr fine-tuning of flow-matching image transformers on Ray."""

import logging

__version__ = "0.1.0"

# With torchao installed (the quantization extra), importing diffusers imports torchao, which logs
# three start-up warnings in every process, drivers and Ray workers alike: torch's "No CUDA
# runtime is found" on CPU machines, torch's deprecation of torchao's pytree registrations, and
# diffusers' note that torchao 0.18 lacks tensor classes of older releases (raytuner never loads
# torchao-serialised checkpoints). None asks anything of the user; errors still show.
for _noisy in (
    "torch.utils.cpp_extension",
    "torch.utils._pytree",
    "diffusers.quantizers.torchao.torchao_quantizer",
):
    logging.getLogger(_noisy).setLevel(logging.ERROR)
