"""elmjax: ECG-language models in JAX/Flax.

An LLM reads a 12-lead ECG (as symbols, as a signal through an ECG encoder, or as an image
through a vision tower) and a question, and answers in text. See README.md.
"""

__version__ = "0.1.0"
