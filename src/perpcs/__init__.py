"""perpcs: Personalized Pieces (Tan, Liu, Jiang, EMNLP 2024) for any Hugging Face causal LM.

Sharers train a small personal LoRA and share it as *pieces* (one module of one layer) with a
learned gate each; a target user assembles a personal LoRA from the pool with one forward pass
over their own history - no training. See README.md and docs/architecture.md.
"""

__version__ = "0.1.0"
