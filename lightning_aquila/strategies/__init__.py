"""Named training strategies for Aquila2 models (FSDP2, DeepSpeed ZeRO, tensor parallel)."""
