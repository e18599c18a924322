"""Image scores: pure tensor functions (functional), Scorer objects with a registry (scorers) and the
embedding signals registered into it (signals: likeness, adherence, diversity, memorization)."""
from lora_monitor.scoring.scorers import Scorer, available_scorers, get_scorer, register_scorer, score_images
from lora_monitor.scoring import signals  # noqa: F401  (registers the embedding signals; transformers is imported lazily)

__all__ = ["Scorer", "available_scorers", "get_scorer", "register_scorer", "score_images"]
