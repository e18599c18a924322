"""lora-monitor: score LoRA previews each epoch, keep the best, stop early."""
__version__ = "0.1.0"
