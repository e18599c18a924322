"""Image scores: pure tensor functions (functional) and Scorer objects with a registry (scorers)."""
from lora_monitor.scoring.scorers import Scorer, available_scorers, get_scorer, register_scorer, score_images

__all__ = ["Scorer", "available_scorers", "get_scorer", "register_scorer", "score_images"]
